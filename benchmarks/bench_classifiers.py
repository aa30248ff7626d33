"""Lesion classifiers on the held-out subject: accuracy, heatmaps as segmentations, TW-style vs U-Net.

On the second subject's lesion set (:mod:`napari_pdcr.lesions`, never trained on):

1. classification accuracy of every lesion classifier (all held-out images);
2. for every method on every classifier, on ``--maps`` held-out lesion images: the
   heatmap's mask (Otsu, and the 0.98 quantile of the supporting values;
   :func:`napari_pdcr.metrics.segmentation.score_heatmap`) scored against the lesion
   mask (Dice, IoU), the pointing-game hit rate, and the wall time per map. Every method
   explains class 1 (lesion present);
3. the TW-style models' own heatmap segmentation (softmax over the class relevance maps)
   against the U-Nets trained on the same 5 / 20 masks (all held-out images);
4. a figure of maps and derived masks for three slices.

    PYTHONPATH=. OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_classifiers.py \\
        --out docs/classifiers_results.md --figure docs/images/classifiers.png

One torch thread; times are wall-clock seconds on whatever else the machine runs (the
per-method times compare methods within one run).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_pdcr.interventions import PatchBank
from napari_pdcr.lesions import HELDOUT_SUBJECT, lesion_split, make_lesion_set
from napari_pdcr.methods import IntegratedGradients, Lrp, Occlusion, RegionEffects, Rise, SegGradCam
from napari_pdcr.metrics.faithfulness import support_map
from napari_pdcr.metrics.segmentation import dice_and_iou, score_heatmap
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.outcomes import Outcome

CLASSIFIERS = ["lesion_cnn", "tw_lesion", "tw_lesion_px5", "tw_lesion_px20"]
THRESHOLDS = {"otsu": "otsu", "q0.98": 0.98}
LESION = 1  # the class explained
PROBABILITY = Outcome("mean_probability", channel=LESION)
LOGIT = Outcome("mean_logit", channel=LESION)


def methods(bank: PatchBank) -> dict:
    """Method name -> (class, options): each explains class 1 of a classifier."""
    return {
        "region effects": (RegionEffects, {"intervention": bank, "outcome": LOGIT, "block_shape": 8,
                                           "n_screen": 2, "n_estimate": 10, "tau": 0.1}),
        "occlusion": (Occlusion, {"outcome": LOGIT, "block_shape": 8}),
        "Grad-CAM": (SegGradCam, {"outcome": LOGIT}),
        "integrated gradients": (IntegratedGradients, {"outcome": LOGIT}),
        "RISE": (Rise, {"outcome": PROBABILITY, "n_masks": 300, "cell_size": 8}),
        "LRP": (Lrp, {"outcome": LOGIT}),
    }


def accuracy(name: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` ``(N, H, W)`` whose predicted class equals ``labels``."""
    with torch.no_grad():
        logits = load_demo_model(name)(torch.from_numpy(images)[:, None])
    return float((logits.argmax(1).numpy() == labels).mean())


def segmentation_masks(name: str, images: np.ndarray) -> np.ndarray:
    """Lesion masks ``(N, H, W)`` of a TW-style model (its own heatmap segmentation) or a U-Net."""
    model = load_demo_model(name)
    with torch.no_grad():
        x = torch.from_numpy(images)[:, None]
        if model.is_classifier:
            return (torch.softmax(model.network.segment(x), dim=1)[:, LESION] > 0.5).numpy()
        return (torch.sigmoid(model(x))[:, 0] > 0.5).numpy()


def segmentation_scores(masks: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> dict:
    """Pooled and mean per-image Dice on the lesion images, false-positive pixels per lesion-free image."""
    positive = labels == 1
    pooled, _ = dice_and_iou(masks[positive], truth[positive])
    per_image = [dice_and_iou(m, t)[0] for m, t in zip(masks[positive], truth[positive], strict=True)]
    return {"pooled_dice": pooled, "mean_dice": float(np.mean(per_image)),
            "fp_pixels_per_negative": float(masks[~positive].sum() / max(1, (~positive).sum()))}


def run_methods(heldout, positions, figure_positions, bank) -> tuple[list[dict], dict]:
    """One row per (classifier, method, image) and the maps of the first classifier for the figure."""
    rows, figure_maps = [], {}
    for classifier in CLASSIFIERS:
        model = load_demo_model(classifier)
        for method_name, (method_class, options) in methods(bank).items():
            method = method_class(model, device="cpu", **options)
            for position in positions:
                image, truth = heldout.images[position][None], heldout.lesion_masks[position] > 0
                start = time.perf_counter()
                explanation = method.attribute(image, None, truth)
                seconds = time.perf_counter() - start
                row = {"classifier": classifier, "method": method_name, "position": int(position), "seconds": seconds}
                for label, threshold in THRESHOLDS.items():
                    try:
                        mask, score = score_heatmap(explanation, truth, threshold=threshold)
                        row[label] = (score.dice, score.iou, score.pointing_hit)
                    except ValueError as error:  # a constant map or one without supporting values: no mask
                        mask, row[label] = None, (0.0, 0.0, False)
                        row["error"] = str(error)
                    if classifier == CLASSIFIERS[0] and label == "otsu":
                        figure_maps[method_name, int(position)] = (support_map(explanation), mask)
                rows.append(row)
            print(f"  {classifier:15s} {method_name:21s} {np.mean([r['seconds'] for r in rows[-len(positions):]]):6.2f} s/map",
                  flush=True)
    return rows, figure_maps


def summarise(rows: list[dict]) -> list[str]:
    """Markdown table: mean Dice / IoU / pointing hits per (classifier, method), both thresholds, time per map."""
    lines = ["| classifier | method | Dice (Otsu) | IoU (Otsu) | Dice (q 0.98) | IoU (q 0.98) | pointing hits | s / map | no mask |",
             "|---|---|---|---|---|---|---|---|---|"]
    for classifier in CLASSIFIERS:
        for method_name in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["classifier"] == classifier and r["method"] == method_name]
            if not group:
                continue
            otsu, quantile = np.array([r["otsu"] for r in group], float), np.array([r["q0.98"] for r in group], float)
            hits = int(otsu[:, 2].sum())
            failed = sum("error" in r for r in group)
            lines.append(
                f"| {classifier} | {method_name} | {otsu[:, 0].mean():.2f} | {otsu[:, 1].mean():.2f} | "
                f"{quantile[:, 0].mean():.2f} | {quantile[:, 1].mean():.2f} | {hits}/{len(group)} | "
                f"{np.mean([r['seconds'] for r in group]):.2f} | {failed} |"
            )
    return lines


def draw_figure(path: Path, heldout, positions, figure_maps, segmentations) -> None:
    """Rows: slices; columns: image with the lesion outline, each method's map of ``lesion_cnn`` with its
    Otsu mask outlined, then the TW-style (20 masks) and U-Net (20 masks) segmentations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_pdcr.plotting.style import symmetric_limit

    method_names = list(dict.fromkeys(name for name, _ in figure_maps))
    columns = ["image + lesion", *method_names, *segmentations]
    fig, axes = plt.subplots(len(positions), len(columns), figsize=(1.55 * len(columns), 1.95 * len(positions)),
                             squeeze=False)
    for row, position in enumerate(positions):
        image, truth = heldout.images[position], heldout.lesion_masks[position]
        for col, title in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if col == 0:
                ax.contour(truth, [0.5], colors="yellow", linewidths=0.7)
            elif title in method_names:
                support, mask = figure_maps[title, int(position)]
                limit = symmetric_limit(support)
                ax.imshow(support, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.75)
                if mask is not None and mask.any():
                    ax.contour(mask, [0.5], colors="black", linewidths=0.7)
                ax.contour(truth, [0.5], colors="yellow", linewidths=0.5, linestyles="dotted")
            else:
                mask = segmentations[title][position]
                if mask.any():
                    ax.contour(mask, [0.5], colors="red", linewidths=0.7)
                ax.contour(truth, [0.5], colors="yellow", linewidths=0.5, linestyles="dotted")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle("Held-out lesion slices. Methods on lesion_cnn: supporting evidence red, Otsu mask black; "
                 "segmentations red; lesion yellow (dotted)", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=16, help="held-out lesion images explained per classifier")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown results here")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    heldout = make_lesion_set(HELDOUT_SUBJECT, copies=4, seed=0)
    train, _ = lesion_split(train_copies=2)
    bank = PatchBank(train.images[train.labels == 0][:, None], size=2000, seed=0)  # healthy training tissue
    positives = np.flatnonzero(heldout.labels == 1)
    positions = positives[np.linspace(0, len(positives) - 1, args.maps).round().astype(int)]

    lines = [f"Held-out subject: {len(heldout)} images ({int(heldout.labels.sum())} with a lesion); "
             f"maps on {args.maps} lesion images; {args.threads} torch thread(s), {platform.processor() or platform.machine()}.",
             "", "## Classification accuracy (held-out subject)", "", "| classifier | accuracy |", "|---|---|"]
    for name in CLASSIFIERS:
        lines.append(f"| {name} | {accuracy(name, heldout.images, heldout.labels):.3f} |")

    segmentations = {}
    lines += ["", "## Own segmentation: TW-style heatmap vs U-Net on the same masks (held-out subject)", "",
              "| model | pixel labels | pooled Dice | mean Dice per lesion image | false-positive pixels per lesion-free image |",
              "|---|---|---|---|---|"]
    for name, n_masks in (("tw_lesion", 0), ("tw_lesion_px5", 5), ("unet_lesion_px5", 5),
                          ("tw_lesion_px20", 20), ("unet_lesion_px20", 20)):
        masks = segmentation_masks(name, heldout.images)
        segmentations[name] = masks
        s = segmentation_scores(masks, heldout.lesion_masks > 0, heldout.labels)
        lines.append(f"| {name} | {n_masks} | {s['pooled_dice']:.3f} | {s['mean_dice']:.3f} | {s['fp_pixels_per_negative']:.1f} |")

    print("methods:", flush=True)
    figure_positions = positions[[0, len(positions) // 2, -1]]
    rows, figure_maps = run_methods(heldout, positions, figure_positions, bank)
    lines += ["", "## Heatmaps as segmentations (mean over the explained lesion images)", "", *summarise(rows)]
    errors = sorted({r["error"] for r in rows if "error" in r})
    if errors:
        lines += ["", "Maps that gave no mask (scored 0): " + "; ".join(errors)]
    lines += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.figure:
        draw_figure(args.figure, heldout, figure_positions, figure_maps,
                    {"TW px20 own seg.": segmentations["tw_lesion_px20"], "U-Net px20": segmentations["unet_lesion_px20"]})


if __name__ == "__main__":
    main()
