"""The dock widget: choose an image, a model and a target region, run, see the ATE map.

The widget only gathers settings into an :class:`~napari_pdcr._napari.job.ExplainJob`
(reading layer data on the GUI thread), runs its generator in a napari worker (progress
per forward batch, Cancel = ``worker.quit()``), and turns the returned explanation into
layers (:mod:`.layers`) and plots (:mod:`.plots`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
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
    QVBoxLayout,
    QWidget,
)

from napari_pdcr._napari.job import (
    ExplainJob,
    image_array,
    image_spatial_shape,
    layer_geometry,
    region_mask,
    region_name,
)
from napari_pdcr._napari.layers import explanation_layer_data
from napari_pdcr._napari.plots import EffectPlots, render_plots
from napari_pdcr._napari.runner import BackgroundRun
from napari_pdcr.io.results import save_explanation
from napari_pdcr.models.demo import demo_model_names
from napari_pdcr.models.devices import DEVICE_CHOICES, resolve_device
from napari_pdcr.outcomes import OUTCOME_KINDS

logger = logging.getLogger(__name__)

MODEL_FILE = "model file…"
PREDICTION = "model prediction"
BUNDLED_BANK = "bundled sample images"
REGION_LAYER_NAME = "target region"
REGION_COLOR = "lime"
#: Interventions offered in the widget (``constant`` needs a value: use the console).
INTERVENTIONS = ("patch_bank", "zero", "mean", "blur", "noise")
#: Exceptions whose message is written for users (shown as is, without a traceback).
USER_ERRORS = (ValueError, RuntimeError, OSError, KeyError, MemoryError, FloatingPointError)


def user_message(error: BaseException) -> str:
    """One sentence for a notification: the error's own text for expected errors."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, USER_ERRORS) and text:
        return f"Could not explain the region: {text[0].lower()}{text[1:]}"
    return f"The run failed unexpectedly ({type(error).__name__}: {error}); details are in the log."


def compute_result(job: ExplainJob, layer_options: dict, plot_width: int, plot_scale: float):
    """Worker body: the run's progress, then everything the GUI needs to show the result.

    Returns ``(explanation, layer_data, plot_image)``; building the layer arrays and
    drawing the plots here keeps that work off the GUI thread.
    """
    explanation = yield from job.iter_run()
    layer_data = explanation_layer_data(explanation, **layer_options)
    return explanation, layer_data, render_plots(explanation, plot_width, plot_scale)


class LayerChoice(QComboBox):
    """Combo box of the viewer's layers of one type, after optional fixed entries."""

    def __init__(self, viewer, layer_type, fixed: tuple[str, ...] = (), tooltip: str = ""):
        super().__init__()
        self.viewer, self.layer_type, self.fixed = viewer, layer_type, fixed
        self.setToolTip(tooltip)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        self.refresh()

    def refresh(self) -> None:
        current = self.currentText()
        names = [*self.fixed, *(layer.name for layer in self.viewer.layers if isinstance(layer, self.layer_type))]
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


def _spin(value: int, lo: int, hi: int, tooltip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


def _double(value: float, lo: float, hi: float, decimals: int, step: float, tooltip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


def _combo(items, tooltip: str, current: str | None = None) -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tooltip)
    if current is not None:
        box.setCurrentText(current)
    return box


class RegionEffectsWidget(BackgroundRun, QWidget):
    """Explain a segmentation model's output in a region by block interventions (ATE map)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.explanation = None
        self.picked_point: tuple[float, ...] | None = None

        self.tabs = QTabWidget()
        self.tabs.addTab(self._scrolled(self._setup_page()), "Setup")
        self.tabs.addTab(self._scrolled(self._results_page()), "Results")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.tabs)
        layout.addLayout(self._run_row())
        # wide enough for the settings without a horizontal scroll bar
        self.setMinimumWidth(self.tabs.widget(0).widget().minimumSizeHint().width() + 40)

        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self.viewer.layers.events.inserted.connect(self._watch_name)
        self._on_model_changed(self.model_choice.currentText())
        self._on_region_kind_changed(self.region_kind.currentText())
        self._on_intervention_changed(self.intervention.currentText())
        self._update_device_label()

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _scrolled(widget: QWidget) -> QScrollArea:
        area = QScrollArea()
        area.setWidgetResizable(True)
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        area.setWidget(widget)
        return area

    def _setup_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.addWidget(self._model_group())
        layout.addWidget(self._region_group())
        layout.addWidget(self._parameter_group())
        layout.addStretch(1)
        return page

    def _model_group(self) -> QGroupBox:
        group = QGroupBox("Image and model")
        form = QFormLayout(group)
        self.image_choice = LayerChoice(self.viewer, Image, tooltip="The image layer to explain.")
        form.addRow("Image", self.image_choice)
        self.model_choice = _combo(
            [*demo_model_names(), MODEL_FILE],
            "A bundled demo model (unet2d: 2D brain mask; unet3d: 3D) or a model file.",
        )
        self.model_choice.currentTextChanged.connect(self._on_model_changed)
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
        self.device = _combo(DEVICE_CHOICES, "Where the model runs: auto picks cuda, then mps, then cpu.")
        self.device.currentTextChanged.connect(self._update_device_label)
        self.device_label = QLabel()
        row = QHBoxLayout()
        row.addWidget(self.device)
        row.addWidget(self.device_label, 1)
        form.addRow("Device", row)
        return group

    def _region_group(self) -> QGroupBox:
        group = QGroupBox("Target region")
        layout = QVBoxLayout(group)
        self.brush_button = QPushButton("Brush region")
        self.brush_button.setToolTip(
            f"Create (or select) a labels layer named '{REGION_LAYER_NAME}' over the image and start painting."
        )
        self.brush_button.clicked.connect(self.brush_region)
        layout.addWidget(self.brush_button)
        form = QFormLayout()
        layout.addLayout(form)
        self.region_kind = _combo(
            ["labels", "shapes rectangle"],
            "Where the target region comes from: a labels layer (painted or a segmentation) or a rectangle.",
        )
        self.region_kind.currentTextChanged.connect(self._on_region_kind_changed)
        form.addRow("Region from", self.region_kind)

        self.labels_box = QWidget()
        labels_form = QFormLayout(self.labels_box)
        labels_form.setContentsMargins(0, 0, 0, 0)
        self.region_labels = LayerChoice(self.viewer, Labels, tooltip="The labels layer holding the target region.")
        labels_form.addRow("Labels", self.region_labels)
        self.region_value = _spin(1, 0, 2**31 - 1, "Label value of the region (0: every non-zero label).")
        labels_form.addRow("Label value", self.region_value)
        self.use_component = QCheckBox("Only the piece at a point")
        self.use_component.setToolTip("Keep only the connected piece of the label that contains the picked point.")
        self.pick_button = QPushButton("Pick point")
        self.pick_button.setToolTip("Then click inside the region in the viewer.")
        self.pick_button.clicked.connect(self.start_picking)
        row = QHBoxLayout()
        row.addWidget(self.use_component)
        row.addWidget(self.pick_button)
        labels_form.addRow(row)
        self.point_label = QLabel("no point picked")
        labels_form.addRow(self.point_label)
        form.addRow(self.labels_box)

        self.shapes_box = QWidget()
        shapes_form = QFormLayout(self.shapes_box)
        shapes_form.setContentsMargins(0, 0, 0, 0)
        self.region_shapes = LayerChoice(
            self.viewer, Shapes, tooltip="Shapes layer with rectangles (the selected ones, else all)."
        )
        shapes_form.addRow("Shapes", self.region_shapes)
        form.addRow(self.shapes_box)

        self.reference = LayerChoice(
            self.viewer,
            Labels,
            fixed=(PREDICTION,),
            tooltip="Reference mask of the Dice outcome: the model's own prediction, or a labels layer (ground truth).",
        )
        form.addRow("Reference", self.reference)
        self.reference_value = _spin(0, 0, 2**31 - 1, "Label value of the reference (0: every non-zero label).")
        form.addRow("Reference value", self.reference_value)
        return group

    def _parameter_group(self) -> QGroupBox:
        group = QGroupBox("Intervention and parameters")
        form = QFormLayout(group)
        self.intervention = _combo(
            INTERVENTIONS,
            "What replaces a block: patch_bank = crops of other images (published); zero / mean / blur / "
            "noise need no other images.",
        )
        self.intervention.currentTextChanged.connect(self._on_intervention_changed)
        form.addRow("Intervention", self.intervention)
        self.bank_choice = LayerChoice(
            self.viewer,
            Image,
            fixed=(BUNDLED_BANK,),
            tooltip="Other images to crop patches from: the bundled samples (2D: other Colin27 slices; "
            "3D: a second subject), or an image layer (a stack of slices or volumes).",
        )
        form.addRow("Patch bank", self.bank_choice)
        self.block_size = _spin(8, 1, 256, "Block edge in pixels/voxels: the map's resolution (smaller = slower).")
        form.addRow("Block size", self.block_size)
        self.outcome = _combo(OUTCOME_KINDS, "The number measured in the region: dice (published) of the "
                              "thresholded prediction against the reference, or a soft score.", "dice")
        form.addRow("Outcome", self.outcome)
        self.temperature = _double(1.0, 0.01, 100.0, 2, 0.1, "Temperature of soft outcomes (dice ignores it).")
        form.addRow("Temperature", self.temperature)
        self.n_screen = _spin(3, 0, 1000, "Screening draws per block; blocks whose every change is below tau get 0.")
        form.addRow("Screen draws", self.n_screen)
        self.n_estimate = _spin(50, 1, 100_000, "Draws per block that passes the screen (the published 50).")
        form.addRow("Estimate draws", self.n_estimate)
        self.tau = _double(0.02, 0.0, 100.0, 3, 0.01, "Threshold in outcome units (Dice points): smaller effects are 0.")
        form.addRow("Tau", self.tau)
        self.seed = _spin(0, 0, 2**31 - 1, "Seed of every random draw: same seed, same map.")
        form.addRow("Seed", self.seed)
        self.mode = _combo(
            ("exact", "fast"),
            "exact: the published estimate, skipping blocks that provably cannot reach the region; "
            "fast: also stops drawing once a block's standard error is small (approximate).",
        )
        form.addRow("Mode", self.mode)
        self.show_se = QCheckBox("Standard-error map")
        self.show_se.setToolTip("Also add the standard error of each block's effect (hidden layer).")
        self.show_prediction = QCheckBox("Prediction outline")
        self.show_prediction.setToolTip("Also add the outline of the model's prediction.")
        form.addRow("Also add", self.show_se)
        form.addRow("", self.show_prediction)
        return group

    def _results_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        self.summary_label = QLabel("No result yet: set up a run and press Run.")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.summary_label)
        self.save_button = QPushButton("Save result…")
        self.save_button.setToolTip("Save the latest result (maps, masks, parameters, provenance) as a zarr store.")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(lambda: self.save_result())
        layout.addWidget(self.save_button)
        self.plots = EffectPlots()
        layout.addWidget(self.plots)
        layout.addStretch(1)
        return page

    def _run_row(self) -> QVBoxLayout:
        layout = QVBoxLayout()
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Compute the ATE map in the background.")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the run after the current batch; nothing is added.")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        layout.addWidget(self.progress)
        return layout

    # ------------------------------------------------------------------ reactions
    def _refresh_layers(self, event=None) -> None:
        for choice in (self.image_choice, self.region_labels, self.region_shapes, self.reference, self.bank_choice):
            choice.refresh()

    def _watch_name(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _on_model_changed(self, name: str) -> None:
        is_file = name == MODEL_FILE
        self.model_file_row.setVisible(is_file)
        self.trusted.setVisible(is_file)

    def _on_region_kind_changed(self, kind: str) -> None:
        self.labels_box.setVisible(kind == "labels")
        self.shapes_box.setVisible(kind != "labels")

    def _on_intervention_changed(self, name: str) -> None:
        self.bank_choice.setEnabled(name == "patch_bank")

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

    # ------------------------------------------------------------------ region tools
    def brush_region(self) -> Labels | None:
        """Create or select the '{REGION_LAYER_NAME}' labels layer over the image and start painting."""
        image = self.image_choice.layer()
        if image is None:
            show_error("Open or choose an image layer first: the region is painted over it.")
            return None
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
        self.region_kind.setCurrentText("labels")
        self.region_labels.select(layer.name)
        self.region_value.setValue(1)
        return layer

    def start_picking(self) -> None:
        """Record the next click in the viewer as the point whose connected component is the region."""
        labels = self.region_labels.layer()
        if labels is None:
            show_error("Choose the labels layer first, then pick a point inside the region.")
            return
        if labels.mode != "pan_zoom":
            labels.mode = "pan_zoom"
        if self._pick not in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.append(self._pick)
        self.point_label.setText("click inside the region in the viewer…")

    def _pick(self, viewer, event) -> None:
        viewer.mouse_drag_callbacks.remove(self._pick)
        labels = self.region_labels.layer()
        if labels is None:
            return
        self.set_point(labels.world_to_data(event.position))

    def set_point(self, data_position) -> None:
        """Use the connected component at ``data_position`` (the labels layer's data coordinates)."""
        self.picked_point = tuple(float(p) for p in data_position)
        self.use_component.setChecked(True)
        self.point_label.setText("point " + ", ".join(f"{p:.0f}" for p in self.picked_point))

    # ------------------------------------------------------------------ run
    def make_job(self) -> ExplainJob:
        """The run the current settings describe; ``ValueError`` with a user sentence if impossible."""
        image = self.image_choice.layer()
        if image is None:
            raise ValueError("there is no image layer to explain: open an image (e.g. File > Open Sample > napari-pdcr)")
        model = self.model_choice.currentText()
        if model == MODEL_FILE:
            model = self.model_path.text().strip()
            if not model:
                raise ValueError("choose a model file (Browse…) or a demo model")
        shape = image_spatial_shape(image)
        region, region_name = self._region(image, shape)
        reference = self.reference.layer()
        if reference is not None:
            ref_value = self.reference_value.value()
            reference_mask = region_mask(reference, image, label=ref_value)
            self._check_shape(reference_mask, shape, f"reference {reference.name!r}", image)
        else:
            reference_mask = None
        bank_layer = self.bank_choice.layer() if self.intervention.currentText() == "patch_bank" else None
        geometry = layer_geometry(image)
        return ExplainJob(
            image=np.array(image_array(image), dtype=np.float32),
            target_region=region,
            model=model,
            reference=reference_mask,
            intervention=self.intervention.currentText(),
            outcome=self.outcome.currentText(),
            temperature=self.temperature.value(),
            bank=None if bank_layer is None else np.array(image_array(bank_layer), dtype=np.float32),
            bank_description=f"image layer {bank_layer.name}" if bank_layer is not None else "",
            trusted=self.trusted.isChecked(),
            spacing=tuple(geometry["scale"]),
            source_layer=geometry,
            target_name=region_name,
            parameters={
                "block_shape": self.block_size.value(),
                "n_screen": self.n_screen.value(),
                "n_estimate": self.n_estimate.value(),
                "tau": self.tau.value(),
                "mode": self.mode.currentText(),
                "seed": self.seed.value(),
                "device": self.device.currentText(),
            },
        )

    @staticmethod
    def _check_shape(mask: np.ndarray, shape: tuple[int, ...], what: str, image) -> None:
        if mask.shape != shape:
            raise ValueError(
                f"the {what} has shape {mask.shape} but the image {image.name!r} has shape {shape}: "
                "draw it over this image (e.g. with Brush region)"
            )

    def _region(self, image, shape) -> tuple[np.ndarray, str]:
        if self.region_kind.currentText() == "labels":
            labels = self.region_labels.layer()
            if labels is None:
                raise ValueError("there is no target region: press 'Brush region' and paint, or choose a labels layer")
            value = self.region_value.value()
            point = self.picked_point if self.use_component.isChecked() else None
            if self.use_component.isChecked() and point is None:
                raise ValueError("pick a point inside the region first ('Pick point'), or untick 'Only the piece at a point'")
            mask = region_mask(labels, image, label=value, point=point)
            self._check_shape(mask, shape, f"labels layer {labels.name!r}", image)
            if not mask.any():
                which = f"label {value}" if value else "any label"
                raise ValueError(f"the target region is empty: no pixel of {labels.name!r} has {which}; paint it first")
            return mask, region_name(labels, value)
        shapes = self.region_shapes.layer()
        if shapes is None:
            raise ValueError("there is no shapes layer: add one and draw a rectangle over the image")
        mask = region_mask(shapes, image)
        if not mask.any():
            raise ValueError(f"the rectangles of {shapes.name!r} lie outside the image {image.name!r}")
        return mask, shapes.name

    def run(self) -> None:
        """Start a run in a background worker (refused while one is going)."""
        if self.refuse_if_running():
            return
        try:
            job = self.make_job()
            job.check()
        except USER_ERRORS as error:
            show_error(user_message(error))
            return
        options = {"show_standard_error": self.show_se.isChecked(), "show_prediction": self.show_prediction.isChecked()}
        self.start_worker(
            compute_result, job, options, self._plot_width(), self.devicePixelRatioF(), loading_text="loading the model…"
        )

    def settings_panel(self) -> QWidget:
        return self.tabs.widget(0).widget()  # the settings, not their scroll bar

    def _plot_width(self) -> int:
        """Width for the plots: the Results page's, less its margins and a scroll bar (240-420 px)."""
        return min(420, max(240, self.tabs.width() - 60))

    def _on_returned(self, result) -> None:
        explanation, layer_data, plot_image = result
        for item in layer_data:
            self.viewer.add_layer(Layer.create(*item))
        self.explanation = explanation
        self.show_result(explanation, plot_image)
        self.progress.setValue(1000)
        self.progress.setFormat(f"done in {explanation.timings.get('total_s', 0):.1f} s")

    def show_result(self, explanation, plot_image: np.ndarray | None = None) -> None:
        """Show an explanation's summary and plots (drawn now if not given) in the Results tab."""
        counts = explanation.counts()
        self.summary_label.setText(
            f"<b>{explanation.model_identity.get('name', 'model')}</b> on "
            f"{explanation.provenance.get('target_layer') or 'the region'}: "
            f"{explanation.parameters.get('outcome', {}).get('kind', 'outcome')} without intervention "
            f"{explanation.base_outcome:.1f}. Blocks: {counts['negative']} negative (supported it), "
            f"{counts['positive']} positive (hurt it), {counts['zero']} zero. "
            f"{explanation.forward_passes} forward passes on {explanation.parameters.get('device', '?')}, "
            f"{explanation.timings.get('total_s', 0):.1f} s."
        )
        if plot_image is None:
            plot_image = render_plots(explanation, self._plot_width(), self.devicePixelRatioF())
        self.plots.show_image(plot_image, self.devicePixelRatioF())
        self.save_button.setEnabled(True)
        self.tabs.setCurrentIndex(1)

    def _on_errored(self, error: Exception) -> None:
        logger.error("napari-pdcr run failed", exc_info=(type(error), error, error.__traceback__))
        self.progress.setFormat("failed")
        show_error(user_message(error))

    # ------------------------------------------------------------------ saving
    def save_result(self, path: str | Path | None = None) -> Path | None:
        """Save the latest result as a zarr store (asks for a path when none is given)."""
        if self.explanation is None:
            show_error("There is no result to save yet: run an explanation first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save result", "explanation.zarr", "zarr store (*.zarr)")
            if not path:
                return None
        path = Path(path)
        if path.suffix != ".zarr":
            path = path.with_name(path.name + ".zarr")
        try:
            written = save_explanation(self.explanation, path)
        except OSError as error:
            show_error(f"Could not save the result to {path}: {error.strerror or error}")
            return None
        show_info(f"Saved the result to {written}")
        return written
