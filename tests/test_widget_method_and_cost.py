"""The region widget's method chooser and time estimate (Qt under Xvfb).

Issue 12: the region widget offers the method (causal region effects, the baselines);
a single Run with a baseline shows its map with the one colour convention.
Issue 18: a cost estimate under Run before a run, updated when the settings change,
computed off the GUI thread.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

from test_napari_widget import dock, paint, set_parameters, wait_for_run  # noqa: E402

SCREENSHOT = os.environ.get("PDCR_METHOD_SCREENSHOT")  # e.g. /tmp/seg_grad_cam_run.png
CENTRES = [(66, 56), (70, 60), (74, 64)]


def wait_for_cost(qtbot, widget, previous: str | None = None) -> str:
    """Until the label shows a computed estimate (different from ``previous``); returns its text."""
    qtbot.waitUntil(lambda: widget.cost_label.text().startswith("Time: at most")
                    and widget.cost_label.text() != previous and widget._cost_worker is None, timeout=60_000)
    return widget.cost_label.text()


def blocks_in(text: str) -> int:
    return int(re.search(r"for (\d+) blocks", text).group(1))


def test_time_estimate_follows_the_settings(viewer_2d, qtbot):
    from napari_pdcr.jobs import model_input, resolve_model

    widget = dock(viewer_2d)
    qtbot.waitUntil(lambda: "Paint the target region" in widget.cost_label.text() or
                    "there is no target region" in widget.cost_label.text().lower(), timeout=10_000)
    region = widget.brush_region()
    paint(region, CENTRES)  # painting updates the estimate
    region.events.paint()
    text = wait_for_cost(qtbot, widget)
    # the same bound the console prints: the region-effects method's own estimate
    model = resolve_model("unet2d")
    image = model_input(np.asarray(viewer_2d.layers["colin27_slice image"].data, np.float32), model)
    method, _ = widget.make_job().method(model, image)
    expected = method.estimate_cost(image, region.data == 1)
    assert blocks_in(text) == expected.n_blocks
    assert f"{expected.passes} forward passes" in text
    # 8-px blocks and 53 draws each: minutes, so the label says what to change
    assert "choose fast mode or larger blocks" in text, text

    widget.mode.setCurrentText("fast")
    text = wait_for_cost(qtbot, widget, text)
    assert "choose larger blocks" in text and "fast mode" not in text

    widget.block_size.setValue(32)
    assert widget.cost_timer.isActive()  # the change schedules a new estimate, nothing runs on the spot
    qtbot.waitUntil(lambda: widget._cost_worker is not None, timeout=5_000)
    assert widget.cost_label.text() == "Time: estimating…"  # computed in a thread
    text = wait_for_cost(qtbot, widget, text)
    assert blocks_in(text) < expected.n_blocks / 10  # 16x fewer blocks of 32 px than of 8 px

    widget.method_choice.setCurrentText("Seg-Grad-CAM")
    qtbot.waitUntil(lambda: "no estimate for Seg-Grad-CAM" in widget.cost_label.text(), timeout=5_000)


def test_method_chooser_runs_a_baseline_with_the_one_colour_convention(viewer_2d, qtbot):
    from napari_pdcr import AttributionMap
    from napari_pdcr._napari.layers import EFFECT_COLORMAP_NAME, FLIPPED_COLORMAP_NAME, METADATA_KEY
    from napari_pdcr.jobs import model_input, resolve_model
    from napari_pdcr.methods.seg_grad_cam import SegGradCam
    from napari_pdcr.studies.methods import METHODS

    widget = dock(viewer_2d)
    labels = [widget.method_choice.itemText(i) for i in range(widget.method_choice.count())]
    assert widget.chosen_method() == "region_effects" and labels[0] == "Causal region effects"
    assert [widget.method_names[label] for label in labels] == list(METHODS)  # every method, baselines included
    assert {"Seg-Grad-CAM", "Integrated gradients", "Gradient x input", "Occlusion", "RISE"} <= set(labels)
    paint(widget.brush_region(), CENTRES)

    widget.method_choice.setCurrentText("Seg-Grad-CAM")
    assert not widget.intervention.isEnabled() and not widget.mode.isEnabled()  # region effects' settings only
    widget.show_prediction.setChecked(False)
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.cost_label.text() == ""  # the estimate made before the run is stale once it has run
    explanation = widget.result
    assert isinstance(explanation, AttributionMap) and explanation.method == "seg_grad_cam"
    layer = viewer_2d.layers["unet2d seg_grad_cam: target region"]
    assert layer.metadata[METADATA_KEY]["explanation"] is explanation
    # the map is the method's own, on the same image and region
    model = resolve_model("unet2d")
    image = model_input(np.asarray(viewer_2d.layers["colin27_slice image"].data, np.float32), model)
    direct = SegGradCam(model, seed=0, device="cpu").attribute(image, viewer_2d.layers["target region"].data == 1)
    np.testing.assert_allclose(layer.data, direct.attribution, rtol=1e-4, atol=1e-6)
    # one colour convention: a gradient map's positive (supporting) values are red; a legend in its units
    assert layer.colormap.name == FLIPPED_COLORMAP_NAME and layer.colorbar.visible
    low, high = layer.contrast_limits
    assert low == -high and high > 0
    assert "Seg-Grad-CAM" in widget.summary.text() and "red: supported the region" in widget.summary.text()
    assert widget.plot.image is None and widget.tabs.currentIndex() == 1
    qtbot.wait(300)
    shot = viewer_2d.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(int)
    assert (rgb[..., 0] > rgb[..., 2] + 50).sum() > 200  # red (supporting) pixels show over the image
    if SCREENSHOT:
        viewer_2d.screenshot(SCREENSHOT, canvas_only=False, flash=False)

    # occlusion takes the block size; the previous map of the image is hidden, as for ATE maps
    widget.method_choice.setCurrentText("Occlusion")
    assert widget.block_size.isEnabled()
    set_parameters(widget, block_size=32)
    widget.run()
    wait_for_run(qtbot, widget)
    assert widget.result.method == "occlusion" and np.all(np.asarray(widget.result.parameters["block_shape"]) == 32)
    occlusion = viewer_2d.layers["unet2d occlusion: target region"]
    assert occlusion.visible and not layer.visible

    # back to region effects: the ATE map, red for negative effects
    widget.method_choice.setCurrentText("Causal region effects")
    assert widget.intervention.isEnabled()
    set_parameters(widget, intervention="zero")
    widget.run()
    wait_for_run(qtbot, widget)
    ate = viewer_2d.layers["unet2d ATE: target region"]
    assert ate.colormap.name == EFFECT_COLORMAP_NAME and ate.colorbar.visible and not occlusion.visible
    assert widget.plot.image is not None
