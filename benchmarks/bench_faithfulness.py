"""Faithfulness of causal region effects against the baselines, on the demo models.

For each model and each of ``--regions`` target regions (3D: ``--regions-3d``), drawn
reproducibly (seed 0): half centred on voxels of the brain mask's boundary, half on
voxels inside the mask (eroded by the largest half-size), square/cubic boxes of 16-48 px
(3D: 8-16 voxels); ``compare_methods`` explains the region with every method and scores
every map by deletion and insertion curves (fills: natural patches of other images, and
blur; outcomes: 100 x Dice against the model's own prediction, and soft Dice). Reported
per model and method: deletion / insertion AUC (mean and 95% interval over regions,
normal approximation), the fraction of regions on which the method beats random (both
directions), the fraction on which region effects beat each baseline and the reverse,
and the wall time per map. torch runs on one thread (``torch.set_num_threads(1)``); the
tables are rewritten after every region, so a run stopped early (``--minutes-per-model``
or by hand) keeps what it measured, and says how many regions it has.

The budgets of every costly setting are arguments, so that a cheaper run changes how
precisely, not what, is measured: points per curve, the causal mode and draws, RISE's
masks, MiSuRe's and integrated gradients' steps, and the 3D block size.

    # the full run (every shipped 2D demo model but the temperature series, and unet3d; issue budgets)
    python benchmarks/bench_faithfulness.py --out docs/faithfulness_results.md
    # the affordable settings recorded in docs/faithfulness_results.md (commands there; wall-time caps per model)
    python benchmarks/bench_faithfulness.py --models unet2d shallow2d unet3d --regions 20 \\
        --causal-mode fast --n-estimate 20 --n-estimate-3d 10 --occlusion-mode exact --n-steps 10 \\
        --n-steps-3d 5 --rise-masks 200 --rise-masks-3d 100 --misure-iterations 40 --misure-iterations-3d 20 \\
        --ig-steps 16 --ig-steps-3d 8 --block-3d 16 --out docs/faithfulness_results.md
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_pdcr import IntegratedGradients, MiSuRe, Occlusion, RegionEffects, Rise, compare_methods
from napari_pdcr.jobs import patch_bank
from napari_pdcr.metrics.faithfulness import DIRECTIONS, RANDOM
from napari_pdcr.models.demo import DEMO_MODELS, TEMPERATURE_SERIES, load_demo_model
from napari_pdcr.regions import centered_box
from napari_pdcr.samples import load_sample
from napari_pdcr.studies.methods import METHODS, methods_for

#: every shipped demo model but the temperature series (unet2d retrained at other temperatures)
MODELS = [name for name in DEMO_MODELS if name not in TEMPERATURE_SERIES]
SIZES = {2: (16, 48), 3: (8, 16)}
CAUSAL = "region_effects"


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


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--regions", type=int, default=20, help="target regions per 2D model")
    parser.add_argument("--regions-3d", type=int, default=None, help="target regions per 3D model (default --regions)")
    parser.add_argument("--minutes-per-model", type=float, nargs="+", default=None,
                        help="start no new region of a model after this many wall minutes of it: one value, or one "
                        "per model (default: no limit)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"from {', '.join(METHODS)} (default: every one that explains the model)")
    parser.add_argument("--causal-mode", default="exact", choices=("exact", "fast"))
    parser.add_argument("--n-estimate", type=int, default=50, help="draws per block of region effects")
    parser.add_argument("--n-estimate-3d", type=int, default=None, help="the same in 3D (default --n-estimate)")
    parser.add_argument("--occlusion-mode", default="published", choices=("published", "exact"),
                        help="exact: the same occlusion map with region effects' exact accelerations")
    parser.add_argument("--n-steps", type=int, default=20, help="points per deletion / insertion curve")
    parser.add_argument("--n-steps-3d", type=int, default=None, help="points per curve in 3D (default --n-steps)")
    parser.add_argument("--rise-masks", type=int, default=1000)
    parser.add_argument("--rise-masks-3d", type=int, default=None, help="default --rise-masks")
    parser.add_argument("--misure-iterations", type=int, default=100)
    parser.add_argument("--misure-iterations-3d", type=int, default=None, help="default --misure-iterations")
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--ig-steps-3d", type=int, default=None, help="default --ig-steps")
    parser.add_argument("--block", type=int, default=8, help="block size (voxels) of region effects, occlusion, "
                        "MiSuRe's mask cells and the curves, in 2D")
    parser.add_argument("--block-3d", type=int, default=8, help="the same in 3D")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--figure", default="docs/images/faithfulness_curves.png")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def settings_for(args, dims: int) -> dict:
    """The budgets of one model's run (2D or 3D arguments)."""
    def pick(name):
        value = getattr(args, f"{name}_3d", None) if dims == 3 else None
        return getattr(args, name) if value is None else value

    return {"regions": args.regions if dims == 2 or args.regions_3d is None else args.regions_3d,
            "block": args.block if dims == 2 else args.block_3d, "n_steps": pick("n_steps"),
            "rise_masks": pick("rise_masks"), "misure_iterations": pick("misure_iterations"),
            "ig_steps": pick("ig_steps"), "n_estimate": pick("n_estimate")}


def build_methods(args, settings: dict, model, bank) -> list:
    """The compared methods, with this run's budgets (the others at their defaults)."""
    block, common = settings["block"], {"device": args.device}
    built = {
        CAUSAL: lambda: RegionEffects(model, intervention=bank, block_shape=block, mode=args.causal_mode,
                                      n_estimate=settings["n_estimate"], **common),
        "occlusion": lambda: Occlusion(model, block_shape=block, mode=args.occlusion_mode, **common),
        "rise": lambda: Rise(model, n_masks=settings["rise_masks"], **common),
        "integrated_gradients": lambda: IntegratedGradients(model, n_steps=settings["ig_steps"], **common),
        "misure": lambda: MiSuRe(model, cell_size=block, n_iterations=settings["misure_iterations"], **common),
    }
    return [built[name]() if name in built else name for name in args.methods or methods_for(model)]


def main():
    args = parse_arguments()
    torch.set_num_threads(1)
    header = [
        "Command: `" + " ".join(["python", *map(shlex.quote, sys.argv)]) + "`",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
        f"torch {torch.__version__}, device {args.device}.",
        f"Causal region effects: mode {args.causal_mode}, natural patches; occlusion: mode {args.occlusion_mode}.",
        "",
    ]
    limits = args.minutes_per_model or [None]
    if len(limits) not in (1, len(args.models)):
        raise SystemExit(f"--minutes-per-model takes one value or one per model ({len(args.models)}); got {len(limits)}")
    limits = dict(zip(args.models, limits * len(args.models) if len(limits) == 1 else limits, strict=True))
    done_models: list[str] = []
    figure_done = False
    for name in args.models:
        model = load_demo_model(name)
        sample = load_sample(DEMO_MODELS[name].sample)
        image = sample["image"][None]
        settings = settings_for(args, sample["image"].ndim)
        bank, _ = patch_bank(model, image, block_shape=settings["block"])
        methods = build_methods(args, settings, model, bank)
        regions = draw_regions(sample["mask"], settings["regions"])
        rows, lines, wall0, cpu0 = [], [], time.perf_counter(), time.process_time()
        for index, region in enumerate(regions):
            if limits[name] is not None and time.perf_counter() - wall0 > 60 * limits[name]:
                print(f"{name}: stopped after {index} of {len(regions)} regions (--minutes-per-model)", flush=True)
                break
            t0 = time.perf_counter()
            result = compare_methods(model, image, region, methods=methods, block_shape=settings["block"],
                                     n_steps=settings["n_steps"], device=args.device)
            rows.append(result)
            print(f"{name} region {index} ({int(region.sum())} px): {time.perf_counter() - t0:.1f} s; "
                  + ", ".join(f"{r['method']} {r['wall_s']:.1f}" for r in result.table if r["wall_s"] is not None),
                  flush=True)
            if not figure_done:
                save_figure(result, model.prepare_image(image).numpy(), region, args.figure,
                            f"{name}, region {index} ({int(region.sum())} px)")
                figure_done = True
            cost = (f"{len(rows)} of {len(regions)} regions drawn; wall {(time.perf_counter() - wall0) / 60:.1f} min, "
                    f"CPU {(time.process_time() - cpu0) / 60:.1f} min")
            lines = table(name, rows, settings, cost)
            if args.out:  # after every region, so that a stopped run keeps what it measured
                Path(args.out).write_text("\n".join(header + done_models + lines) + "\n")
        done_models += lines
    print("\n".join(header + done_models))


def table(name: str, results, settings: dict, cost: str) -> list[str]:
    """Markdown rows for one model: AUCs per fill (Dice outcome), beats random, causal beats method and the
    reverse, wall time; then the most faithful method per column."""
    curves = [r.curves for r in results]
    fills = curves[0].fills
    dice = curves[0].outcomes.index("dice")
    methods = list(results[0].maps)
    head = ["method"] + [f"{d} AUC ({f})" for d in DIRECTIONS for f in fills] + [
        "beats random (del / ins)", "causal beats it (del / ins)", "it beats causal (del / ins)", "wall s per map"]
    out = [f"### {name} ({len(results)} regions; Dice outcome; mean ± 95% interval)", "",
           f"Settings: blocks of {settings['block']} px, {settings['n_steps']} curve steps, region effects "
           f"{settings['n_estimate']} draws per block, RISE "
           f"{settings['rise_masks']} masks, MiSuRe {settings['misure_iterations']} iterations, integrated gradients "
           f"{settings['ig_steps']} steps. Cost: {cost}.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = {}
    for method in [*methods, RANDOM]:
        areas = np.stack([c.auc(method)[:, :, dice] for c in curves])  # (regions, direction, fill)
        means[method] = areas.mean(axis=0)
        cells = [interval(areas[:, d, f]) for d in range(2) for f in range(len(fills))]
        if method == RANDOM:
            cells += ["", "", "", ""]
        else:
            wins = np.stack([c.beats(method, RANDOM)[:, :, dice] for c in curves])  # (regions, direction, fill)
            cells.append(" / ".join(f"{wins[:, d].mean():.2f}" for d in range(2)))
            if CAUSAL in methods and method != CAUSAL:
                for a, b in ((CAUSAL, method), (method, CAUSAL)):
                    beaten = np.stack([c.beats(a, b)[:, :, dice] for c in curves])
                    cells.append(" / ".join(f"{beaten[:, d].mean():.2f}" for d in range(2)))
            else:
                cells += ["", ""]
            cells.append(f"{np.mean([r.table[methods.index(method)]['wall_s'] for r in results]):.2f}")
        out.append("| " + " | ".join([method, *cells]) + " |")
    best = []
    for d, direction in enumerate(DIRECTIONS):
        for f, fill in enumerate(fills):
            values = {m: means[m][d, f] for m in methods}
            top = (min if direction == "deletion" else max)(values.values())
            winners = [m for m, v in values.items() if abs(v - top) < 1e-9]
            named = "every method ties" if len(winners) == len(methods) else ", ".join(winners)
            best.append(f"{direction} ({fill}): {named} ({top:.3f}; random {means[RANDOM][d, f]:.3f})")
    unranked = {m: sum(m in c.unranked for c in curves) for m in methods}
    notes = ", ".join(f"{m} on {n}" for m, n in unranked.items() if n)
    out += ["", "Most faithful by mean AUC: " + "; ".join(best) + ".",
            "Fractions are over regions and both fills (ties count for neither)."
            + (f" Constant maps (no ranking, scored as the random floor): {notes} of {len(results)} regions."
               if notes else ""), ""]
    return out


def save_figure(result, image: np.ndarray, region: np.ndarray, path: str, title: str) -> None:
    """For one region (2D: the image; 3D: the region's middle slice): every method's map with the supporting
    sign red (scaled to [-1, 1], the target region outlined), then the deletion and insertion curves
    (patch-bank fill, Dice) of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_pdcr.plotting.faithfulness import plot_faithfulness_curves
    from napari_pdcr.plotting.style import EFFECT_CMAP

    maps = result.support_maps()
    where = () if region.ndim == 2 else (int(np.flatnonzero(region.any(axis=(1, 2))).mean()),)
    fig = plt.figure(figsize=(2 * max(len(maps), 5), 7.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.8])
    for ax, (name, support) in zip(np.atleast_1d(top.subplots(1, len(maps))), maps.items(), strict=True):
        ax.imshow(image[0][where], cmap="gray")
        # RdBu: negative red, so the supporting sign (positive here) is drawn as its negative
        ax.imshow(-support[where], cmap=EFFECT_CMAP, vmin=-1, vmax=1, alpha=0.7)
        ax.contour(region[where], levels=[0.5], colors="k", linewidths=0.8)
        ax.set_title(name + (" (no ranking)" if name in result.curves.unranked else ""), fontsize=9)
        ax.set_axis_off()
    top.suptitle(f"{title}: maps, supporting sign red (each scaled to its largest magnitude)", fontsize=10)
    for ax, direction in zip(bottom.subplots(1, 2, sharey=True), DIRECTIONS, strict=True):
        plot_faithfulness_curves(result.curves, ax, direction, "patch_bank", "dice")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
