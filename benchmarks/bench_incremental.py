"""Incremental inference against full inference: per forward pass and per exact-mode run.

One run, one machine, torch pinned to ``--threads`` threads (default 1: the CPU is
shared). Settings as published: demo ``unet2d`` on the Colin27 slice zero-padded to
256x256, 32x32 target on the brain edge, 8x8 blocks, natural patches; and demo
``unet3d`` on the Colin27 volume at 2 mm, 16^3 target, 8^3 blocks.

1. **Forward pass**: one batch of intervened inputs, full inference vs
   :class:`~napari_pdcr.engine.incremental.IncrementalForward`, on the whole image and on
   the window exact mode runs the model on (found by a first exact run). Batches as
   the estimator forms them: 3 draws per block (screen) and one block with every draw
   (estimate). Median of ``--repeats`` timings each, alternating the two.
2. **Whole run**: ``RegionEffects(mode="exact")`` with ``incremental=True`` and
   ``False`` (same seed): wall time, ratio, and the largest difference of the maps.

    python benchmarks/bench_incremental.py [--skip-3d] [--threads 1] [--out docs/incremental_results.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from bench_region_effects import pad_to

from napari_pdcr import PatchBank, RegionEffects
from napari_pdcr.cli import bank_from_stack, demo_target_region
from napari_pdcr.engine.incremental import IncrementalForward
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.regions import BlockGrid, centered_box
from napari_pdcr.samples import load_sample


def setting_2d():
    """(model, image (1, 256, 256), region, reference, bank) of the published 2D setting."""
    sample = load_sample("colin27_slice")
    image = pad_to(sample["image"])[None].astype(np.float32)
    mask = pad_to(sample["mask"]).astype(bool)
    sources = [pad_to(s) for s in bank_from_stack(load_sample("colin27_slices"), sample.get("slice_index"))]
    return load_demo_model("unet2d"), image, demo_target_region(mask, 32), mask, PatchBank(sources, size=10_000, seed=0)


def setting_3d():
    """(model, image (1, 91, 109, 91), region, reference, bank) of the 3D demo volume."""
    sample = load_sample("colin27_volume")
    mask = sample["mask"].astype(bool)
    coords = np.argwhere(mask)
    edge = coords.mean(axis=0).astype(int)
    edge[2] = coords[coords[:, 0] == edge[0]][:, 2].min()  # the brain's left edge at the centre slice
    bank = PatchBank([load_sample("itk_volume")["image"][None]], size=10_000, seed=0)
    return load_demo_model("unet3d"), sample["image"][None], centered_box(mask.shape, edge, 16), mask, bank


def timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def forward_rows(name, model, image, region, bank, window, batch_size, reached, repeats) -> list[str]:
    """Rows of per-forward-pass timings: full vs incremental, whole image and exact window;
    the intervened blocks are drawn from ``reached`` (blocks the exact run estimated)."""
    x = torch.from_numpy(image)
    grid = BlockGrid.create(region.shape, 8)
    rng = np.random.default_rng(0)
    rows = []
    crops = {"whole image": tuple(slice(0, n) for n in region.shape)}
    if window is not None:
        crops["exact-mode window"] = window
    for where, crop in crops.items():
        local_region = region[crop]
        bounds = np.argwhere(local_region)
        needed = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(bounds.min(0), bounds.max(0), strict=True))
        base = x[(slice(None), *crop)].contiguous()
        offset = [c.start for c in crop]
        inside = [b for b in reached if all(s.start >= c.start and s.stop <= c.stop
                                               for s, c in zip(grid.slices(int(b)), crop, strict=True))]
        incremental = IncrementalForward(model, base, needed)
        for batching, per_block in (("3 draws per block", 3), (f"1 block x {batch_size} draws", batch_size)):
            blocks = rng.choice(inside, size=-(-batch_size // per_block), replace=False)
            batch = base[None].repeat(batch_size, *([1] * base.ndim))
            changed = []
            for i in range(batch_size):
                block = grid.slices(int(blocks[i // per_block]))
                local = tuple(slice(s.start - o, s.stop - o) for s, o in zip(block, offset, strict=True))
                batch[(i, slice(None), *local)] = bank.sample(x[(slice(None), *block)], 1, rng, block)[0]
                changed.append(local)
            with torch.inference_mode():
                full_out = model(batch)
                part_out = incremental.forward(batch, changed)  # also the one-time check against full inference
                inside_needed = (slice(None), slice(None), *needed)
                error = float((full_out[inside_needed] - part_out[inside_needed]).abs().max())
                full_t, incr_t = [], []
                for _ in range(repeats):  # alternate, so load from other processes hits both alike
                    full_t += timed(partial(model, batch), 1)
                    incr_t += timed(partial(incremental.forward, batch, changed), 1)
            full_s, incr_s = statistics.median(full_t), statistics.median(incr_t)
            shape = "x".join(str(c.stop - c.start) for c in crop)
            rows.append(f"| {name} | {where} ({shape}) | {batching} | {incremental.status} | {1000 * full_s:.0f} | "
                        f"{1000 * incr_s:.0f} | {full_s / incr_s:.1f}x | {error:.1e} |")
    return rows


def run_rows(name, model, image, region, reference, bank, runs: int):
    """Rows of whole exact-mode runs with and without incremental inference; the window, the
    batch size and the blocks the run estimated (drew for)."""
    rows, results = [], {True: [], False: []}
    for _ in range(runs):
        for flag in (False, True):  # alternate
            method = RegionEffects(model, intervention=bank, device="cpu", seed=1, mode="exact", incremental=flag)
            results[flag].append(method.attribute(image, region, reference=reference))
    full, incr = results[False][-1], results[True][-1]
    full_s = statistics.median(r.timings["total_s"] for r in results[False])
    incr_s = statistics.median(r.timings["total_s"] for r in results[True])
    full_est = statistics.median(r.timings["estimate_s"] for r in results[False])
    incr_est = statistics.median(r.timings["estimate_s"] for r in results[True])
    diff = float(np.abs(incr.block_effects - full.block_effects).max())
    rows.append(f"| {name} | {incr.parameters['incremental']} | {full.forward_passes} | {full_s:.1f} | {incr_s:.1f} | "
                f"{full_s / incr_s:.2f}x | {full_est:.1f} | {incr_est:.1f} | {full_est / incr_est:.2f}x | {diff:.1e} |")
    window = full.parameters["window"]
    window = None if window is None else tuple(slice(a, b) for a, b in window)
    return rows, window, full.parameters["batch_size"], np.flatnonzero(full.block_draws.ravel() > 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timings per forward-pass row (median)")
    parser.add_argument("--runs", type=int, default=1, help="whole runs per variant (median)")
    parser.add_argument("--out", default=None, help="markdown file to write the tables to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {"2D unet2d 256x256, 8x8 blocks": setting_2d}
    if not args.skip_3d:
        settings["3D unet3d 91x109x91, 8^3 blocks"] = setting_3d
    run_table = [
        "| setting | incremental | forward passes | full-inference run (s) | incremental run (s) | speed-up | "
        "full estimate stage (s) | incremental estimate stage (s) | speed-up | max abs map difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    forward_table = [
        "| setting | input | batch | incremental | full (ms) | incremental (ms) | speed-up | max abs score difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, make in settings.items():
        model, image, region, reference, bank = make()
        rows, window, batch_size, reached = run_rows(name, model, image, region, reference, bank, args.runs)
        run_table += rows
        forward_table += forward_rows(name, model, image, region, bank, window, batch_size, reached, args.repeats)
        print("\n".join(run_table[-1:] + forward_table[-4:]), flush=True)
    text = "\n".join([
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, CPU.\n",
        "Whole exact-mode runs (screen 3 / estimate 50, tau 0.02, natural patches, seed 1):\n",
        *run_table,
        "\nOne forward batch (the run's batch size; medians of alternating timings):\n",
        *forward_table,
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
