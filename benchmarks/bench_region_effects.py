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

Prints and writes a table: RMSE and Pearson r of each map against the reference, the
false-zero rate (blocks the reference calls non-zero, |ATE| >= tau, that a run reports
as 0), forward passes, wall time and speed-up over the loop. Then, in the same run:

4. the engine's throughput (images per second in the estimate stage) against the
   model's best-batch forward throughput at the window the exact run evaluates, and
   that forward throughput with channels-last, ``torch.compile`` and bf16 autocast;
5. many regions in one run (``regions=`` a label image) against one run per region;
6. a 3D run on the demo volume (8x8x8 blocks), fast and exact, fidelity against exact.

    python benchmarks/bench_region_effects.py [--quick] [--skip-3d] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_pdcr import PatchBank, RegionEffects
from napari_pdcr.cli import bank_from_stack, demo_target_region
from napari_pdcr.methods.region_effects import MODES
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.regions import BlockGrid, centered_box
from napari_pdcr.samples import load_sample

TAU = 0.02
LOOP = "loop (published, per block)"


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
    """RMSE, Pearson r and false-zero rate of each map against ``reference`` over the ``mask`` blocks.

    False zero: a block whose reference effect is at least tau in magnitude that the map reports as 0.
    """
    ref = reference[mask]
    nonzero = np.abs(ref) >= TAU
    out = {}
    for name, m in maps.items():
        values = m[mask]
        rmse = float(np.sqrt(np.mean((values - ref) ** 2)))
        r = float(np.corrcoef(values, ref)[0, 1]) if values.std() > 0 and ref.std() > 0 else float("nan")
        false_zero = float(np.mean(values[nonzero] == 0)) if nonzero.any() else float("nan")
        out[name] = (rmse, r, false_zero)
    return out


def forward_throughput(forward, item: torch.Tensor, sizes=(1, 2, 4, 8, 16, 32, 64), seconds: float = 1.0) -> dict:
    """Images per second of ``forward`` on batches of copies of ``item`` ``(C, *S)``, per batch size
    (one warm-up call, then calls for ``seconds``)."""
    rates = {}
    with torch.inference_mode():
        for size in sizes:
            batch = item.expand(size, *item.shape).contiguous()
            forward(batch)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                forward(batch)
                n += size
            rates[size] = n / (time.perf_counter() - t0)
    return rates


def demo_2d():
    """The 2D setting: model, image (1, 256, 256), brain mask, target region, patch bank, bank crops."""
    model = load_demo_model("unet2d")
    sample = load_sample("colin27_slice")
    image = pad_to(sample["image"])[None].astype(np.float32)  # (1, 256, 256)
    mask = pad_to(sample["mask"]).astype(bool)
    region = demo_target_region(mask, 32)
    stack = load_sample("colin27_slices")
    sources = [pad_to(s) for s in bank_from_stack(stack, sample.get("slice_index"))]
    bank = PatchBank(sources, size=10_000, seed=0)
    return model, image, mask, region, bank, len(sources)


def run_2d(quick: bool) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    model, image, mask, region, bank, n_sources = demo_2d()
    crops = bank.bank((8, 8))
    grid = BlockGrid.create(region.shape, 8)
    explained = ~grid.any_per_block(region)
    rows, maps, figures, runs = [], {}, {}, {}

    t0 = time.perf_counter()
    maps[LOOP], passes = published_loop(model, image, region, mask, crops)
    figures[LOOP] = (passes, time.perf_counter() - t0)

    engine_runs = {
        "engine: published settings, batched": dict(mode="published"),
        "engine: exact (all exact levers)": dict(mode="exact"),
        "engine: exact, no incremental inference": dict(mode="exact", incremental=False),
        "engine: exact, batch size from throughput probe": dict(mode="exact", batch_probe=True),
        "engine: exact, bf16 autocast on CPU (opt-in)": dict(mode="exact", precision="bfloat16"),
        "engine: sequential screen (interval vs tau)": dict(mode="sequential"),
        "engine: fast (adaptive, se<=0.1)": dict(mode="fast", se_target=0.1),
        "engine: fast (adaptive, se<=0.25)": dict(mode="fast", se_target=0.25),
    }
    for name, options in engine_runs.items():
        if "mode" in options and options["mode"] not in MODES:
            continue  # an option that is not in this version of the engine
        expl = RegionEffects(model, intervention=bank, device="cpu", seed=1, **options).attribute(image, region, reference=mask)
        maps[name] = expl.block_effects.astype(np.float64)
        figures[name] = (expl.forward_passes, expl.timings["total_s"])
        runs[name] = expl

    t0 = time.perf_counter()
    n_ref = 100 if quick else 400
    ref = RegionEffects(
        model, intervention=bank, device="cpu", seed=2, mode="exact", n_screen=20, n_estimate=n_ref, tau=1e-9
    ).attribute(image, region, reference=mask)
    ref_map = np.nan_to_num(ref.block_effects.astype(np.float64))
    ref_time = time.perf_counter() - t0
    stats = compare(maps, ref_map, explained)

    loop_passes, loop_time = figures[LOOP]
    loop_rmse, _, loop_false_zero = stats[LOOP]
    rows.append(f"2D: demo `unet2d`, Colin27 slice zero-padded to 256x256, 32x32 target on the brain edge, "
                f"8x8 blocks, natural patches (bank of 10,000 crops from {n_sources} other slices), "
                f"screen 3 / estimate 50 / tau {TAU}; reference: {n_ref} draws per block that changed in "
                f"20 screening draws ({ref.forward_passes} forward passes, {ref_time:.0f} s); "
                f"{int(explained.sum())} blocks compared, {int((np.abs(ref_map[explained]) >= TAU).sum())} of them "
                f"non-zero in the reference (|ATE| >= tau).\n")
    rows.append("| run | RMSE vs reference | Pearson r | false-zero rate | forward passes | wall time (s) | "
                "speed-up vs loop | RMSE <= loop | false zeros <= loop |")
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for name, (passes, seconds) in figures.items():
        rmse, r, false_zero = stats[name]
        rows.append(f"| {name} | {rmse:.4f} | {r:.4f} | {false_zero:.3f} | {passes} | {seconds:.1f} | "
                    f"{loop_time / seconds:.1f}x | {'yes' if rmse <= loop_rmse else 'no'} | "
                    f"{'yes' if false_zero <= loop_false_zero else 'no'} |")
    return rows, dict(model=model, image=image, mask=mask, region=region, bank=bank, runs=runs,
                      loop_time=loop_time)


def run_throughput(context: dict, quick: bool, skip_compile: bool = False) -> list[str]:
    """Engine throughput vs the model's best-batch forward throughput at the evaluated window,
    and the forward throughput of channels-last, torch.compile and bf16 at that window."""
    model, image = context["model"], context["image"]
    seconds = 0.5 if quick else 1.0
    exact = context["runs"]["engine: exact (all exact levers)"]
    window = tuple(slice(a, b) for a, b in exact.parameters["window"] or [[0, n] for n in image.shape[1:]])
    crop = torch.from_numpy(image)[(slice(None), *window)].contiguous()
    rates = forward_throughput(model, crop, seconds=seconds)
    best_size = max(rates, key=rates.get)
    best = rates[best_size]
    rows = [
        f"\nThroughput at the window the exact run evaluates ({'x'.join(str(n) for n in crop.shape[1:])} of 256x256), "
        f"images per second: the model's forward (SegmentationModel call, {seconds:.1f} s per batch size) by batch size: "
        + ", ".join(f"{k}: {v:.0f}" for k, v in rates.items()) + f"; best {best:.0f} at batch {best_size}.\n",
        "| run | batch size | estimate-stage images | estimate time (s) | images/s | engine / best forward |",
        "|---|---|---|---|---|---|",
    ]
    for name, expl in context["runs"].items():
        if not name.startswith("engine: exact"):
            continue
        stage = expl.parameters["forward_passes_by_stage"]["estimate"]
        rate = stage / expl.timings["estimate_s"]
        rows.append(f"| {name} | {expl.parameters['batch_size']} | {stage} | {expl.timings['estimate_s']:.1f} | "
                    f"{rate:.0f} | {rate / best:.2f} |")
    probed = context["runs"].get("engine: exact, batch size from throughput probe")
    if probed is not None and probed.parameters.get("batch_probe_images_per_second"):
        rows.append("\nThe run's own probe (images/s by batch size): " + ", ".join(
            f"{k}: {v:.0f}" for k, v in probed.parameters["batch_probe_images_per_second"]) + ".")

    # forward-pass variants of the network at the same window and batch size
    network = model.network
    batch = crop.expand(best_size, *crop.shape).contiguous()
    with torch.inference_mode():
        reference_scores = network(batch)
    variants = {"float32 (default)": (network, batch, None)}
    channels_last = copy.deepcopy(network).to(memory_format=torch.channels_last)
    variants["channels-last"] = (channels_last, batch.contiguous(memory_format=torch.channels_last), None)
    variants["bf16 autocast (CPU)"] = (network, batch, torch.bfloat16)
    compile_note = "torch.compile not run (--skip-compile)"
    if not skip_compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(copy.deepcopy(network))
            with torch.inference_mode():
                compiled(batch)  # compiles
            variants["torch.compile (inductor)"] = (compiled, batch, None)
            compile_note = f"torch.compile took {time.perf_counter() - t0:.0f} s to compile at this shape"
        except Exception as error:  # noqa: BLE001 - a benchmark row, not a crash
            compile_note = f"torch.compile failed here ({type(error).__name__}: {str(error)[:120]})"
    rows += [
        f"\nForward-pass variants of the network at that window, batch {best_size} ({compile_note}):\n",
        "| variant | images/s | vs float32 | max abs score change vs float32 |",
        "|---|---|---|---|",
    ]
    base_rate = None
    for name, (net, inputs, dtype) in variants.items():
        def forward(b, net=net, dtype=dtype):
            if dtype is None:
                return net(b)
            with torch.autocast("cpu", dtype=dtype):
                return net(b)

        rate = forward_throughput(forward, inputs[0], sizes=(best_size,), seconds=seconds)[best_size]
        base_rate = base_rate or rate
        with torch.inference_mode():
            change = float((forward(inputs).float() - reference_scores).abs().max())
        rows.append(f"| {name} | {rate:.0f} | {rate / base_rate:.2f}x | {change:.2e} |")
    return rows


def run_many_regions(context: dict, n_regions: int = 4, near: bool = False) -> list[str]:
    """``n_regions`` regions on the brain edge, one run for all against one run per region (exact mode).

    Far apart (default): 32x32 on the left, right, top and bottom edge. ``near``: 16x16
    tiles of one 32x32 square on the left edge (they share their blocks' reach).
    """
    model, image, mask, bank = context["model"], context["image"], context["mask"], context["bank"]
    coords = np.argwhere(mask)
    centre = coords.mean(axis=0).astype(int)
    row, col = centre
    labels = np.zeros(mask.shape, np.int32)
    if near:
        left = np.flatnonzero(mask[row])[0]
        for label, (dr, dc) in enumerate([(-8, -8), (-8, 8), (8, -8), (8, 8)][:n_regions], start=1):
            labels[centered_box(mask.shape, (row + dr, left + dc), 16)] = label
    else:
        points = [  # left, right, top, bottom edge of the brain through its centre
            (row, np.flatnonzero(mask[row])[0]), (row, np.flatnonzero(mask[row])[-1]),
            (np.flatnonzero(mask[:, col])[0], col), (np.flatnonzero(mask[:, col])[-1], col),
        ]
        for label, point in enumerate(points[:n_regions], start=1):
            labels[centered_box(mask.shape, point, 32)] = label
    method = RegionEffects(model, intervention=bank, device="cpu", seed=1, mode="exact")

    def one_run_per_region():
        runs, seconds = {}, 0.0
        for label in np.unique(labels[labels > 0]):
            t0 = time.perf_counter()
            runs[int(label)] = method.attribute(image, labels == label, reference=mask)
            seconds += time.perf_counter() - t0
        return runs, seconds

    # the runs per region before and after the shared run: a load that changes meanwhile
    # (a shared machine) weighs on both sides alike
    alone, before_s = one_run_per_region()
    t0 = time.perf_counter()
    joint = method.attribute(image, regions=labels, reference=mask)
    joint_time = time.perf_counter() - t0
    _, after_s = one_run_per_region()
    alone_time = {"all": (before_s + after_s) / 2}
    k = len(joint)
    diff = max(float(np.abs(joint[j].block_effects - alone[j].block_effects).max()) for j in joint)
    groups = {tuple(e.parameters["regions_in_run"]): e.forward_passes for e in joint.values()}  # runs it made
    joint_passes = sum(groups.values())
    rows = [
        f"\nMany regions in one run: {k} regions "
        + ("of 16x16 tiling a 32x32 square on the brain's left edge " if near
           else "of 32x32 on the brain edge (left, right, top, bottom) ")
        + "as one label image, exact mode, same seed; largest difference of any block between the "
        f"shared run and the runs per region: {diff:.2e} Dice points.\n",
        "| run | forward passes | wall time (s) | per region (s) |",
        "|---|---|---|---|",
        f"| one run per region ({k} runs) | {sum(a.forward_passes for a in alone.values())} | "
        f"{alone_time['all']:.1f} (mean of {before_s:.1f} before and {after_s:.1f} after) | {alone_time['all'] / k:.1f} |",
        f"| `regions=` labels ({len(groups)} run(s): {', '.join(map(str, groups))}) | {joint_passes} | "
        f"{joint_time:.1f} | {joint_time / k:.1f} |",
    ]
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
        "| run | forward passes | wall time (s) | target (s) | RMSE vs exact | Pearson r vs exact | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    targets = {"fast (adaptive, se<=0.25)": 30, "exact": 90}
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
            (rmse, r, _), = compare({name: expl.block_effects.astype(float)}, exact.block_effects.astype(float), grid_mask).values()
            diff = float(np.abs(expl.block_effects - exact.block_effects).max())
            fidelity = f"{rmse:.4f} | {r:.4f} | {diff:.3f}"
        else:
            fidelity = "n/a | n/a | n/a"
        seconds = expl.timings["total_s"]
        target = f"<= {targets[name]}: {'met' if seconds <= targets[name] else 'missed'}"
        rows.append(f"| {name} | {expl.forward_passes} | {seconds:.1f} | {target} | {fidelity} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer reference draws, no exact 3D run")
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--skip-2d", action="store_true")
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    parser.add_argument("--regions", type=int, default=4, choices=(2, 3, 4), help="regions in the many-regions rows")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile row (it compiles for minutes)")
    parser.add_argument("--regions-only", action="store_true", help="only the many-regions rows (2D setting)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    load = os.getloadavg()
    header = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, CPU; load average at the start {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min).\n"
    ]
    rows = list(header)

    def report(new_rows: list[str]) -> None:  # print and write each part as it is done
        rows.extend(new_rows)
        print("\n".join(new_rows), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(rows) + "\n")

    report([])
    if args.regions_only:
        model, image, mask, region, bank, _ = demo_2d()
        context = dict(model=model, image=image, mask=mask, bank=bank)
        report(run_many_regions(context, args.regions))
        report(run_many_regions(context, args.regions, near=True))
        return
    if not args.skip_2d:
        table, context = run_2d(args.quick)
        report(table)
        report(run_throughput(context, args.quick, args.skip_compile))
        report(run_many_regions(context, args.regions))
        report(run_many_regions(context, args.regions, near=True))
    if not args.skip_3d:
        report(run_3d(args.quick))


if __name__ == "__main__":
    main()
