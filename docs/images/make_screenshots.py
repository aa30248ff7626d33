"""Regenerate the user guide's screenshots (needs a display: run under ``xvfb-run -a``).

    xvfb-run -a -s "-screen 0 1600x1100x24" python docs/images/make_screenshots.py [--only 2d|3d|components|status|classifier|models]

(the screen must be larger than the 1400 x 1000 window: xvfb-run's default 1280 x 1024 cuts the dock off).

Drives the dock widget as a user would (open the sample, brush a region, Run) and saves
PNGs next to this script.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_pdcr._napari.components_widget import ComponentsWidget
from napari_pdcr._napari.viewer import view_in_3d
from napari_pdcr._napari.widget import RegionEffectsWidget
from napari_pdcr.cli import demo_target_region

HERE = Path(__file__).resolve().parent


def settle(seconds: float = 0.5) -> None:
    app = QApplication.instance()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def open_viewer(sample: str):
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    viewer.open_sample("napari-pdcr", sample)
    viewer.layers[f"{sample} brain mask"].visible = False
    widget = RegionEffectsWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right", name="Region effects (ATE map)")
    return viewer, widget


def run(widget, timeout_s: float = 1800) -> None:
    widget.run()
    start = time.perf_counter()
    while (widget.worker is not None or widget.result_pending) and time.perf_counter() - start < timeout_s:
        settle(0.1)
    settle(1.0)


def grab(viewer, name: str, scale: float = 0.8) -> None:
    from qtpy.QtCore import Qt

    pixmap = viewer.window._qt_window.grab()
    width = int(pixmap.width() * scale)
    pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation).save(str(HERE / name))
    print("wrote", HERE / name)


def shots_2d() -> None:
    viewer, widget = open_viewer("colin27_slice")
    region = widget.brush_region()
    region.brush_size = 7
    for y, x in [(60, 40), (64, 44), (68, 46), (72, 48)]:  # a patch of left frontal cortex
        region.paint((y, x), 1, refresh=False)
    region.refresh()
    region.mode = "pan_zoom"
    widget.block_size.setValue(8)
    widget.n_estimate.setValue(20)
    widget.show_prediction.setChecked(True)
    settle()
    grab(viewer, "widget_setup_2d.png")
    run(widget)
    viewer.layers.selection.active = viewer.layers["unet2d ATE: target region"]  # its controls, as after a click
    settle()
    grab(viewer, "widget_result_2d.png")
    _save_plot(widget.plot.image, "plots_2d.png")
    viewer.close()


def shots_status() -> None:
    """The block-status hatching: screened out (grey) vs tested (the map), few draws (orange)."""
    viewer, widget = open_viewer("colin27_slice")
    region = widget.paint_region_layer(viewer.layers["colin27_slice image"])
    region.data[demo_target_region(viewer.layers["colin27_slice brain mask"].data > 0)] = 1  # 32x32 at the left edge
    region.refresh()
    region.mode = "pan_zoom"
    widget.region_labels.select(region.name)
    widget.block_size.setValue(8)
    widget.n_estimate.setValue(20)
    widget.show_block_status.setChecked(True)
    run(widget)
    counts = widget.result.summary()["status_counts"]
    print("status counts", counts, "few draws", widget.result.summary()["few_draws"])
    grab(viewer, "uncertainty_status_layer.png")
    viewer.close()


def shots_classifier() -> None:
    """The bundled lesion classifier on the slice on show of the bundled lesion stack, its map scored
    against the lesion mask."""
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    stack, masks = viewer.open_sample("napari-pdcr", "lesion_slices")
    z = int(np.argmax(masks.data.reshape(len(masks.data), -1).sum(axis=1)))  # the slice with the largest lesion
    viewer.dims.set_current_step(0, z)
    widget = RegionEffectsWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right", name="Region effects (ATE map)")
    widget.model_choice.setCurrentText("lesion_cnn")  # a 2D model on a stack: it explains the slice on show
    widget.reference.select(masks.name)
    widget.intervention.setCurrentText("zero")
    widget.outcome.setCurrentText("mean_logit")  # the class probability saturates: a block changes it < tau
    widget.block_size.setValue(8)
    run(widget)
    masks.visible = False
    print("slice", z, [layer.name for layer in viewer.layers])
    grab(viewer, "classifier_widget.png")
    viewer.close()


def shots_models() -> None:
    """Four 2D demo models' ATE maps of one region in napari's grid mode (show_comparison)."""
    from napari_pdcr import compare_models
    from napari_pdcr._napari.viewer import show_comparison
    from napari_pdcr.models.demo import load_demo_model

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    image_layer, mask_layer = viewer.open_sample("napari-pdcr", "colin27_slice")
    mask_layer.visible = False
    mask = mask_layer.data > 0
    models = {name: load_demo_model(name) for name in ("unet2d", "segresnet2d", "shallow2d", "vit2d")}
    comparison = compare_models(models, image_layer.data[None].astype(np.float32), demo_target_region(mask),
                                reference=mask, region_effects={"intervention": "zero", "block_shape": 8},
                                component_effects=None, spacing=(1.0, 1.0))
    image_layer.visible = False
    show_comparison(viewer, comparison, image_layer=image_layer)
    viewer.reset_view()
    settle(1.5)
    grab(viewer, "model_comparison_napari.png")
    viewer.close()


def _save_plot(rgba, name: str) -> None:
    from matplotlib.image import imsave

    imsave(HERE / name, rgba)
    print("wrote", HERE / name)


def shots_3d() -> None:
    viewer, widget = open_viewer("colin27_volume")
    widget.model_choice.setCurrentText("unet3d")
    region = widget.brush_region()
    region.brush_size = 5
    for z in range(46, 54):  # a small blob at the brain's left edge, painted on 8 slices
        viewer.dims.set_current_step(0, z)
        for y, x in [(30, 14), (32, 16), (34, 18)]:
            region.paint((z, y, x), 1, refresh=False)
    region.refresh()
    region.mode = "pan_zoom"
    widget.block_size.setValue(8)
    widget.intervention.setCurrentText("zero")
    widget.show_prediction.setChecked(True)
    settle()
    run(widget)
    viewer.dims.set_current_step(0, 49)  # through the region
    settle()
    grab(viewer, "widget_result_3d_slice.png")
    view_in_3d(viewer, widget.result)  # what "View in 3D around the region" does
    settle(1.5)
    grab(viewer, "widget_result_3d_render.png")
    viewer.close()


def shots_components() -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample("napari-pdcr", "colin27_slice")
    viewer.layers["colin27_slice brain mask"].visible = False
    widget = ComponentsWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right", name="Components")
    region = widget.paint_region_layer(viewer.layers["colin27_slice image"])  # what the first Run creates
    region.data[60:76, 40:56] = 1  # 16x16 px of left frontal cortex
    region.refresh()
    region.mode = "pan_zoom"
    widget.region_choice.select("target region")
    widget.n_estimate.setValue(10)
    run(widget)
    grab(viewer, "components_widget.png", scale=1.0)
    viewer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("2d", "3d", "components", "status", "classifier", "models"))
    args = parser.parse_args()
    if args.only in (None, "2d"):
        shots_2d()
    if args.only in (None, "3d"):
        shots_3d()
    if args.only in (None, "components"):
        shots_components()
    if args.only in (None, "status"):
        shots_status()
    if args.only in (None, "classifier"):
        shots_classifier()
    if args.only in (None, "models"):
        shots_models()
