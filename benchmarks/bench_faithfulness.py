"""Faithfulness of causal region effects against the baselines, on the demo models.

For each model (every shipped 2D demo model but the temperature series, and the 3D
``unet3d``) and each of ``--regions`` target regions, drawn reproducibly (seed 0): half
centred on voxels of the brain mask's boundary, half on voxels inside the mask (eroded
by the largest half-size), square/cubic boxes of 16-48 px (3D: 8-16 voxels);
``compare_methods`` explains the region with every method and scores every map by
deletion and insertion curves (fills: natural patches of other images, and blur;
outcomes: 100 x Dice against the model's own prediction, and soft Dice). Reported per
model and method: deletion / insertion AUC (mean and 95% interval over regions, normal
approximation), the fraction of regions on which the method beats random (both
directions), the fraction on which region effects beat each baseline, and the wall time
per map. torch runs on one thread (``torch.set_num_threads(1)``).

    python benchmarks/bench_faithfulness.py --out docs/faithfulness_results.md          # the full run
    python benchmarks/bench_faithfulness.py --models unet2d shallow2d --regions 4 \\
        --causal-mode fast --n-estimate 20 --n-steps 10 --out docs/faithfulness_results.md   # reduced
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_pdcr import RegionEffects, compare_methods
from napari_pdcr.jobs import patch_bank
from napari_pdcr.metrics.faithfulness import DIRECTIONS, RANDOM
from napari_pdcr.models.demo import DEMO_MODELS, TEMPERATURE_SERIES, load_demo_model
from napari_pdcr.regions import centered_box
from napari_pdcr.samples import load_sample
from napari_pdcr.studies.methods import METHODS

#: every shipped demo model but the temperature series (unet2d retrained at other temperatures)
MODELS = [name for name in DEMO_MODELS if name not in TEMPERATURE_SERIES]
SIZES = {2: (16, 48), 3: (8, 16)}


def draw_regions(mask: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` boxes: even ones centred on the mask's boundary, odd ones inside it; sizes per :data:`SIZES`."""
    rng = np.random.default_rng(seed)
    low, high = SIZES[mask.ndim]
    mask = mask.astype(bool)
    boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=high // 2))
    regions = []
    for i in range(n):
        centres = boundary if i % 2 == 0 else inside
        centre = centres[rng.integers(len(centres))]
        regions.append(centered_box(mask.shape, centre, int(rng.integers(low, high + 1))))
    return regions


def interval(values) -> str:
    values = np.asarray(values, dtype=float)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{values.mean():.3f} ± {half:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--regions", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--causal-mode", default="exact", choices=("exact", "fast"))
    parser.add_argument("--n-estimate", type=int, default=50)
    parser.add_argument("--n-steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--figure", default="docs/images/faithfulness_curves.png")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    lines = [
        f"Command: `python benchmarks/bench_faithfulness.py --models {' '.join(args.models)} --regions {args.regions} "
        f"--causal-mode {args.causal_mode} --n-estimate {args.n_estimate} --n-steps {args.n_steps}`",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, device {args.device}.",
        "",
    ]
    figure_done = False
    for name in args.models:
        model = load_demo_model(name)
        sample = load_sample(DEMO_MODELS[name].sample)
        image = sample["image"][None]
        block = 8
        bank, _ = patch_bank(model, image, block_shape=block)
        methods = [RegionEffects(model, intervention=bank, block_shape=block, mode=args.causal_mode,
                                 n_estimate=args.n_estimate, device=args.device) if m == "region_effects" else m
                   for m in args.methods]
        rows = []
        for index, region in enumerate(draw_regions(sample["mask"], args.regions)):
            t0 = time.perf_counter()
            result = compare_methods(model, image, region, methods=methods, block_shape=block, n_steps=args.n_steps,
                                     device=args.device)
            rows.append(result)
            print(f"{name} region {index}: {time.perf_counter() - t0:.1f} s", flush=True)
            if not figure_done:
                save_figure(result, args.figure, f"{name}, region {index} ({int(region.sum())} px)")
                figure_done = True
        lines += table(name, rows)
        if args.out:  # after every model, so that a long run keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(name: str, results) -> list[str]:
    """Markdown rows for one model: AUCs per fill (Dice outcome), beats random, causal beats method, wall time."""
    curves = [r.curves for r in results]
    fills = curves[0].fills
    dice = curves[0].outcomes.index("dice")
    methods = list(results[0].maps)
    head = ["method"] + [f"{d} AUC ({f})" for d in DIRECTIONS for f in fills] + [
        "beats random (del / ins)", "causal beats it (del / ins)", "wall s per map"]
    out = [f"### {name} ({len(results)} regions; Dice outcome; mean ± 95% interval)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in [*methods, RANDOM]:
        areas = np.stack([c.auc(method)[:, :, dice] for c in curves])  # (regions, direction, fill)
        cells = [interval(areas[:, d, f]) for d in range(2) for f in range(len(fills))]
        if method == RANDOM:
            cells += ["", "", ""]
        else:
            wins = np.stack([c.beats(method, RANDOM)[:, :, dice] for c in curves])  # (regions, direction, fill)
            cells.append(" / ".join(f"{wins[:, d].mean():.2f}" for d in range(2)))
            if "region_effects" in methods and method != "region_effects":
                causal = np.stack([c.beats("region_effects", method)[:, :, dice] for c in curves])
                cells.append(" / ".join(f"{causal[:, d].mean():.2f}" for d in range(2)))
            else:
                cells.append("")
            cells.append(f"{np.mean([r.table[methods.index(method)]['wall_s'] for r in results]):.2f}")
        out.append("| " + " | ".join([method, *cells]) + " |")
    unranked = {m: sum(m in c.unranked for c in curves) for m in methods}
    notes = ", ".join(f"{m} on {n}" for m, n in unranked.items() if n)
    out += ["", "Fractions are over regions and both fills."
            + (f" Constant maps (no ranking, scored as the random floor): {notes} of {len(results)} regions."
               if notes else ""), ""]
    return out


def save_figure(result, path: str, title: str) -> None:
    """Deletion and insertion curves (patch-bank fill, Dice) of every method for one region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_pdcr.plotting.faithfulness import plot_faithfulness_curves

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        plot_faithfulness_curves(result.curves, ax, direction, "patch_bank", "dice")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
