"""The Components dock widget: a run in a napari worker, the bar chart, cancel, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import LocalConv, random_image, wrap

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

SHAPE = (32, 32)


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    from napari_pdcr._napari.components_widget import ComponentsWidget

    viewer = make_napari_viewer()
    viewer.add_image(random_image(SHAPE, seed=1), name="image")
    viewer.add_image(np.stack([random_image(SHAPE, seed=s) for s in range(2, 8)]), name="others")
    region = np.zeros(SHAPE, np.uint8)
    region[12:20, 12:20] = 1
    viewer.add_labels(region, name="region")
    widget = ComponentsWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model(wrap(LocalConv(layers=3, width=4, seed=3), 2, activation="sigmoid", name="local"))
    widget.image_choice.select("image")
    widget.region_choice.select("region")
    widget.bank_choice.select("others")
    widget.n_estimate.setValue(6)
    widget.device.setCurrentText("cpu")
    return widget


def test_run_in_a_worker_shows_the_bar_chart(widget, qtbot):
    widget.list_components()  # the model is loaded and probed in a worker
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    listing = widget.listing.toPlainText()
    assert "net 0 (full res)" in listing and "Conv2d" in listing
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    result = widget.result
    assert result is not None and len(result.components) == 3
    assert result.parameters["intervention"]["name"] == "resample"
    assert result.parameters["n_bank_images"] == 6
    assert widget.progress.text().startswith("done") or widget.progress.value() == 1000
    ax = widget.plot.figure.axes[0]
    assert len(ax.get_yticklabels()) == 3 and "largest effect" in widget.summary.text()


def test_channels_cancel_and_save(widget, qtbot, tmp_path):
    widget.granularity.setCurrentText("channels")  # lists the layers in a worker
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.layer_choice.count() == 3
    widget.layer_choice.setCurrentText("net 2")
    widget.intervention.setCurrentText("noise")
    widget.n_estimate.setValue(2000)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value() > 0, timeout=30_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.result is None and "cancelled" in widget.progress.text()

    widget.n_estimate.setValue(4)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert [c.kind for c in widget.result.components] == ["channel"] * 4
    from napari_pdcr import ComponentExplanation

    path = widget.save_result(tmp_path / "channels")
    assert ComponentExplanation.load(path).names == widget.result.names


def test_scripted_model_message(widget, qtbot, monkeypatch):
    from napari_pdcr._napari import components_widget

    scripted = wrap(torch.jit.script(LocalConv(layers=2).net), 2, activation="sigmoid")
    widget.set_model(scripted)
    messages = []
    monkeypatch.setattr(components_widget, "show_error", messages.append)
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.result is None
    assert messages and "nn.Module" in messages[0] and "region effects" in messages[0]


def unet_like_result():
    """A component result with the demo U-Net's long stage names (encoder 4 and decoder 4 at the same resolution)."""
    from napari_pdcr import ComponentExplanation, NodeStatus
    from napari_pdcr.components import Component

    names = ["encoder 1 (1/2 res)", "encoder 2 (1/4 res)", "encoder 3 (1/8 res)", "encoder 4 (1/16 res)",
             "bottleneck (1/16 res)", "decoder 4 (1/8 res)", "decoder 3 (to 1/4 res)", "decoder 2 (to 1/2 res)",
             "decoder 1 (output, full res)"]
    n = len(names)
    rng = np.random.default_rng(0)
    return ComponentExplanation(
        components=[Component(name=name, path=f"net.{i}", kind="stage", module_type="Conv2d") for i, name in enumerate(names)],
        ate=10 * rng.normal(size=n), standard_error=np.abs(rng.normal(size=n)), raw_mean=rng.normal(size=n),
        n_draws=np.full(n, 50, np.int32), status=np.full(n, NodeStatus.ESTIMATED, np.int8), base_outcome=91.0,
        target_region=np.ones(SHAPE, bool), model_identity={"name": "unet2d", "sha256": "ab"},
        parameters={"method": "component_effects", "intervention": {"name": "resample"}},
    )


def test_chart_labels_fit_in_the_dock(make_napari_viewer, qtbot):
    """Every component name is drawn whole inside the figure, and the figure inside the visible Results tab."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(random_image(SHAPE, seed=1), name="image")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Components")
    widget.tabs.setCurrentIndex(1)
    qtbot.wait(100)
    result = unet_like_result()
    widget.present(result, widget.summary_text(result), widget.figure_step()(result))
    qtbot.wait(100)
    figure = widget.plot.figure
    renderer = figure.canvas.get_renderer()
    labels = figure.axes[0].get_yticklabels()
    assert sorted(label.get_text() for label in labels) == sorted(result.names)  # whole names, none dropped
    for label in labels:
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width, label.get_text()  # not clipped by the figure
    boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda b: b.y0)
    assert all(low.y1 <= high.y0 for low, high in zip(boxes, boxes[1:], strict=False))  # no two names overlap
    area = widget.tabs.currentWidget()
    assert widget.plot.width() <= area.viewport().width()  # the dock shows the whole figure (no horizontal clip)
