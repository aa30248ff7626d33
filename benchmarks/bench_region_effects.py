"""Speed and fidelity of the effect engine against the published per-block loop.

One run, one machine, one model, image and target region:

1. ``loop``: a plain implementation of the published procedure, written from
   ALGORITHM.md: for each 8x8 block not touching the 32x32 target region, one batch of
   3 natural patches (screen; all |change| < tau -> 0), else one batch of 50 (mean;
   |mean| < tau -> 0). Python loop over blocks, one small forward batch per block.
2. the engine with the same settings: ``published`` (batching only), ``exact`` (plus
   the exact accelerations), ``fast`` (plus adaptive draws, approximate).
3. ``reference``: the same estimand with many draws (screen 20 draws with any change
   kept, then 400 draws per block that changed), no tau rule.

Prints and writes a table: RMSE and Pearson r of each map against the reference,
forward passes, wall time and speed-up over the loop. Also a 3D run on the demo
volume (8x8x8 blocks), whose fidelity is measured against the exact setting.

    python benchmarks/bench_region_effects.py [--quick] [--skip-3d] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_pdcr import PatchBank, RegionEffects
from napari_pdcr.cli import bank_from_stack, demo_target_region
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.regions import BlockGrid, centered_box
from napari_pdcr.samples import load_sample

TAU = 0.02


def pad_to(array: np.ndarray, size: int = 256) -> np.ndarray:
    """Zero-pad the last two axes of ``array`` to ``size`` (centred)."""
    pads = [(0, 0)] * (array.ndim - 2)
    for n in array.shape[-2:]:
        before = (size - n) // 2
        pads.append((before, size - n - before))
    return np.pad(array, pads)


def dice_in_region(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """100 x Dice per batch row; ``pred`` (N, M) bool, ``ref`` (M,) bool."""
    pred, ref = pred.double(), ref.double()[None]
    total = pred.sum(1) + ref.sum(1)
    return torch.where(total > 0, 200 * (pred * ref).sum(1) / total.clamp_min(1e-12), torch.full_like(total, 100.0))


def published_loop(model, image, region, reference, bank_crops, seed=0, n_screen=3, n_estimate=50):
    """The published per-block procedure; returns the block map and forward passes."""
    grid = BlockGrid.create(region.shape, 8)
    touches = grid.any_per_block(region).ravel()
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(image)
    ref = torch.from_numpy(reference[region])
    idx = torch.from_numpy(np.flatnonzero(region))
    passes = 0

    def outcome(batch):
        nonlocal passes
        passes += len(batch)
        with torch.inference_mode():
            scores = model(batch).flatten(2)[:, 0, idx]
        return dice_in_region(torch.sigmoid(scores) > 0.5, ref)

    base = float(outcome(x[None])[0])
    effects = np.zeros(grid.n_blocks)
    for b in range(grid.n_blocks):
        if touches[b]:
            continue
        where = (slice(None), slice(None), *grid.slices(b))
        for n, final in ((n_screen, False), (n_estimate, True)):
            batch = x[None].repeat(n, 1, 1, 1)
            batch[where] = bank_crops[rng.integers(len(bank_crops), size=n)]
            change = outcome(batch).numpy() - base
            if not final and np.all(np.abs(change) < TAU):
                break
            if final:
                effects[b] = change.mean() if abs(change.mean()) >= TAU else 0.0
    return effects.reshape(grid.shape), passes


def compare(maps: dict, reference: np.ndarray, mask: np.ndarray) -> dict:
    """RMSE and Pearson r of each map against ``reference`` over the ``mask`` blocks."""
    ref = reference[mask]
    out = {}
    for name, m in maps.items():
        values = m[mask]
        rmse = float(np.sqrt(np.mean((values - ref) ** 2)))
        r = float(np.corrcoef(values, ref)[0, 1]) if values.std() > 0 and ref.std() > 0 else float("nan")
        out[name] = (rmse, r)
    return out


def run_2d(quick: bool) -> list[str]:
    torch.manual_seed(0)
    model = load_demo_model("unet2d")
    sample = load_sample("colin27_slice")
    image = pad_to(sample["image"])[None].astype(np.float32)  # (1, 256, 256)
    mask = pad_to(sample["mask"]).astype(bool)
    region = demo_target_region(mask, 32)
    stack = load_sample("colin27_slices")
    sources = [pad_to(s) for s in bank_from_stack(stack, sample.get("slice_index"))]
    bank = PatchBank(sources, size=10_000, seed=0)
    crops = bank.bank((8, 8))
    grid = BlockGrid.create(region.shape, 8)
    explained = ~grid.any_per_block(region)
    rows, maps, figures = [], {}, {}

    t0 = time.perf_counter()
    maps["loop (published, per block)"], passes = published_loop(model, image, region, mask, crops)
    figures["loop (published, per block)"] = (passes, time.perf_counter() - t0)

    engine_runs = {
        "engine: published settings, batched": dict(mode="published"),
        "engine: exact accelerations": dict(mode="exact"),
        "engine: fast (adaptive, se<=0.1)": dict(mode="fast", se_target=0.1),
        "engine: fast (adaptive, se<=0.25)": dict(mode="fast", se_target=0.25),
        # more screening draws: fewer real effects lost to the 3-draw screen
        "engine: exact, screen 6": dict(mode="exact", n_screen=6),
        "engine: fast (adaptive, se<=0.1), screen 6": dict(mode="fast", se_target=0.1, n_screen=6),
    }
    for name, options in engine_runs.items():
        expl = RegionEffects(model, intervention=bank, device="cpu", seed=1, **options).attribute(image, region, reference=mask)
        maps[name] = expl.block_effects.astype(np.float64)
        figures[name] = (expl.forward_passes, expl.timings["total_s"])

    t0 = time.perf_counter()
    n_ref = 100 if quick else 400
    ref = RegionEffects(
        model, intervention=bank, device="cpu", seed=2, mode="exact", n_screen=20, n_estimate=n_ref, tau=1e-9
    ).attribute(image, region, reference=mask)
    ref_map = np.nan_to_num(ref.block_effects.astype(np.float64))
    ref_time = time.perf_counter() - t0
    stats = compare(maps, ref_map, explained)

    loop_passes, loop_time = figures["loop (published, per block)"]
    loop_rmse = stats["loop (published, per block)"][0]
    rows.append(f"2D: demo `unet2d`, Colin27 slice zero-padded to 256x256, 32x32 target on the brain edge, "
                f"8x8 blocks, natural patches (bank of 10,000 crops from {len(sources)} other slices), "
                f"screen 3 / estimate 50 / tau {TAU}; reference: {n_ref} draws per block that changed in "
                f"20 screening draws ({ref.forward_passes} forward passes, {ref_time:.0f} s); "
                f"{int(explained.sum())} blocks compared.\n")
    rows.append("| run | RMSE vs reference | Pearson r | forward passes | wall time (s) | speed-up vs loop | RMSE <= loop |")
    rows.append("|---|---|---|---|---|---|---|")
    for name, (passes, seconds) in figures.items():
        rmse, r = stats[name]
        rows.append(f"| {name} | {rmse:.4f} | {r:.4f} | {passes} | {seconds:.1f} | {loop_time / seconds:.1f}x | "
                    f"{'yes' if rmse <= loop_rmse else 'no'} |")
    return rows


def run_3d(quick: bool) -> list[str]:
    model = load_demo_model("unet3d")
    sample = load_sample("colin27_volume")
    image = sample["image"][None]
    mask = sample["mask"].astype(bool)
    coords = np.argwhere(mask)
    centre = coords.mean(axis=0).astype(int)
    edge = centre.copy()
    edge[2] = coords[coords[:, 0] == centre[0]][:, 2].min()  # left edge of the brain at the centre slice
    region = centered_box(mask.shape, edge, 16)
    bank = PatchBank([load_sample("itk_volume")["image"][None]], size=10_000, seed=0)
    rows = [
        "\n3D: demo `unet3d`, Colin27 at 2 mm (91x109x91), 16^3 target on the brain edge, 8x8x8 blocks, "
        "natural patches from the second subject's volume, screen 3 / estimate 50.\n",
        "| run | forward passes | wall time (s) | RMSE vs exact | Pearson r vs exact | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    runs = {"fast (adaptive, se<=0.25)": dict(mode="fast", se_target=0.25)}
    if not quick:
        runs["exact"] = dict(mode="exact")
    results = {}
    for name, options in runs.items():
        expl = RegionEffects(model, intervention=bank, device="cpu", seed=1, **options).attribute(image, region, reference=mask)
        results[name] = expl
    exact = results.get("exact")
    for name, expl in results.items():
        if exact is not None:
            grid_mask = exact.block_status != 3
            (rmse, r), = compare({name: expl.block_effects.astype(float)}, exact.block_effects.astype(float), grid_mask).values()
            diff = float(np.abs(expl.block_effects - exact.block_effects).max())
            fidelity = f"{rmse:.4f} | {r:.4f} | {diff:.3f}"
        else:
            fidelity = "n/a | n/a | n/a"
        rows.append(f"| {name} | {expl.forward_passes} | {expl.timings['total_s']:.1f} | {fidelity} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer reference draws, no exact 3D run")
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--skip-2d", action="store_true")
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    header = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU.\n"
    ]
    rows = header + ([] if args.skip_2d else run_2d(args.quick))
    if not args.skip_3d:
        rows += run_3d(args.quick)
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
