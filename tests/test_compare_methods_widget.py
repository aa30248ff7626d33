"""Compare methods in the region widget (Qt under Xvfb): run, grid of maps with one colour
convention, curves and AUC table in the Results tab, cancel."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

SCREENSHOT = os.environ.get("PDCR_COMPARE_SCREENSHOT")  # e.g. docs/images/compare_methods.png
MISURE_SCREENSHOT = os.environ.get("PDCR_MISURE_SCREENSHOT")  # e.g. /tmp/misure_grid.png


@pytest.fixture
def widget(make_napari_viewer):
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
    # tiny budgets: big blocks, few draws, few curve steps
    widget.block_size.setValue(32)
    widget.n_screen.setValue(3)
    widget.n_estimate.setValue(4)
    widget.curve_steps.setValue(4)
    for name, box in widget.compared.items():
        box.setChecked(name in ("region_effects", "seg_grad_cam", "gradient_x_input"))
    return widget


def wait_until_idle(qtbot, widget, timeout_s=240):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=int(timeout_s * 1000))


def test_compare_methods_shows_the_maps_in_a_grid_and_the_curves(widget, qtbot):
    from napari_pdcr import AttributionMap, RegionExplanation
    from napari_pdcr._napari.layers import EFFECT_COLORMAP_NAME, FLIPPED_COLORMAP_NAME, METADATA_KEY
    from napari_pdcr.metrics.faithfulness import RANDOM

    viewer = widget.viewer
    progress = []
    widget.compare()
    assert not widget.compare_button.isEnabled() and not widget.run_button.isEnabled()
    assert widget.cancel_button.isEnabled()
    widget.worker.yielded.connect(lambda p: progress.append(p.stage))
    wait_until_idle(qtbot, widget)
    comparison = widget.comparison
    assert comparison is not None, widget.progress.format()
    assert list(comparison.maps) == ["region_effects", "seg_grad_cam", "gradient_x_input"]
    # progress came from every method and from the curves
    assert any(s.startswith("region_effects") for s in progress) and any(s.startswith("curves") for s in progress)
    # region effects ran with the widget's settings
    assert comparison.maps["region_effects"].parameters["n_estimate"] == 4
    assert comparison.maps["region_effects"].block_shape == (32, 32)

    # grid mode, one cell (image, map, target outline) per method, at the bottom of the layer list
    assert viewer.canvas.grid.enabled and viewer.canvas.grid.stride == 3
    cells = list(viewer.layers)[:9]
    assert [layer.name for layer in cells[1::3]] == list(comparison.maps)
    for layer, (name, explanation) in zip(cells[1::3], comparison.maps.items(), strict=True):
        assert layer.metadata[METADATA_KEY]["explanation"] is explanation
        low, high = layer.contrast_limits
        assert low == -high > -np.inf and high > 0
        # one colour convention: the supporting sign red (ATE: negative; gradient maps: positive)
        flipped = isinstance(explanation, AttributionMap)
        assert layer.colormap.name == (FLIPPED_COLORMAP_NAME if flipped else EFFECT_COLORMAP_NAME), name
        assert isinstance(explanation, RegionExplanation) or explanation.sign == "positive_supports"
    # the Results tab: summary, and a figure of curves and the AUC table
    assert widget.tabs.currentIndex() == 1
    assert "Compared 3 methods" in widget.comparison_summary.text()
    assert "No result yet" not in widget.summary.text() and "Method comparison below" in widget.summary.text()
    assert widget.comparison_plot.image is not None
    figure = widget.comparison_plot.figure
    legend_texts = [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    assert len(legend_texts) == 4 and legend_texts[-1].startswith(RANDOM)
    assert [row["method"] for row in comparison.table] == [*comparison.maps, RANDOM]
    assert widget.compare_button.isEnabled() and widget.run_button.isEnabled()

    # one grid cell per method and no other: the painted region is hidden like the image (each cell has both)
    grid, layers = viewer.canvas.grid, viewer.layers
    cells_shown = {grid.position(i, layers) for i, layer in enumerate(layers) if layer.visible}
    assert len(cells_shown) == len(comparison.maps), cells_shown
    assert not viewer.layers["target region"].visible

    qtbot.wait(500)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(int)
    assert (rgb[..., 0] > rgb[..., 2] + 50).sum() > 200  # red (supporting) blocks show in the grid
    if SCREENSHOT:
        viewer.screenshot(SCREENSHOT, canvas_only=False, flash=False)


def test_compare_methods_can_be_cancelled_and_needs_a_method(widget, qtbot):
    viewer = widget.viewer
    names_before = [layer.name for layer in viewer.layers]
    widget.compared["region_effects"].setChecked(True)
    widget.n_estimate.setValue(50)

    def cancel_once_estimating(progress):
        if progress.stage.startswith("region_effects") and widget.cancel_button.isEnabled():
            widget.cancel()

    widget.compare()
    worker = widget.worker
    worker.yielded.connect(cancel_once_estimating)
    widget.compare()  # refused: still the same worker
    assert widget.worker is worker
    wait_until_idle(qtbot, widget)
    assert widget.comparison is None and "cancelled" in widget.progress.format()
    assert [layer.name for layer in viewer.layers] == names_before and not viewer.canvas.grid.enabled

    for box in widget.compared.values():
        box.setChecked(False)
    widget.compare()
    assert widget.worker is None and widget.comparison is None


def test_compare_methods_runs_misure_and_shows_its_map(widget, qtbot):
    """MiSuRe is offered by name; its map joins the grid with the one colour convention."""
    from napari_pdcr import AttributionMap
    from napari_pdcr._napari.layers import FLIPPED_COLORMAP_NAME, METADATA_KEY

    viewer = widget.viewer
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
    if MISURE_SCREENSHOT:
        qtbot.wait(500)
        viewer.screenshot(MISURE_SCREENSHOT, canvas_only=False, flash=False)
