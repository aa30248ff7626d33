"""Matplotlib figures of explanations (Qt-free: usable in scripts, the CLI and the docks)."""

from napari_pdcr.plotting.components import plot_components
from napari_pdcr.plotting.region_explanation import (
    explanation_figure,
    plot_block_counts,
    plot_effect_vs_distance,
    plot_histogram,
    plot_overlay,
)
from napari_pdcr.plotting.style import EFFECT_CMAP, symmetric_limit

__all__ = [
    "EFFECT_CMAP",
    "explanation_figure",
    "plot_block_counts",
    "plot_components",
    "plot_effect_vs_distance",
    "plot_histogram",
    "plot_overlay",
    "symmetric_limit",
]
