"""MiSuRe in the region widget's Compare methods (Qt under Xvfb): offered by name, its map in the grid."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

SCREENSHOT = os.environ.get("PDCR_MISURE_SCREENSHOT")  # e.g. /tmp/misure_grid.png


def test_compare_methods_runs_misure_and_shows_its_map(make_napari_viewer, qtbot):
    from napari_pdcr import AttributionMap
    from napari_pdcr._napari.layers import FLIPPED_COLORMAP_NAME, METADATA_KEY

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-pdcr", "colin27_slice")
    viewer.layers["colin27_slice brain mask"].visible = False
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    region = widget.brush_region()
    region.brush_size = 8
    for centre in [(66, 56), (70, 60), (74, 64)]:
        region.paint(centre, 1, refresh=False)
    region.refresh()
    widget.curve_steps.setValue(4)
    assert widget.compared["misure"].text() == "MiSuRe"
    for name, box in widget.compared.items():
        box.setChecked(name in ("misure", "gradient_x_input"))

    widget.compare()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    comparison = widget.comparison
    assert comparison is not None, widget.progress.format()
    explanation = comparison.maps["misure"]
    assert isinstance(explanation, AttributionMap) and explanation.sign == "positive_supports"
    layer = next(layer for layer in viewer.layers
                 if layer.metadata.get(METADATA_KEY, {}).get("explanation") is explanation)
    assert layer.colormap.name == FLIPPED_COLORMAP_NAME  # positive supports: drawn red like the other maps
    sufficient = explanation.extras["sufficient_mask"].astype(bool)
    assert 0 < sufficient.sum() < sufficient.size and np.isfinite(explanation.attribution).all()
    if SCREENSHOT:
        qtbot.wait(500)
        viewer.screenshot(SCREENSHOT, canvas_only=False, flash=False)
