"""Plots of results for the dock widgets (matplotlib, shown in Qt).

Figures are drawn with matplotlib's Agg canvas in the dock style
(:func:`~napari_pdcr.plotting.style.dock_style`) by :func:`render`, which needs no Qt and
runs in the widget's worker thread (drawing three annotated plots takes a few hundred
milliseconds, which would otherwise freeze the viewer); :class:`EffectPlots` only
displays the finished figure. The plots themselves come from :mod:`napari_pdcr.plotting`.
"""

from __future__ import annotations

from functools import partial

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy

from napari_pdcr.plotting import (
    plot_block_counts,
    plot_components,
    plot_effect_vs_distance,
    plot_histogram,
)
from napari_pdcr.plotting.faithfulness import plot_auc_table, plot_faithfulness_curves
from napari_pdcr.plotting.style import dock_style

#: Height / width of the region-effects figure.
ASPECT = 2.1
#: Components shown in the bar chart, and its height per bar and for title and axis (pixels).
TOP_COMPONENTS, BAR_PX, FRAME_PX = 20, 20, 120
#: Fonts for the docks (points at 100 dpi): readable at the dock's ~300-420 px.
DOCK_FONTS = {"font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5, "xtick.labelsize": 8, "ytick.labelsize": 8}
#: Share of the total |effect| the distance axis must show (it ends where this is reached).
DISTANCE_COVERAGE = 0.999


def theme_style(theme: dict | None) -> dict:
    """matplotlib rc parameters for a napari theme (``plot_theme``'s colours), as napari-matplotlib styles plots."""
    if not theme:
        return {}
    background, text = theme["background"], theme["text"]
    return {
        "figure.facecolor": background, "axes.facecolor": background, "savefig.facecolor": background,
        "text.color": text, "axes.labelcolor": text, "axes.edgecolor": text, "axes.titlecolor": text,
        "xtick.color": text, "ytick.color": text, "grid.color": theme.get("grid", text),
        "legend.facecolor": background, "legend.edgecolor": text,
    }


def render(draw, width_px: int, height_px: int, scale: float = 1.0, theme: dict | None = None) -> Figure:
    """A figure of ``width_px`` x ``height_px`` logical pixels at ``scale`` (HiDPI), drawn by ``draw``.

    ``theme`` (background / text / grid colours) gives napari's look; None: matplotlib's.
    """
    figure = Figure(figsize=(width_px / 100, height_px / 100), dpi=100 * scale, layout="constrained")
    FigureCanvasAgg(figure)
    with dock_style(), matplotlib.rc_context({**DOCK_FONTS, **theme_style(theme)}):
        if theme:
            figure.set_facecolor(theme["background"])
        draw(figure)
        figure.canvas.draw()
    return figure


def _label_bars(ax, fmt: str) -> None:
    """Write each non-empty bar's height above it (small bars next to a big one stay readable)."""
    for bar in ax.patches:
        height = bar.get_height()
        if height == 0:
            continue
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=DOCK_FONTS["xtick.labelsize"] - 1,
            xytext=(0, 1),
            textcoords="offset points",
        )


def draw_explanation_plots(figure: Figure, explanation) -> None:
    """Draw the block fractions, the published effect histogram and effect vs distance on ``figure``."""
    counts_ax, hist_ax, dist_ax = figure.subplots(3, 1, height_ratios=(0.8, 1, 1))
    plot_block_counts(explanation, counts_ax)
    _label_bars(counts_ax, "{:.1%}")
    counts_ax.set_ylim(0, 1.2)
    plot_histogram(explanation, hist_ax)
    _label_bars(hist_ax, "{:.0f}")
    hist_ax.margins(y=0.15)
    if not explanation.target_region.any():  # a classifier's run: no region to measure distances from
        dist_ax.set_axis_off()
        dist_ax.text(0.5, 0.5, "no target region (a classifier's global output):\nno effect vs distance",
                     ha="center", va="center", transform=dist_ax.transAxes)
        return
    plot_effect_vs_distance(explanation, dist_ax, unit="mm" if explanation.spacing else "voxels")
    dist_ax.set_xlim(0, distance_extent(explanation))


def distance_extent(explanation) -> float:
    """Where the distance axis ends: the bin edge by which :data:`DISTANCE_COVERAGE` of the |effect| lies, plus a bin."""
    curve = explanation.effect_vs_distance()
    edges, share = np.asarray(curve["bin_edges"]), np.asarray(curve["cumulative_share"])
    if not np.isfinite(share).any() or share[-1] <= 0:
        return float(edges[-1])
    last = int(np.argmax(share >= DISTANCE_COVERAGE * share[-1]))
    return float(edges[min(last + 2, len(edges) - 1)])


def render_plots(explanation, width_px: int = 360, scale: float = 1.0, theme: dict | None = None) -> Figure:
    """The region-effects plots, ``width_px`` logical pixels wide, in the viewer's ``theme``."""
    return render(partial(draw_explanation_plots, explanation=explanation), width_px, ASPECT * width_px, scale, theme)


def render_component_plot(result, width_px: int = 360, scale: float = 1.0, theme: dict | None = None) -> Figure:
    """The sorted bar chart of a component-effects result, ``width_px`` logical pixels wide."""
    title = f"{result.model_identity.get('name', 'model')}: base outcome {result.base_outcome:.1f}"
    height = FRAME_PX + BAR_PX * min(len(result.components), TOP_COMPONENTS)

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        plot_components(result, ax, top=TOP_COMPONENTS, title=title)
        # the long component names push the axes right: end the axis label (and title) at its right edge,
        # so that the text runs left under the names instead of off the figure
        ax.set_xlabel(ax.get_xlabel(), loc="right")
        ax.set_title("")
        ax.set_title(title, loc="right")

    return render(draw, width_px, height, scale, theme)


def render_method_comparison(comparison, width_px: int = 360, scale: float = 1.0, theme: dict | None = None,
                             fill: str = "patch_bank") -> Figure:
    """The deletion and insertion curves (``fill``, Dice) and the AUC table of a method comparison."""
    n_rows = len(comparison.table)

    def draw(figure: Figure) -> None:
        deletion_ax, insertion_ax, table_ax = figure.subplots(3, 1, height_ratios=(1, 1, 0.12 + 0.07 * n_rows))
        plot_faithfulness_curves(comparison.curves, deletion_ax, "deletion", fill, legend=False)
        plot_faithfulness_curves(comparison.curves, insertion_ax, "insertion", fill)
        plot_auc_table(comparison.table, table_ax, fills=comparison.curves.fills)

    return render(draw, width_px, (1.45 + 0.06 * n_rows) * width_px, scale, theme)


class EffectPlots(QLabel):
    """Shows a figure from :func:`render` at its natural size (rendered for the dock's width).

    No rescaling on resize: a size that follows the width inside a scroll area can
    oscillate with the scroll bar. :attr:`figure` is the figure shown (e.g. to save it).
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.figure: Figure | None = None
        self.image: np.ndarray | None = None

    def show_figure(self, figure: Figure, scale: float = 1.0) -> None:
        self.figure = figure
        self.image = np.asarray(figure.canvas.buffer_rgba()).copy()
        height, width = self.image.shape[:2]
        buffer = self.image.tobytes()  # must outlive the QImage, which does not copy it
        pixmap = QPixmap.fromImage(QImage(buffer, width, height, 4 * width, QImage.Format.Format_RGBA8888))
        pixmap.setDevicePixelRatio(scale)
        self.setPixmap(pixmap)
        self.setFixedSize(int(width / scale), int(height / scale))

    def clear(self) -> None:
        self.figure = None
        self.image = None
        super().clear()
