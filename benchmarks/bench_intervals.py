"""Honest error bars and the sequential screen, on the published 256x256 setting.

One run, one machine: the demo ``unet2d``, the Colin27 slice zero-padded to 256x256, a
32x32 target on the brain edge, 8x8 blocks, natural patches (a bank of 10,000 crops of
the other slices, about half of them the same all-zero patch), screen 3 / estimate 50 /
tau 0.02 (the setting of ``bench_region_effects.py``, whose helpers this imports).

Variants, each rerun ``--reruns`` times with independent seeds:

1. ``published rule``: the two-stage rule on plain draws (the exact accelerations, which
   skip only blocks that provably cannot reach the region; the same draws as
   ``mode="published"``);
2. ``stratified``: ``mode="exact"``: the same rule, the bank's heavy patch evaluated once;
3. ``sequential``: ``mode="sequential"``.

Reference: the same estimand with many draws (``mode="exact"`` stratified, screen 20 with
any change kept, then ``--reference-draws`` evaluations per block that changed; no tau rule).

Reported per variant (mean over reruns): RMSE against the reference, false-zero rate
(blocks whose reference |ATE| >= tau that a run reports as 0, as a share of those blocks),
forward passes, wall time; and over every rerun's non-screened blocks the coverage of the
reference by the 95 % intervals (``block_lower`` / ``block_upper``) and by the old
``value +- 1.96 SE``, with the intervals' median width and the share flagged few-draws.

    python benchmarks/bench_intervals.py [--quick] [--reruns 3] [--out docs/uncertainty_results.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_region_effects import TAU, compare, pad_to  # noqa: E402 - the benchmark helpers live next to this file

from napari_pdcr import NodeStatus, PatchBank, RegionEffects  # noqa: E402
from napari_pdcr.cli import bank_from_stack, demo_target_region  # noqa: E402
from napari_pdcr.models.demo import load_demo_model  # noqa: E402
from napari_pdcr.samples import load_sample  # noqa: E402

TESTED = (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU)


def demo_setting():
    """``(model, image (1, 256, 256), region, reference mask, bank)`` of the published 2D setting."""
    model = load_demo_model("unet2d")
    sample = load_sample("colin27_slice")
    image = pad_to(sample["image"])[None].astype(np.float32)
    mask = pad_to(sample["mask"]).astype(bool)
    sources = [pad_to(s) for s in bank_from_stack(load_sample("colin27_slices"), sample.get("slice_index"))]
    return model, image, demo_target_region(mask, 32), mask, PatchBank(sources, size=10_000, seed=0)


def variant(name: str, model, bank, seed: int) -> RegionEffects:
    """The method of one variant (``published rule``, ``stratified``, ``sequential``) with ``seed``."""
    mode = {"published rule": "exact", "stratified": "exact", "sequential": "sequential"}[name]
    method = RegionEffects(model, intervention=bank, device="cpu", seed=seed, mode=mode)
    if name == "published rule":
        method.settings.stratify = False  # plain draws: the published estimator with the exact accelerations
    return method


def run(quick: bool, reruns: int) -> list[str]:
    model, image, region, mask, bank = demo_setting()
    patches, counts, _ = bank.unique_members((8, 8))
    t0 = time.perf_counter()
    n_reference = 100 if quick else 400
    reference = RegionEffects(
        model, intervention=bank, device="cpu", seed=10_000, mode="exact", n_screen=20, n_estimate=n_reference,
        tau=1e-9,
    ).attribute(image, region, reference=mask)
    reference_time = time.perf_counter() - t0
    truth = np.nan_to_num(reference.block_effects.astype(np.float64))
    explained = reference.block_status != NodeStatus.TARGET
    real = explained & (np.abs(truth) >= TAU)

    names = ("published rule", "stratified", "sequential")
    figures = {name: {"rmse": [], "false_zero": [], "passes": [], "seconds": []} for name in names}
    cover = {name: {"new": [], "old": [], "width": [], "few": []} for name in names}
    for name in names:
        for rerun in range(reruns):
            ex = variant(name, model, bank, seed=1 + rerun).attribute(image, region, reference=mask)
            effects = ex.block_effects.astype(np.float64)
            rmse = compare({name: effects}, truth, explained)[name][0]
            figures[name]["rmse"].append(rmse)
            figures[name]["false_zero"].append(float(np.mean(effects[real] == 0)) if real.any() else float("nan"))
            figures[name]["passes"].append(ex.forward_passes)
            figures[name]["seconds"].append(ex.timings["total_s"])
            tested = np.isin(ex.block_status, TESTED)
            lower, upper = ex.block_lower.astype(np.float64), ex.block_upper.astype(np.float64)
            # float32 storage: a reference equal to an end point counts as inside
            slack = 1e-4 * np.maximum(1.0, np.abs(truth))
            cover[name]["new"] += list(((lower - slack <= truth) & (truth <= upper + slack))[tested])
            half = 1.96 * ex.block_standard_error.astype(np.float64)
            cover[name]["old"] += list((np.abs(effects - truth) <= half + slack)[tested])
            cover[name]["width"] += list((upper - lower)[tested])
            cover[name]["few"] += list(ex.block_few_draws[tested])
    unique_share = len(counts) / counts.sum()
    rows = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, CPU. Command: `python benchmarks/bench_intervals.py{' --quick' if quick else ''} "
        f"--reruns {reruns}`.\n",
        f"Setting: demo `unet2d`, 256x256, 32x32 target, 8x8 blocks, bank of 10,000 crops: {len(counts)} distinct "
        f"({unique_share:.0%}), the heaviest a share of {counts.max() / counts.sum():.1%}; screen 3 / estimate 50 / "
        f"tau {TAU}. Reference: {n_reference} evaluations per block that changed in 20 screening draws "
        f"({reference.forward_passes} forward passes, {reference_time:.0f} s); {int(explained.sum())} blocks "
        f"compared, {int(real.sum())} of them with reference |ATE| >= tau. {reruns} independent reruns per variant.\n",
        "| variant | RMSE vs reference | false-zero rate | forward passes | wall time (s) | 95% interval coverage "
        "| old value +- 1.96 SE coverage | median interval width | few-draws flagged | blocks tested (all reruns) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        f, c = figures[name], cover[name]
        rows.append(
            f"| {name} | {np.mean(f['rmse']):.4f} | {np.mean(f['false_zero']):.3f} | {np.mean(f['passes']):.0f} | "
            f"{np.mean(f['seconds']):.1f} | {np.mean(c['new']):.3f} | {np.mean(c['old']):.3f} | "
            f"{np.median(c['width']):.2f} | {np.mean(c['few']):.2f} | {len(c['new'])} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 reference draws instead of 400")
    parser.add_argument("--reruns", type=int, default=3, help="independent reruns per variant")
    parser.add_argument("--out", default=None, help="markdown file to write the table to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = "\n".join(run(args.quick, args.reruns))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
