"""What the two dock widgets share: one base, models loaded off the GUI thread, one plot style."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from synthetic import LocalConv, random_image, wrap

pytest.importorskip("qtpy")
pytestmark = pytest.mark.gui

SHAPE = (32, 32)


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(random_image(SHAPE, seed=1), name="image")
    viewer.add_image(np.stack([random_image(SHAPE, seed=s) for s in range(2, 6)]), name="others")
    region = np.zeros(SHAPE, np.uint8)
    region[12:20, 12:20] = 1
    viewer.add_labels(region, name="region")
    return viewer


@pytest.fixture
def loads(monkeypatch):
    """Records, for every model resolution of a job, whether it ran on the GUI (main) thread."""
    from napari_pdcr import jobs

    on_gui_thread = []
    resolve = jobs.resolve_model

    def recording(model, trusted=False):
        on_gui_thread.append(threading.current_thread() is threading.main_thread())
        return resolve(model, trusted=trusted)

    monkeypatch.setattr(jobs, "resolve_model", recording)
    return on_gui_thread


def small_model():
    return wrap(LocalConv(layers=3, width=4, seed=3), 2, activation="sigmoid", name="local")


def finish(qtbot, widget):
    """Until the run has ended and its result is shown (a run's layers come in over several turns)."""
    qtbot.waitUntil(lambda: widget.worker is None and not widget.result_pending, timeout=60_000)


def test_components_widget_loads_models_in_workers(viewer, qtbot, loads):
    from napari_pdcr._napari.base_widget import DockWidget
    from napari_pdcr._napari.components_widget import ComponentsWidget
    from napari_pdcr._napari.plots import DOCK_FONTS as DOCK_STYLE

    widget = ComponentsWidget(viewer)
    qtbot.addWidget(widget)
    assert isinstance(widget, DockWidget)
    widget.set_model(small_model())
    widget.region_choice.select("region")
    widget.bank_choice.select("others")
    widget.device.setCurrentText("cpu")
    widget.n_estimate.setValue(3)

    widget.list_components()
    assert widget.worker is not None and not widget.settings_panel().isEnabled()  # loading in a worker
    finish(qtbot, widget)
    assert "net 0 (full res)" in widget.listing.toPlainText()
    widget.granularity.setCurrentText("channels")
    finish(qtbot, widget)
    assert widget.layer_choice.count() == 3
    widget.granularity.setCurrentText("stages")
    widget.run()
    finish(qtbot, widget)
    assert widget.result is not None
    assert len(loads) == 3 and not any(loads), loads

    ax = widget.plot.figure.axes[0]
    assert ax.title.get_fontsize() == DOCK_STYLE["axes.titlesize"]
    assert ax.get_yticklabels()[0].get_fontsize() == DOCK_STYLE["ytick.labelsize"]


def test_region_widget_runs_a_model_set_from_the_console(viewer, qtbot, loads):
    from napari_pdcr._napari.base_widget import DockWidget
    from napari_pdcr._napari.plots import DOCK_FONTS as DOCK_STYLE
    from napari_pdcr._napari.widget import RegionEffectsWidget

    widget = RegionEffectsWidget(viewer)
    qtbot.addWidget(widget)
    assert isinstance(widget, DockWidget)
    widget.set_model(small_model())
    widget.region_labels.select("region")
    widget.intervention.setCurrentText("zero")
    widget.device.setCurrentText("cpu")
    widget.n_estimate.setValue(2)
    widget.run()
    finish(qtbot, widget)
    assert widget.explanation is not None and widget.explanation.model_identity["name"] == "local"
    assert loads == [False]

    titles = [ax.title.get_fontsize() for ax in widget.plot.figure.axes if ax.get_title()]
    assert titles and set(titles) == {DOCK_STYLE["axes.titlesize"]}


def test_save_refuses_without_a_result(viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_pdcr._napari.components_widget import ComponentsWidget

    widget = ComponentsWidget(viewer)
    qtbot.addWidget(widget)
    start = len(notification_manager.records)
    assert widget.save_result(tmp_path / "x") is None
    messages = [str(n.message) for n in notification_manager.records[start:]]
    assert "There is no result to save yet: press Run first." in messages
    assert not any(tmp_path.iterdir())
