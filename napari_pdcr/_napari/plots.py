"""Summary plots of an explanation for the dock widget (matplotlib, shown in Qt).

The figure is drawn with matplotlib's Agg canvas by :func:`render_plots`, which needs no
Qt and runs in the widget's worker thread (drawing three annotated plots takes a few
hundred milliseconds, which would otherwise freeze the viewer); :class:`EffectPlots`
only displays the finished image. The plots themselves come from
:mod:`napari_pdcr.plotting`.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy

from napari_pdcr.explanation import RegionExplanation
from napari_pdcr.plotting import plot_block_counts, plot_effect_vs_distance, plot_histogram

#: Small fonts: the dock is ~350 px wide.
_STYLE = {"font.size": 7, "axes.titlesize": 8, "axes.labelsize": 7, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5}
#: Height / width of the figure.
ASPECT = 1.9


def _label_bars(ax, fmt: str) -> None:
    """Write each bar's height above it (small bars next to a big one stay readable)."""
    for bar in ax.patches:
        height = bar.get_height()
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=6.5,
            xytext=(0, 1),
            textcoords="offset points",
        )


def draw_explanation_plots(figure: Figure, explanation: RegionExplanation) -> None:
    """Draw the block fractions, the published effect histogram and effect vs distance on ``figure``."""
    figure.clear()
    with matplotlib.rc_context(_STYLE):
        counts_ax, hist_ax, dist_ax = figure.subplots(3, 1, height_ratios=(0.8, 1, 1))
        plot_block_counts(explanation, counts_ax)
        _label_bars(counts_ax, "{:.1%}")
        counts_ax.set_ylim(0, 1.2)
        plot_histogram(explanation, hist_ax)
        _label_bars(hist_ax, "{:.0f}")
        hist_ax.margins(y=0.15)
        plot_effect_vs_distance(explanation, dist_ax, unit="mm" if explanation.spacing else "voxels")


def render_plots(explanation: RegionExplanation, width_px: int = 360, scale: float = 1.0) -> np.ndarray:
    """The plots as an RGBA image ``(H, W, 4)`` uint8, ``width_px`` logical pixels wide at ``scale`` (HiDPI)."""
    dpi = 100 * scale
    figure = Figure(figsize=(width_px / 100, ASPECT * width_px / 100), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    draw_explanation_plots(figure, explanation)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba()).copy()


class EffectPlots(QLabel):
    """Shows an image from :func:`render_plots` at its natural size (rendered for the dock's width).

    No rescaling on resize: a size that follows the width inside a scroll area can
    oscillate with the scroll bar.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        self.image: np.ndarray | None = None

    def show_image(self, rgba: np.ndarray, scale: float = 1.0) -> None:
        self.image = np.ascontiguousarray(rgba)
        height, width = self.image.shape[:2]
        buffer = self.image.tobytes()  # must outlive the QImage, which does not copy it
        pixmap = QPixmap.fromImage(QImage(buffer, width, height, 4 * width, QImage.Format.Format_RGBA8888))
        pixmap.setDevicePixelRatio(scale)
        self.setPixmap(pixmap)
        self.setFixedSize(int(width / scale), int(height / scale))

    def clear(self) -> None:
        self.image = None
        super().clear()
