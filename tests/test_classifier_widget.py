"""A classifier through the region-effects dock widget (Qt under Xvfb): no region to paint, its map, and the
map's mask scored against the ground truth as a Labels layer."""

from __future__ import annotations

import numpy as np
import pytest
from classifier_networks import patch_classifier

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

SHAPE = (96, 96)
#: the window the classifier counts bright pixels in
WINDOW = (slice(24, 56), slice(40, 72))


def lesion_image() -> tuple[np.ndarray, np.ndarray]:
    """A textured 96 x 96 image with a bright disc (the "lesion") inside the classifier's window, and the disc."""
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]]
    lesion = (rows - 40) ** 2 + (cols - 56) ** 2 <= 10**2
    texture = 0.15 + 0.1 * np.sin(rows / 5.0) * np.cos(cols / 7.0)
    image = np.where(lesion, 0.9, texture).astype(np.float32)
    return image, lesion


def test_a_classifier_runs_through_the_widget_and_its_mask_is_scored(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_pdcr._napari.layers import METADATA_KEY

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    image, lesion = lesion_image()
    viewer.add_image(image, name="lesion slice", colormap="gray")
    viewer.add_labels(lesion.astype(np.uint8), name="lesion mask", opacity=0.4)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    widget.set_model(patch_classifier(SHAPE, WINDOW))
    widget.image_choice.select("lesion slice")
    widget.reference.select("lesion mask")
    widget.intervention.setCurrentText("zero")
    widget.outcome.setCurrentText("mean_logit")  # the disc saturates the probability: a block changes it < tau
    widget.block_size.setValue(8)
    assert widget.region_labels.layer() is None  # nothing painted: a classifier needs no target region

    start = len(notification_manager.records)
    widget.run()
    assert "target region" not in viewer.layers  # no paint prompt for a classifier
    qtbot.waitUntil(lambda: widget.worker is None and not widget.result_pending, timeout=120_000)
    qtbot.waitUntil(lambda: any("mask (Dice" in layer.name for layer in viewer.layers), timeout=10_000)

    explanation = widget.explanation
    assert explanation.model_identity["kind"] == "classifier"
    assert not explanation.target_region.any()
    # only blocks inside the window, where the disc is, change the class probability
    supported = explanation.block_effects < 0
    assert supported.any() and supported[3:7, 5:9].sum() == supported.sum()
    mask_layer = next(layer for layer in viewer.layers if "mask (Dice" in layer.name)
    score = mask_layer.metadata[METADATA_KEY]["segmentation_score"]
    assert score["pointing_hit"] and score["dice"] > 0.5, score
    assert mask_layer.data.shape == SHAPE and mask_layer.data.any()
    messages = [str(n.message) for n in notification_manager.records[start:]]
    assert any("as a segmentation of the ground truth" in m and "Dice" in m for m in messages), messages

    viewer.layers["lesion mask"].visible = False
    viewer.reset_view()
    qtbot.wait(300)
    path = tmp_path / "classifier_widget.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"\nscreenshot: {path}; {mask_layer.name}")



def test_compare_methods_runs_on_a_classifier_without_a_region(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    image, lesion = lesion_image()
    viewer.add_image(image, name="lesion slice", colormap="gray")
    viewer.add_labels(lesion.astype(np.uint8), name="lesion mask")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    widget.set_model(patch_classifier(SHAPE, WINDOW))
    widget.image_choice.select("lesion slice")
    widget.reference.select("lesion mask")
    widget.intervention.setCurrentText("zero")
    widget.outcome.setCurrentText("mean_logit")
    for name, box in widget.compared.items():
        box.setChecked(name in ("region_effects", "gradient_x_input"))
    widget.curve_steps.setValue(4)
    widget.compare()
    assert "target region" not in viewer.layers
    qtbot.waitUntil(lambda: widget.worker is None and widget.comparison is not None, timeout=180_000)
    assert set(widget.comparison.maps) == {"region_effects", "gradient_x_input"}
    assert all(row["ranked"] for row in widget.comparison.table)


def test_a_2d_model_on_a_stack_explains_the_slice_on_show(make_napari_viewer, qtbot):
    """The bundled lesion sample is a stack of 2D slices: a 2D classifier explains the slice on show, and the
    result layers sit on that slice (not on every slice); the map equals a console run on that slice."""
    from napari_pdcr import RegionEffects
    from napari_pdcr._napari.layers import METADATA_KEY
    from napari_pdcr.models.demo import load_demo_model

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    stack, masks = viewer.open_sample("napari-pdcr", "lesion_slices")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    widget.image_choice.select(stack.name)
    widget.model_choice.setCurrentText("lesion_cnn")  # the image made it pick a 3D model: the user chooses the 2D one
    widget.reference.select(masks.name)
    widget.intervention.setCurrentText("zero")
    widget.outcome.setCurrentText("mean_logit")
    widget.block_size.setValue(16)
    z = 41
    viewer.dims.set_current_step(0, z)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and not widget.result_pending, timeout=120_000)
    explanation = widget.explanation
    assert explanation is not None, widget.progress.format()
    assert explanation.ate.shape == stack.data.shape[1:]
    assert explanation.provenance["source_layer"]["slice"]["index"] == z
    expected = RegionEffects(load_demo_model("lesion_cnn"), "zero", "mean_logit", block_shape=16).attribute(
        stack.data[z][None].astype(np.float32), None, reference=masks.data[z] > 0)
    np.testing.assert_allclose(explanation.block_effects, expected.block_effects, atol=1e-4)
    results = [layer for layer in viewer.layers if METADATA_KEY in layer.metadata]
    assert results and all(layer.data.shape == (1, *stack.data.shape[1:]) for layer in results)
    for layer in results:  # on slice z of the stack, in its world coordinates
        np.testing.assert_allclose(layer.translate[0], stack.translate[0] + z * stack.scale[0])
        np.testing.assert_allclose(layer.scale, stack.scale)
        low, high = layer.extent.world[:, 0]  # it spans that one slice of the stack, no other
        assert low == high == pytest.approx(stack.data_to_world([z, 0, 0])[0])
