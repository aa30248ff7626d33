"""Temperature study: what the training temperature does to the 2D demo U-Net.

The temperature series (``unet2d_T0.5``, ``unet2d_T1``, ``unet2d_T2``, ``unet2d_T4``:
``unet2d`` trained with the loss on ``sigmoid(z / T_train)``, same data, seed and steps;
``sample_data/train_demo_models.py``) is measured on:

- **held-out Dice**: the 9 held-out Colin27 slices and the 35 slices of the second subject
  (ITK), pooled per set, probability > 0.5;
- **calibration** on the ITK slices (every pixel): ECE (15 equal-width bins), adaptive
  ECE (15 equal-mass bins) and NLL of the model's own probabilities ``sigmoid(z / T_train)``,
  and after temperature scaling fitted on the Colin27 held-out slices;
- **robustness**: Dice (both sets pooled) under Gaussian noise (sigma 0.05, 0.1, 0.2),
  Gaussian blur (sigma 1, 2, 3 px), lower contrast (factor 0.7, 0.5, 0.3 about the image
  mean) and an intensity shift (+0.1, +0.2, +0.3); reported as the drop from clean Dice;
- **strategy profile** on the demo slice and region (``napari_pdcr.cli.demo_target_region``):
  region effects (natural patches, 8x8 blocks, screen 3 then ``--draws`` draws (default 50, as published), tau
  0.02, Dice against the brain mask) and component effects of the stages;
- a **temperature sweep** of ``unet2d_T1`` (soft Dice at T = 0.5, 1, 2, 4 and its
  calibrated T, shared draws) on the same slice and region.

Writes ``docs/images/temperature_study.png``, ``docs/images/temperature_strategies.png``,
``docs/images/temperature_sweep.png`` and the tables between the result markers of
``docs/temperature.md``. One torch thread (a shared 2-core machine):

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/temperature_study.py
    ... --quick   # 5 draws per block/component: a smoke run
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from napari_pdcr import Outcome, PatchBank, RegionEffects
from napari_pdcr.calibration import (
    calibration_measures,
    fit_temperature,
    iter_pixel_logits,
    store_temperature,
)
from napari_pdcr.cli import bank_from_stack, demo_target_region
from napari_pdcr.engine.estimator import drive
from napari_pdcr.models.demo import TEMPERATURE_SERIES, load_demo_model
from napari_pdcr.samples import colin27_split, load_sample
from napari_pdcr.studies.comparison import compare_models
from napari_pdcr.studies.temperature_sweep import temperature_sweep

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
DOC = ROOT / "docs" / "temperature.md"
START, END = "<!-- results: start (written by benchmarks/temperature_study.py) -->", "<!-- results: end -->"
LOCALITY_MM = 16.0


def corrupt(images: np.ndarray, kind: str, severity: float, seed: int = 0) -> np.ndarray:
    """``images`` ``(N, H, W)`` in [0, 1] under corruption ``kind`` at ``severity``."""
    if kind == "noise":
        return images + np.random.default_rng(seed).normal(0, severity, images.shape).astype(np.float32)
    if kind == "blur":
        return np.stack([gaussian_filter(image, severity) for image in images])
    if kind == "contrast":
        mean = images.mean(axis=(1, 2), keepdims=True)
        return mean + severity * (images - mean)
    if kind == "shift":
        return images + np.float32(severity)
    raise ValueError(f"unknown corruption {kind!r}")


CORRUPTIONS = {"noise": (0.05, 0.1, 0.2), "blur": (1.0, 2.0, 3.0), "contrast": (0.7, 0.5, 0.3), "shift": (0.1, 0.2, 0.3)}


def masks_of(model, images: np.ndarray) -> np.ndarray:
    """Predicted masks ``(N, H, W)`` (probability > 0.5, i.e. logit > 0: blind to T)."""
    with torch.inference_mode():
        return (model(torch.from_numpy(images[:, None].astype(np.float32)))[:, 0] > 0).numpy()


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum()))


def measure(name: str, t_train: float, colin: tuple, itk: tuple) -> dict:
    """Dice, calibration and robustness of one model of the series."""
    model = load_demo_model(name)
    row = {"model": name, "t_train": t_train}
    row["dice_colin"] = dice(masks_of(model, colin[0]), colin[1])
    row["dice_itk"] = dice(masks_of(model, itk[0]), itk[1])
    both_images, both_masks = np.concatenate([colin[0], itk[0]]), np.concatenate([colin[1], itk[1]])
    clean = dice(masks_of(model, both_images), both_masks)
    row["dice_drop"] = {
        kind: [clean - dice(masks_of(model, corrupt(both_images, kind, s)), both_masks) for s in severities]
        for kind, severities in CORRUPTIONS.items()
    }
    row["mean_drop"] = float(np.mean([d for drops in row["dice_drop"].values() for d in drops]))
    itk_pixels = drive(iter_pixel_logits(model, list(itk[0][:, None]), list(itk[1])))
    row["own"] = calibration_measures(itk_pixels, t_train)
    fit = fit_temperature(model, list(colin[0][:, None]), list(colin[1]))
    row["t_fit"] = fit.temperature
    row["fitted"] = calibration_measures(itk_pixels, fit.temperature)
    return row


def results_table(rows: list[dict]) -> str:
    lines = [
        "| model | T_train | Dice Colin27 held-out | Dice ITK | ECE (own T) | adaptive ECE | NLL | fitted T | ECE (fitted T) | "
        "NLL (fitted T) | Dice drop: noise | blur | contrast | shift | mean drop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        drops = " | ".join("/".join(f"{d:.3f}" for d in r["dice_drop"][kind]) for kind in CORRUPTIONS)
        lines.append(
            f"| `{r['model']}` | {r['t_train']:g} | {r['dice_colin']:.3f} | {r['dice_itk']:.3f} | {r['own'].ece:.4f} | "
            f"{r['own'].adaptive_ece:.4f} | {r['own'].nll:.4f} | {r['t_fit']:.2f} | {r['fitted'].ece:.4f} | "
            f"{r['fitted'].nll:.4f} | {drops} | {r['mean_drop']:.3f} |"
        )
    return "\n".join(lines)


def sweep_table(sweep) -> str:
    lines = [
        "| outcome temperature | base soft Dice | total \\|ATE\\| | \\|ATE\\| within 16 mm | negative | zero | positive |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sweep.table():
        lines.append(
            f"| {r['label']} | {r['base_outcome']:.1f} | {r['total_abs_effect']:.1f} | {100 * r['locality@16']:.0f}% | "
            f"{100 * r['negative']:.0f}% | {100 * r['zero']:.0f}% | {100 * r['positive']:.0f}% |"
        )
    return "\n".join(lines)


def study_figure(rows: list[dict], comparison):
    """Dice, calibration, robustness and strategy against the training temperature."""
    import matplotlib.pyplot as plt

    t = [r["t_train"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    dice_ax, ece_ax, drop_ax, strategy_ax = axes
    dice_ax.plot(t, [r["dice_colin"] for r in rows], "o-", label="Colin27 held-out")
    dice_ax.plot(t, [r["dice_itk"] for r in rows], "s-", label="ITK (second subject)")
    dice_ax.set_ylabel("Dice")
    dice_ax.set_title("held-out Dice", fontsize=9)
    ece_ax.plot(t, [r["own"].ece for r in rows], "o-", label="own T (= T_train)")
    ece_ax.plot(t, [r["fitted"].ece for r in rows], "s-", label="fitted T")
    ece_ax.set_ylabel("per-pixel ECE (ITK)")
    ece_ax.set_title("calibration", fontsize=9)
    for kind in CORRUPTIONS:
        drop_ax.plot(t, [np.mean(r["dice_drop"][kind]) for r in rows], "o-", label=kind)
    drop_ax.plot(t, [r["mean_drop"] for r in rows], "k^--", label="mean")
    drop_ax.set_ylabel("Dice drop (mean of 3 severities)")
    drop_ax.set_title("robustness to corruptions", fontsize=9)
    profiles = comparison.profiles
    strategy_ax.plot(t, [p.locality for p in profiles], "o-", label=f"|ATE| within {LOCALITY_MM:g} mm")
    strategy_ax.plot(t, [p.fractions["negative"] for p in profiles], "s-", label="negative blocks")
    strategy_ax.plot(t, [p.fractions["positive"] for p in profiles], "^-", label="positive blocks")
    strategy_ax.set_ylabel("share")
    strategy_ax.set_title("strategy on the demo region", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training temperature T_train")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 draws per block and component (smoke run)")
    parser.add_argument("--draws", type=int, default=50, help="draws per block / component that passes the screen (published: 50)")
    parser.add_argument("--no-doc", action="store_true", help="print only; write nothing under docs/")
    args = parser.parse_args()
    if args.quick:
        args.draws = 5
    torch.set_num_threads(1)
    matplotlib.use("Agg")
    started = time.perf_counter()

    stack, itk_stack = load_sample("colin27_slices"), load_sample("itk_slices")
    _, heldout = colin27_split()
    colin = (stack["image"][heldout], stack["mask"][heldout].astype(bool))
    itk = (itk_stack["image"], itk_stack["mask"].astype(bool))
    rows = [measure(name, t, colin, itk) for name, t in TEMPERATURE_SERIES.items()]
    print(results_table(rows), flush=True)

    sample = load_sample("colin27_slice")
    image, mask, spacing = sample["image"][None], sample["mask"].astype(bool), sample["spacing"]
    region = demo_target_region(mask)
    others = bank_from_stack(stack, sample.get("slice_index"))
    component_bank = np.stack([others[i] for i in np.linspace(0, len(others) - 1, 16).round().astype(int)])
    draws = dict(n_screen=3, n_estimate=args.draws, tau=0.02, seed=0, device="cpu")
    comparison = compare_models(
        {name: load_demo_model(name) for name in TEMPERATURE_SERIES},
        image, region, reference=mask, spacing=spacing, locality_distance=LOCALITY_MM, bank_images=component_bank,
        region_effects=dict(intervention=PatchBank(others, size=10_000, seed=0), block_shape=8, outcome="dice", mode="exact", **draws),
        component_effects=dict(intervention="resample", granularity="stages", outcome="dice", **draws),
    )
    print(comparison.to_markdown(), flush=True)

    model = load_demo_model("unet2d_T1")
    calibration = fit_temperature(model, list(colin[0][:, None]), list(colin[1]))
    store_temperature(model, calibration)
    sweep_options = dict(intervention=PatchBank(others, size=10_000, seed=0), block_shape=8, mode="exact", **draws)
    t0 = time.perf_counter()
    sweep = temperature_sweep(
        model, image, region, (0.5, 1.0, 2.0, 4.0), reference=mask, spacing=spacing, outcome="soft_dice", **sweep_options
    )
    sweep_seconds = time.perf_counter() - t0
    print(sweep_table(sweep), flush=True)
    # the same maps by one run per temperature: what sharing the draws saves
    t0, separate_passes, identical = time.perf_counter(), 0, True
    for t, shared in zip(sweep.temperatures, sweep.explanations, strict=True):
        alone = RegionEffects(model, outcome=Outcome("soft_dice", temperature=t), **sweep_options).attribute(
            image, region, mask, spacing
        )
        separate_passes += alone.forward_passes
        identical &= bool(np.array_equal(alone.block_effects, shared.block_effects))
    cost = (
        f"The sweep took {sweep.forward_passes} forward passes ({sweep_seconds:.0f} s); one run per temperature took "
        f"{separate_passes} ({time.perf_counter() - t0:.0f} s), {separate_passes / sweep.forward_passes:.1f}x as many, "
        f"for {'identical' if identical else 'DIFFERENT'} maps."
    )
    print(cost, flush=True)
    seconds = time.perf_counter() - started
    if args.no_doc:
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    study_figure(rows, comparison).savefig(IMAGES / "temperature_study.png", dpi=110)
    comparison.figure(image[0]).savefig(IMAGES / "temperature_strategies.png", dpi=90)
    sweep.figure(image[0]).savefig(IMAGES / "temperature_sweep.png", dpi=100)
    header = (
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d} by `OMP_NUM_THREADS=1 PYTHONPATH=. python "
        f"benchmarks/temperature_study.py{' --quick' if args.quick else ''}` (draws per block/component: "
        f"{args.draws}; torch {torch.__version__}, {platform.machine()} CPU, 1 thread, {seconds:.0f} s on a shared "
        "2-core machine). Do not edit by hand."
    )
    results = "\n\n".join([
        header,
        "### Dice, calibration and robustness\n\n" + results_table(rows),
        "![temperature study](images/temperature_study.png)",
        "### Strategy profiles on the demo slice and region (Dice outcome)\n\n" + comparison.to_markdown(),
        "![strategies](images/temperature_strategies.png)",
        f"### Temperature sweep of `unet2d_T1` (soft Dice; calibrated T = {calibration.temperature:.3f}, fitted on the "
        f"Colin27 held-out slices; {sweep.forward_passes} forward passes for all temperatures)\n\n" + sweep_table(sweep),
        cost,
        "![temperature sweep](images/temperature_sweep.png)",
    ])
    text = DOC.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(f"{before}{START}\n{results}\n{END}{after}")
    print(f"wrote {DOC} and figures in {IMAGES} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
