"""Figures of a region explanation: block counts, effect histogram, effect vs distance, overlay."""

from __future__ import annotations

import numpy as np

from napari_pdcr.outcomes import outcome_unit
from napari_pdcr.plotting.style import (
    EFFECT_CMAP,
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    ZERO_COLOR,
    symmetric_limit,
)


def plot_block_counts(explanation, ax) -> None:
    """Bar chart of the fractions of positive / negative / zero blocks."""
    counts = explanation.counts()
    total = max(1, sum(counts.values()))
    names = ["negative", "zero", "positive"]
    ax.bar(names, [counts[n] / total for n in names], color=[NEGATIVE_COLOR, ZERO_COLOR, POSITIVE_COLOR])
    ax.set_ylabel("fraction of blocks")
    ax.set_ylim(0, 1)
    ax.set_title("block effects")


def plot_histogram(explanation, ax) -> None:
    """Histogram of block effects with the published bin edges."""
    edges, counts = explanation.histogram()
    labels = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if np.isinf(lo):
            labels.append(f"<{hi:g}")
        elif np.isinf(hi):
            labels.append(f">{lo:g}")
        else:
            labels.append(f"{lo:g}..{hi:g}")
    colours = [
        NEGATIVE_COLOR if hi <= 0 else POSITIVE_COLOR if lo >= 0 else ZERO_COLOR
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    ax.bar(range(len(counts)), counts, color=colours)
    ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right")
    ax.set_ylabel("blocks")
    ax.set_title(f"effect histogram ({outcome_unit(explanation.parameters)})")


def plot_effect_vs_distance(explanation, ax, unit: str = "") -> None:
    """Mean |effect| per distance bin (bars) and the cumulative share of |effect| (line)."""
    curve = explanation.effect_vs_distance()
    edges = curve["bin_edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, curve["mean_abs_effect"], width=np.diff(edges) * 0.9, color="#7f8c8d")
    ax.set_xlabel(f"distance from target region{f' ({unit})' if unit else ''}")
    ax.set_ylabel("mean |effect|")
    twin = ax.twinx()
    twin.plot(edges[1:], curve["cumulative_share"], color="#d35400", marker="o", ms=3)
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("cumulative share of |effect|", color="#d35400")
    ax.set_title("effect vs distance")


def plot_overlay(explanation, image: np.ndarray, ax, slice_index: int | None = None) -> None:
    """The ATE map over the image (2D, or one slice of a 3D volume), target region outlined."""
    ate, region = explanation.ate, explanation.target_region
    if ate.ndim == 3:
        z = int(np.argwhere(region)[:, 0].mean()) if slice_index is None else slice_index
        ate, region, image = ate[z], region[z], image[z]
    m = symmetric_limit(ate)
    ax.imshow(image, cmap="gray")
    shown = np.ma.masked_where(ate == 0, ate)
    im = ax.imshow(shown, cmap=EFFECT_CMAP, vmin=-m, vmax=m, alpha=0.75)
    ax.contour(region, levels=[0.5], colors="yellow", linewidths=1)
    ax.set_axis_off()
    ax.set_title("ATE (red: supports, blue: hurts)")
    return im


def explanation_figure(explanation, image: np.ndarray, title: str = ""):
    """A 2x2 summary figure: overlay, counts, histogram, effect vs distance."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    im = plot_overlay(explanation, image, axes[0, 0])
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046, pad=0.04, label="ATE")
    plot_block_counts(explanation, axes[0, 1])
    plot_histogram(explanation, axes[1, 0])
    plot_effect_vs_distance(explanation, axes[1, 1], unit="mm" if explanation.spacing else "voxels")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
