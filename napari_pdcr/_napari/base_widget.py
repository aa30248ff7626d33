"""What the dock widgets share: layer choices, form controls and one base class.

:class:`DockWidget` holds the model / device rows, the Setup and Results tabs, the Run /
Cancel / progress section (through :class:`~napari_pdcr._napari.runner.BackgroundRun`),
the summary and plot of the latest result, and saving it. A subclass builds its setup
page, describes its job and says how to present a result.
"""

from __future__ import annotations

import gc
import logging
from functools import partial
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from napari.utils.theme import get_theme
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_pdcr._napari import inputs
from napari_pdcr._napari.inputs import image_spatial_shape, layer_geometry, region_mask
from napari_pdcr._napari.layers import (
    MAP_ROLES,
    METADATA_KEY,
    explanation_from_layer,
    explanation_layer_data,
)
from napari_pdcr._napari.plots import EffectPlots
from napari_pdcr._napari.runner import BackgroundRun
from napari_pdcr._napari.viewer import follow_ndisplay
from napari_pdcr.jobs import demo_model_dims
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.demo import demo_model_names
from napari_pdcr.models.devices import (
    DEVICE_CHOICES,
    resolve_device,
    torch_threads,
    worker_cpu_threads,
)
from napari_pdcr.outcomes import OUTCOME_KINDS

logger = logging.getLogger(__name__)

MODEL_FILE = "model file…"
GIVEN_MODEL = "model set from the console"
PREDICTION = "model prediction"
BUNDLED_BANK = "bundled sample images"
#: Name of the labels layer a person paints the target region on, and the choice that stands for it.
REGION_LAYER_NAME = "target region"
PAINT_REGION = "target region (to paint)"
REGION_COLOR = "lime"
#: Delay (ms) that puts a step in a later event-loop turn, after pending paints and other timers.
TURN_MS = 30
#: Margin (px) around the Results page's summary and plots.
PAGE_MARGIN_PX = 8
#: Exceptions whose message is written for users (shown as is, without a traceback).
USER_ERRORS = (ValueError, RuntimeError, OSError, KeyError, MemoryError, FloatingPointError)


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def user_message(error: BaseException) -> str:
    """One sentence for a notification, the fix first: an expected error's "problem: fix" as "Fix: problem"."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, USER_ERRORS) and text:
        problem, _, fix = text.partition(": ")
        return f"{capitalised(fix)}: {problem}." if fix else f"{capitalised(text)}."
    return f"The run failed unexpectedly ({type(error).__name__}: {error}); details are in the log."


def result_layers(explanation, **options) -> list[tuple[Layer, bool]]:
    """The explanation's layers (:func:`~napari_pdcr._napari.layers.explanation_layer_data` with ``options``),
    made hidden, each with whether it is to be shown.

    A worker step: a napari layer is a plain model (no Qt), and making one (thumbnails,
    colormaps, outlines) takes tens of milliseconds that the GUI thread then saves.
    """
    made = []
    for data, kwargs, kind in explanation_layer_data(explanation, **options):
        layer = Layer.create(data, {**kwargs, "visible": False}, kind)
        if isinstance(layer, Labels):
            defer_paint_overlays(layer)
        made.append((layer, kwargs.get("visible", True)))
    return made


#: napari's overlays of a Labels layer that show painting (polygon, brush stroke); a result's outline is not painted.
PAINT_OVERLAYS = ("polygon", "brush_stroke")
#: Labels modes that use them.
PAINT_MODES = ("paint", "polygon")


def defer_paint_overlays(layer: Labels) -> None:
    """Hide the painting overlays of a result's Labels ``layer`` until it is put in a painting mode.

    napari makes the visual of every shown overlay when a layer is added (~50 ms of the
    GUI thread for these two with software OpenGL); an outline or hatching is looked at,
    rarely painted. Uses napari's ``Layer._overlays``; a layer without them is left alone.
    """
    overlays = [layer._overlays[name] for name in PAINT_OVERLAYS if name in getattr(layer, "_overlays", {})]
    for overlay in overlays:
        overlay.visible = False

    def restore(event) -> None:
        if event.mode in PAINT_MODES:
            for overlay in overlays:
                overlay.visible = True

    layer.events.mode.connect(restore)


def add_without_selecting(viewer, layer: Layer) -> Layer:
    """Add ``layer`` to ``viewer``, keeping the selection.

    napari selects a newly added layer, which builds and draws its layer controls at once
    (0.1-0.5 s on the GUI thread with software OpenGL); the person selects the map when
    they want its controls. Uses napari's ``LayerList._activate_on_insert`` switch.
    """
    layers = viewer.layers
    activate = getattr(layers, "_activate_on_insert", True)
    layers._activate_on_insert = False
    try:
        return viewer.add_layer(layer)
    finally:
        layers._activate_on_insert = activate


def in_turns(steps) -> None:
    """Call each of ``steps`` (callables) in its own event-loop turn, in order.

    Between two steps napari draws and handles input, so no stall is longer than the
    longest step (e.g. one layer's creation) rather than their sum.
    """
    steps = list(steps)
    if steps:  # a real timer: Qt runs 0 ms single shots as posted events, all in one pass
        QTimer.singleShot(TURN_MS, lambda: (steps[0](), in_turns(steps[1:])))


#: Characters of colour-bar tick labels ("-0.04", "2e-05"), and those vispy measures a line's height with.
TICK_CHARACTERS = "0123456789.-+e" + " ÅÉÑŐjgpqy"


def preload_tick_glyphs(viewer, then=None) -> None:
    """Render the colour bar's tick glyphs now, one per event-loop turn, and upload them.

    napari renders each glyph of its canvas font on first use (~10-25 ms each, on the GUI
    thread) and uploads it to the font's texture at the first draw of a text that uses
    it (one texture update per glyph); the first ATE map's colour bar would otherwise pay
    for both in one frame at the end of a run. The upload is done by drawing the glyphs
    once in napari's text overlay (same font), fully transparent, then restoring the
    overlay. ``then()`` runs after the last step. Needs napari's Qt canvas
    (``window._qt_viewer``); a viewer without one is left alone (``then()`` at once).
    """
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a public-only proxy
    canvas = getattr(getattr(getattr(viewer, "window", None), "_qt_viewer", None), "canvas", None)
    if not hasattr(canvas, "font_info"):
        if then is not None:
            then()
        return
    font_info = canvas.font_info()
    font = font_info.font_manager.get_font(font_info.face)
    keep_kernel_on_gpu(font)
    overlay = viewer.text_overlay
    in_turns([*(partial(font.__getitem__, character) for character in TICK_CHARACTERS),
              partial(draw_transparently, overlay, TICK_CHARACTERS), *([then] if then is not None else [])])


def keep_kernel_on_gpu(font) -> None:
    """Upload the filter kernel of vispy's ``font`` (a ``TextureFont``) once, not at every draw of its texts.

    vispy's text visual assigns the font's kernel, a numpy array (16 x 1024 RGBA), to its
    shader at every draw, and an array is copied into the texture each time: with
    software OpenGL each copy waits for the previous frame to finish (0.05-0.25 s per
    frame on 2 busy cores once a colour bar shows). Given as a texture it is bound, not
    copied. Left alone when vispy's font has no such kernel.
    """
    from vispy.gloo import Texture2D

    kernel = getattr(font, "_kernel", None)
    if isinstance(kernel, np.ndarray):
        font._kernel = Texture2D(kernel)  # what vispy makes of the array, made once


def draw_transparently(text_overlay, text: str) -> None:
    """Draw ``text`` in napari's ``text_overlay`` once, fully transparent, then restore the overlay (next turn)."""
    if text_overlay.visible:  # in use: its font's glyphs are drawn anyway
        return
    saved = {"text": text_overlay.text, "color": text_overlay.color}
    text_overlay.update({"text": text, "color": (0.0, 0.0, 0.0, 0.0), "visible": True})
    in_turns([partial(text_overlay.update, {**saved, "visible": False})])


def make_colorbar_visual(layer: Layer) -> None:
    """Have napari make the vispy visual of a hidden ``layer``'s colour bar now, leaving the bar hidden.

    napari makes a layer overlay's visual when the overlay is first shown (~0.1 s), and
    draws nothing of a hidden layer; showing the bar later costs only its ticks and first draw.
    """
    layer.colorbar.visible = True
    layer.colorbar.visible = False


def finish_in_worker(job, *steps):
    """Worker body: the job's progress, then ``(result, *(step(result) for step in steps))``.

    The model runs with :func:`~napari_pdcr.models.devices.worker_cpu_threads` PyTorch
    threads (every core; OpenMP waits passively); the steps (building layer
    arrays, drawing plots) run here too, off the GUI thread.
    """
    with torch_threads(worker_cpu_threads()):
        result = yield from job.iter_run()
        return (result, *(step(result) for step in steps))


def result_and_figure(figure_step, result):
    """Worker body of :meth:`DockWidget.show_result`: ``(result, figure_step(result))``."""
    return result, figure_step(result)


def plot_theme(viewer) -> dict:
    """The viewer's theme colours for matplotlib (napari-matplotlib's conventions): background, text, axes."""
    theme = get_theme(viewer.theme)
    return {
        "background": theme.background.as_hex(),
        "text": theme.text.as_hex(),
        "grid": theme.foreground.as_hex(),
    }


def check_shape(mask: np.ndarray, image, what: str) -> None:
    """Raise a user sentence when a mask from ``what`` is not on the image layer's grid."""
    shape = image_spatial_shape(image)
    if mask.shape != shape:
        raise ValueError(
            f"the {what} has shape {mask.shape} but the image {image.name!r} has shape {shape}: "
            "draw it over this image, or choose the image it was drawn on"
        )


class LayerChoice(QComboBox):
    """Combo box of the viewer's layers of one type, after optional fixed entries."""

    def __init__(self, viewer, layer_type, fixed: tuple[str, ...] = (), tooltip: str = "", preferred: str = ""):
        super().__init__()
        self.viewer, self.layer_type, self.fixed, self.preferred = viewer, layer_type, fixed, preferred
        self.setToolTip(tooltip)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        self.refresh()

    def refresh(self) -> None:
        current = self.currentText()
        names = [*self.fixed, *(layer.name for layer in self.viewer.layers if isinstance(layer, self.layer_type))]
        if self.preferred in names and (not current or current in self.fixed):
            current = self.preferred  # a fixed placeholder gives way to the layer it stands for
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if current not in names:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        """The chosen layer, or None for a fixed entry or no choice."""
        name = self.currentText()
        if name in self.fixed or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def select(self, name: str) -> None:
        self.refresh()
        self.setCurrentText(name)


def spin_box(value: int, lo: int, hi: int, tooltip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


def double_box(value: float, lo: float, hi: float, decimals: int, step: float, tooltip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


def combo_box(items, tooltip: str, current: str | None = None, on_change=None) -> QComboBox:
    """A combo box of ``items``; ``on_change(text)`` is called when the choice changes."""
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tooltip)
    if current is not None:
        box.setCurrentText(current)
    if on_change is not None:
        box.currentTextChanged.connect(on_change)
    return box


def form_group(title: str) -> tuple[QGroupBox, QFormLayout]:
    """A titled group box and the form layout inside it."""
    group = QGroupBox(title)
    return group, QFormLayout(group)


def collapsible(title: str, body: QWidget, expanded: bool = False) -> QWidget:
    """``body`` under a ``title`` button (an arrow) that shows or hides it; collapsed by default."""
    section = QWidget()
    layout = QVBoxLayout(section)
    layout.setContentsMargins(0, 0, 0, 0)
    toggle = QToolButton()
    toggle.setText(title)
    toggle.setCheckable(True)
    toggle.setChecked(expanded)
    toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
    toggle.setStyleSheet("QToolButton { border: none; font-weight: bold; }")

    def show(on: bool) -> None:
        toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        body.setVisible(on)

    toggle.toggled.connect(show)
    show(expanded)
    layout.addWidget(toggle)
    layout.addWidget(body)
    section.toggle = toggle
    return section


class VerticalScrollArea(QScrollArea):
    """A vertical scroll area (no horizontal scroll bar) never narrower than its content needs.

    Its minimum width is the content's minimum width plus the scroll bar and the frame,
    asked afresh on every layout pass: napari's style sheet, applied when the widget is
    docked, widens the controls after construction, and a minimum fixed then would clip
    the content's right side.
    """

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        content = self.widget()
        if content is None:
            return hint
        needed = content.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(max(hint.width(), needed), hint.height())


def scrolled(widget: QWidget) -> QScrollArea:
    """``widget`` in a :class:`VerticalScrollArea`."""
    area = VerticalScrollArea()
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class DockWidget(BackgroundRun, QWidget):
    """Base of the dock widgets: model and device rows, tabs, Run / Cancel / progress, result, saving.

    A subclass builds its setup groups with the ``add_*_row(s)`` methods and its own rows,
    ends them with :meth:`advanced_section` (collapsed), passes them to :meth:`assemble`,
    and implements ``_on_intervention_changed(name)``, ``run()`` (with :meth:`start_run`),
    ``_on_returned(result)`` (which calls :meth:`present`), ``summary_text(result)`` and
    ``render_figure(result, width_px, scale, theme)``; :attr:`RESULT_KIND` is the kind of
    explanation it shows (also one reopened from a store). :attr:`result` is the latest
    result, saved by :meth:`save_result`.
    """

    #: Title, file name and suffix of the save dialog.
    SAVE_DIALOG = ("Save result", "explanation", ".zarr")
    #: What an intervention replaces ("block", "component"), the interventions offered and their help.
    NODE, INTERVENTIONS, INTERVENTION_HELP = "", (), ""
    #: The label and help of the choice of other images (the bank).
    BANK_LABEL, BANK_HELP = "Bank", ""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.result = None
        #: True from a run's return until its result is shown (layers and plots come in over several turns).
        self.result_pending = False
        self.given_model: SegmentationModel | None = None

    # ------------------------------------------------------------------ layout
    def add_image_and_model_rows(self, form: QFormLayout) -> None:
        """Add the Image, Model, model file and Trust rows to ``form`` (the model follows the image)."""
        self.image_choice = LayerChoice(self.viewer, Image, tooltip="The image layer to explain.")
        self.image_choice.currentTextChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_choice)
        self.model_choice = combo_box(
            [*demo_model_names(), MODEL_FILE],
            "A bundled demo model (unet2d: 2D brain mask; unet3d: 3D) or a model file.",
            on_change=self._on_model_changed,
        )
        form.addRow("Model", self.model_choice)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("path to a model file")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        self.model_file_row = QWidget()
        row = QHBoxLayout(self.model_file_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.model_path)
        row.addWidget(browse)
        form.addRow(self.model_file_row)
        self.trusted = QCheckBox("Trust this file (it may run code)")
        self.trusted.setToolTip("Allow formats that execute code when loaded (pickles). Only for files you trust.")
        form.addRow(self.trusted)

    def add_device_row(self, form: QFormLayout) -> None:
        """Add the Device row (and the label saying where the model runs)."""
        self.device = combo_box(
            DEVICE_CHOICES,
            "Where the model runs: auto picks cuda, then mps, then cpu.",
            on_change=self._update_device_label,
        )
        self.device_label = QLabel()
        row = QHBoxLayout()
        row.addWidget(self.device)
        row.addWidget(self.device_label, 1)
        form.addRow("Device", row)

    def add_reference_rows(self, form: QFormLayout) -> None:
        """Add the Reference (the model's prediction or a labels layer) and Reference value rows."""
        self.reference = LayerChoice(
            self.viewer,
            Labels,
            fixed=(PREDICTION,),
            tooltip="Reference mask of the Dice outcome: the model's own prediction, or a labels layer "
            "(ground truth).",
        )
        form.addRow("Reference", self.reference)
        self.reference_value = spin_box(0, 0, 2**31 - 1, "Label value of the reference (0: every non-zero label).")
        form.addRow("Reference value", self.reference_value)

    def add_intervention_row(self, form: QFormLayout) -> None:
        """Add the Intervention row (from :attr:`INTERVENTIONS` and :attr:`INTERVENTION_HELP`)."""
        self.intervention = combo_box(
            self.INTERVENTIONS, self.INTERVENTION_HELP, on_change=self._on_intervention_changed
        )
        form.addRow("Intervention", self.intervention)

    def add_estimator_rows(self, form: QFormLayout) -> None:
        """Add the bank, the subclass's ``add_advanced_rows(form)``, outcome, temperature, draws, tau and seed."""
        self.bank_choice = LayerChoice(self.viewer, Image, fixed=(BUNDLED_BANK,), tooltip=self.BANK_HELP)
        form.addRow(self.BANK_LABEL, self.bank_choice)
        self.add_advanced_rows(form)
        node = self.NODE
        self.outcome = combo_box(
            OUTCOME_KINDS,
            "The number measured in the region: dice (published) of the thresholded prediction "
            "against the reference, or a soft score.",
            "dice",
        )
        form.addRow("Outcome", self.outcome)
        self.temperature = double_box(1.0, 0.01, 100.0, 2, 0.1, "Temperature of soft outcomes (dice ignores it).")
        form.addRow("Temperature", self.temperature)
        self.n_screen = spin_box(
            3, 0, 1000, f"Screening draws per {node}; a {node} whose every change is below tau gets 0."
        )
        form.addRow("Screen draws", self.n_screen)
        self.n_estimate = spin_box(50, 1, 100_000, f"Draws per {node} that passes the screen (the published 50).")
        form.addRow("Estimate draws", self.n_estimate)
        self.tau = double_box(
            0.02, 0.0, 100.0, 3, 0.01, "Threshold in outcome units (Dice points): smaller effects are 0."
        )
        form.addRow("Tau", self.tau)
        self.seed = spin_box(0, 0, 2**31 - 1, "Seed of every random draw: same seed, same result.")
        form.addRow("Seed", self.seed)

    def add_advanced_rows(self, form: QFormLayout) -> None:
        """A subclass's own rows of the Advanced section (after the bank)."""

    def advanced_section(self, extra_rows=None) -> QWidget:
        """The collapsed "Advanced" section: device, reference, bank, outcome, draws, tau, seed, ``extra_rows(form)``."""
        body, form = form_group("")
        body.setFlat(True)
        self.add_device_row(form)
        self.add_reference_rows(form)
        self.add_estimator_rows(form)
        if extra_rows is not None:
            extra_rows(form)
        self.advanced = collapsible("Advanced", body)
        return self.advanced

    def estimator_parameters(self) -> dict:
        """The draws, tau, seed and device chosen in the rows added here."""
        return {
            "n_screen": self.n_screen.value(),
            "n_estimate": self.n_estimate.value(),
            "tau": self.tau.value(),
            "seed": self.seed.value(),
            "device": self.device.currentText(),
        }

    def assemble(self, groups: list[QWidget], run_tooltip: str) -> None:
        """Lay out the Setup tab (``groups``), the Results tab and the run section; watch the layers.

        Results already in the viewer (e.g. opened from a store) are shown in the Results tab.
        """
        setup = QWidget()
        layout = QVBoxLayout(setup)
        for group in groups:
            layout.addWidget(group)
        layout.addStretch(1)
        self.setup_page = setup
        self.tabs = QTabWidget()
        self.tabs.addTab(scrolled(setup), "Setup")
        self.tabs.addTab(scrolled(self._results_page()), "Results")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(self._run_section(run_tooltip))
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self.viewer.layers.events.inserted.connect(self._watch_name)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        follow_ndisplay(self.viewer)  # maps get their 3D colormap in 3D rendering
        self._on_model_changed(self.model_choice.currentText())
        self._on_image_changed(self.image_choice.currentText())
        self._on_intervention_changed(self.intervention.currentText())
        self._update_device_label()
        found = [e for e in map(self.result_of_layer, self.viewer.layers) if e is not None]
        for layer in self.viewer.layers:
            self.show_colorbar(layer)
        if found:
            self.show_result(found[-1])
        # Objects alive now (napari, torch, the data) leave the cyclic garbage collector's
        # full passes, which would otherwise take ~0.5 s on the GUI thread after a run.
        gc.collect()
        gc.freeze()
        self.preloading = True  #: the colour bar's glyphs are being prepared (a one-off, on docking)
        preload_tick_glyphs(self.viewer, then=partial(setattr, self, "preloading", False))

    def _results_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(*(PAGE_MARGIN_PX,) * 4)
        self.summary = QLabel("No result yet: set up a run and press Run.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.summary)
        self.save_button = QPushButton("Save result…")
        self.save_button.setToolTip("Save the latest result (with its parameters and provenance).")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(lambda: self.save_result())
        self.open_button = QPushButton("Open result…")
        self.open_button.setToolTip("Open a saved napari-pdcr result (a .zarr folder) with this plugin's reader.")
        self.open_button.clicked.connect(lambda: self.open_result())
        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.open_button)
        layout.addLayout(row)
        self.plot = EffectPlots()
        layout.addWidget(self.plot)
        layout.addStretch(1)
        return page

    def _run_section(self, run_tooltip: str) -> QVBoxLayout:
        layout = QVBoxLayout()
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip(run_tooltip)
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the run after the current batch; nothing is kept.")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.run_row = row  #: Run and Cancel (a subclass may add its own actions between them)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        layout.addWidget(self.progress)
        return layout

    def settings_panel(self) -> QWidget:
        return self.setup_page  # the settings, not their scroll bar

    def plot_width(self) -> int:
        """Width for the plots: the Results page's visible width less its margins (240-420 px)."""
        area = self.tabs.currentWidget()  # the tab on show (a tab never shown has no real size yet)
        scroll_bar = area.verticalScrollBar()  # the plots make the Results page scroll: leave room for its bar
        visible = area.viewport().width() - (0 if scroll_bar.isVisible() else scroll_bar.sizeHint().width())
        return min(420, max(240, visible - 2 * PAGE_MARGIN_PX))

    # ------------------------------------------------------------------ reactions
    def _refresh_layers(self, event=None) -> None:
        for choice in self.findChildren(LayerChoice):
            choice.refresh()

    def _watch_name(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _on_image_changed(self, name: str) -> None:
        """Choose a demo model of the image's dimensionality when the chosen demo model does not fit it."""
        image = self.image_choice.layer()
        model = self.model_choice.currentText()
        if image is None or demo_model_dims(model) is None:
            return
        dims = len(image_spatial_shape(image))
        if demo_model_dims(model) != dims:
            fitting = [name for name in demo_model_names() if demo_model_dims(name) == dims]
            if fitting:
                self.model_choice.setCurrentText(fitting[0])

    def _on_model_changed(self, name: str) -> None:
        is_file = name == MODEL_FILE
        self.model_file_row.setVisible(is_file)
        self.trusted.setVisible(is_file)

    def _update_device_label(self, *_) -> None:
        try:
            self.device_label.setText(f"runs on {resolve_device(self.device.currentText())}")
            self.device_label.setStyleSheet("")
        except RuntimeError:
            self.device_label.setText(f"{self.device.currentText()} is not available here")
            self.device_label.setStyleSheet("color: #e06c60")

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model file", "", "All files (*)")
        if path:
            self.model_path.setText(path)

    # ------------------------------------------------------------------ model
    def set_model(self, model: SegmentationModel) -> None:
        """Explain ``model`` (e.g. from the napari console) instead of a demo model or file."""
        self.given_model = model
        if self.model_choice.findText(GIVEN_MODEL) < 0:
            self.model_choice.addItem(GIVEN_MODEL)
        self.model_choice.setCurrentText(GIVEN_MODEL)

    def chosen_model(self) -> str | SegmentationModel:
        """The model to load in the worker: a demo name, a file path or the model set from the console."""
        name = self.model_choice.currentText()
        if name == GIVEN_MODEL:
            return self.given_model
        if name == MODEL_FILE:
            path = self.model_path.text().strip()
            if not path:
                raise ValueError("choose a model file (Browse…) or a demo model")
            return path
        return name

    def chosen_image(self):
        """The image layer to explain; a user sentence when there is none."""
        image = self.image_choice.layer()
        if image is None:
            raise ValueError(
                "there is no image layer to explain: open an image (e.g. File > Open Sample > napari-pdcr)"
            )
        return image

    def target_mask(self, layer, image, label: int | None = None, point=None) -> np.ndarray:
        """The target region from a Labels or Shapes ``layer`` over ``image``.

        Raises a user sentence when the mask is not on the image's grid or is empty.
        """
        mask = region_mask(layer, image, label=label, point=point)
        check_shape(mask, image, f"layer {layer.name!r}")
        if not mask.any():
            if isinstance(layer, Shapes):
                raise ValueError(f"the rectangles of {layer.name!r} lie outside the image {image.name!r}")
            which = f"label {label}" if label else "any label"
            raise ValueError(f"the target region is empty: no pixel of {layer.name!r} has {which}; paint it first")
        return mask

    def reference_mask(self, image) -> np.ndarray | None:
        """The chosen reference as a mask over ``image``'s grid (None: the model's own prediction)."""
        reference = self.reference.layer()
        if reference is None:
            return None
        mask = inputs.reference_mask(reference, label=self.reference_value.value())
        check_shape(mask, image, f"reference {reference.name!r}")
        return mask

    # ------------------------------------------------------------------ starting work
    def start_task(self, prepare, function, *args, loading_text: str, on_returned=None) -> None:
        """Unless a run is going: ``prepare()`` on the GUI thread, then ``function(prepared, *args)``
        in a worker. A user error from ``prepare`` (a missing layer, an empty region) is
        notified and nothing starts.
        """
        if self.refuse_if_running():
            return
        try:
            prepared = prepare()
        except USER_ERRORS as error:
            self.report_error(error)
            return
        gc.freeze()  # see assemble(): what exists now needs no full collection during the run
        self.start_worker(function, prepared, *args, loading_text=loading_text, on_returned=on_returned)

    def start_run(self, make_job, *steps, loading_text: str) -> None:
        """Run the job ``make_job()`` describes in a worker, then ``steps`` on its result.

        See :func:`finish_in_worker`.
        """
        self.start_task(make_job, finish_in_worker, *steps, loading_text=loading_text)

    # ------------------------------------------------------------------ region layer
    def paint_region_layer(self, image) -> Labels:
        """The 'target region' labels layer over ``image`` (created if missing), in paint mode, label 1."""
        shape = image_spatial_shape(image)
        layer = next(
            (lyr for lyr in self.viewer.layers if isinstance(lyr, Labels) and lyr.name == REGION_LAYER_NAME and lyr.data.shape == shape),
            None,
        )
        if layer is None:
            geometry = layer_geometry(image)
            layer = self.viewer.add_labels(
                np.zeros(shape, dtype=np.uint8),
                name=REGION_LAYER_NAME,
                scale=geometry["scale"],
                translate=geometry["translate"],
                colormap=DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: REGION_COLOR}),
                opacity=0.7,
            )
        layer.selected_label = 1
        layer.brush_size = max(3, min(shape[-2:]) // 20)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        return layer

    def prompt_to_paint(self) -> None:
        """Create the region layer over the chosen image and ask the person to paint it (first Run without one)."""
        layer = self.paint_region_layer(self.chosen_image())
        show_info(
            f"Paint the target region, then press Run: the labels layer '{layer.name}' is ready in paint mode "
            "(or choose a labels layer under Target region)."
        )

    # ------------------------------------------------------------------ results
    #: The kind of explanation this dock shows (a subclass of Explanation).
    RESULT_KIND = object

    def result_of_layer(self, layer):
        """The explanation of :attr:`RESULT_KIND` a layer carries (a napari-pdcr result layer), else None."""
        return explanation_from_layer(layer, self.RESULT_KIND)

    def _on_layer_inserted(self, event) -> None:
        """A result layer came in: an ATE map gets its colour bar; a result made elsewhere is shown."""
        layer = event.value
        result = self.result_of_layer(layer)
        if not self.result_pending:  # a run's layers get theirs in add_result_layers
            self.show_colorbar(layer)
        if result is not None and result is not self.result and self.worker is None:
            self.show_result(result)

    def show_colorbar(self, layer) -> None:
        """Show napari's colour bar (in the map's units) on a signed map of :attr:`RESULT_KIND`."""
        signed_map = self.result_of_layer(layer) is not None and layer.metadata[METADATA_KEY]["role"] in MAP_ROLES
        if signed_map and layer in self.viewer.layers:
            layer.colorbar.visible = True

    def add_result_layers(self, layers: list[tuple[Layer, bool]], before=(), then=None) -> None:
        """Add a run's result layers (from :func:`result_layers`), without selecting them, over several
        event-loop turns.

        ``before`` (callables, e.g. removing the previous result's layers) run first, each
        in its turn. Each layer goes in hidden (its visual and controls are made); a signed
        map's colour-bar visual is made in the next turn (:func:`make_colorbar_visual`),
        the layer is shown in the turn after (its first draw), and its colour bar in the
        last (its ticks and first draw): no two of napari's costly steps (70-150 ms each
        with software OpenGL) fall in one turn. ``then()`` runs last. See :func:`in_turns`.
        """
        steps = list(before)
        for layer, shown in layers:
            steps.append(partial(add_without_selecting, self.viewer, layer))
            signed_map = layer.metadata[METADATA_KEY]["role"] in MAP_ROLES
            if signed_map:
                steps.append(partial(make_colorbar_visual, layer))
            if shown:
                steps.append(partial(setattr, layer, "visible", True))
            if signed_map:
                steps.append(partial(self.show_colorbar, layer))
        in_turns([*steps, then] if then is not None else steps)

    def figure_step(self):
        """``render_figure`` for this dock's width, pixel ratio and napari theme: ``step(result) -> Figure``."""
        return partial(self.render_figure, width_px=self.plot_width(), scale=self.devicePixelRatioF(),
                       theme=plot_theme(self.viewer))

    def show_result(self, result) -> None:
        """Show a result made elsewhere (a reopened store, the console): plots drawn in a thread, then shown."""
        self.result = result
        self.summary.setText(self.summary_text(result))
        worker = create_worker(result_and_figure, self.figure_step(), result, _start_thread=False)
        # a bound method, not a lambda: Qt drops the connection when the dock is deleted first
        worker.returned.connect(self._on_figure_drawn)
        self._plot_worker = worker  # kept alive until it returns
        worker.start()

    def _on_figure_drawn(self, result_figure) -> None:
        """Show the figure :meth:`show_result` drew, unless another result came meanwhile."""
        result, figure = result_figure
        if self.result is result:
            self.present(result, self.summary_text(result), figure)

    def present(self, result, summary: str, figure) -> None:
        """Make ``result`` the latest: show its summary and plot (a drawn Figure; None: no plot) in the Results tab."""
        self.result = result
        self.result_pending = False
        self.summary.setText(summary)
        if figure is None:
            self.plot.clear()
        else:
            self.plot.show_figure(figure, self.devicePixelRatioF())
        self.save_button.setEnabled(True)
        self.tabs.setCurrentIndex(1)
        self.progress.setValue(1000)
        self.progress.setFormat(f"done in {result.timings.get('total_s', 0):.1f} s")

    def report_error(self, error: Exception) -> None:
        """Notify the user of an error of a run or a task."""
        show_error(user_message(error))

    def _on_errored(self, error: Exception) -> None:
        logger.error("napari-pdcr run failed", exc_info=(type(error), error, error.__traceback__))
        self.progress.setFormat("failed")
        self.report_error(error)

    def open_result(self, path: str | Path | None = None) -> list[Layer]:
        """Open a saved result store (asks for its folder when no ``path`` is given) with the napari-pdcr
        reader; returns the layers added (none after an error, which is notified).

        napari's ``viewer.open(path)`` tries only napari's own reader unless a plugin is named
        (see docs/user_guide.md), and File > Open asks which reader: this opens in one step.
        """
        from napari_pdcr._napari.reader import get_reader

        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Open a napari-pdcr result (.zarr folder)")
            if not path:
                return []
        if get_reader(str(path)) is None:
            show_error(f"Choose a result store saved by napari-pdcr (a .zarr folder): {path} is not one.")
            return []
        try:
            return self.viewer.open(str(path), plugin="napari-pdcr")
        except Exception as error:  # napari wraps the reader's error; its cause is the user sentence
            show_error(user_message(error.__cause__ or error))
            return []

    def save_result(self, path: str | Path | None = None) -> Path | None:
        """Save the latest result (asks for a path when none is given); returns the path written."""
        if self.result is None:
            show_error("There is no result to save yet: press Run first.")
            return None
        title, stem, suffix = self.SAVE_DIALOG
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, title, stem + suffix, f"{suffix[1:]} (*{suffix})")
            if not path:
                return None
        path = Path(path)
        if path.suffix != suffix:
            path = path.with_name(path.name + suffix)
        try:
            written = self.result.save(path)
        except OSError as error:
            show_error(f"Could not save the result to {path}: {error.strerror or error}")
            return None
        show_info(f"Saved the result to {written}")
        return written
