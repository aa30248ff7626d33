"""The "Components" dock widget: component effects of a model on a target region.

It reads the layers on the GUI thread into a :class:`ComponentJob`, runs the job's
generator (model loading, bank activations, the estimator) in a napari worker with
progress and Cancel, and draws the sorted bar chart with 95% error bars. A finished
result is attached to napari-pdcr result layers of the same model and region, so it is
saved with that region explanation; "Save…" writes it on its own (``.npz``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_pdcr._napari.job import (
    default_bank,
    image_array,
    image_spatial_shape,
    model_input,
    region_mask,
    resolve_model,
    same_image,
    split_sources,
)
from napari_pdcr._napari.layers import explanation_from_layer
from napari_pdcr._napari.runner import BackgroundRun
from napari_pdcr._napari.widget import (
    USER_ERRORS,
    LayerChoice,
    _combo,
    _double,
    _spin,
    user_message,
)
from napari_pdcr.components import (
    ACTIVATION_INTERVENTIONS,
    GRANULARITIES,
    ComponentEffects,
    ComponentExplanation,
    enumerate_components,
    format_components,
)
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.demo import demo_model_names
from napari_pdcr.models.devices import DEVICE_CHOICES
from napari_pdcr.outcomes import OUTCOME_KINDS, Outcome

logger = logging.getLogger(__name__)

MODEL_FILE = "model file…"
GIVEN_MODEL = "model set from the console"
PREDICTION = "model prediction"
BUNDLED_BANK = "bundled sample images"
_STYLE = {"font.size": 7, "axes.titlesize": 8, "axes.labelsize": 7, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5}


@dataclass
class ComponentJob:
    """One component-effect run as plain arrays and settings (built on the GUI thread).

    ``image`` is ``S`` or ``(C, *S)``; ``target_region`` / ``reference`` bool ``S``;
    ``bank`` other images (a stack; None: the bundled samples), of which at most
    ``n_bank`` evenly spaced ones are used; ``parameters`` go to :class:`ComponentEffects`.
    """

    image: np.ndarray
    target_region: np.ndarray
    model: str | SegmentationModel
    reference: np.ndarray | None = None
    bank: np.ndarray | None = None
    n_bank: int = 16
    trusted: bool = False
    parameters: dict = field(default_factory=dict)

    def iter_run(self):
        """Generator: load the model, pick bank images, yield progress, return the ComponentExplanation."""
        model = resolve_model(self.model, trusted=self.trusted)
        image = model_input(np.asarray(self.image, dtype=np.float32), model)
        method = ComponentEffects(model, **self.parameters)
        bank = self._bank_images(model, image) if method.intervention.needs_bank else None
        result = yield from method.iter_attribute(image, self.target_region, self.reference, bank)
        return result

    def _bank_images(self, model: SegmentationModel, image: np.ndarray) -> np.ndarray:
        stack = self.bank if self.bank is not None else default_bank(image, model.spatial_dims)[0]
        others = [s for s in split_sources(stack, model.spatial_dims, model.in_channels) if not same_image(s, image)]
        others = [s for s in others if s.shape == image.shape]
        if not others:
            raise ValueError(
                f"the bank has no other image of the explained image's shape {image.shape}: "
                "choose an image layer with other images of this size"
            )
        pick = np.unique(np.linspace(0, len(others) - 1, min(self.n_bank, len(others))).round().astype(int))
        return np.stack([others[i] for i in pick])


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setWidget(widget)
    return area


class ComponentPlot(QWidget):
    """Matplotlib canvas with the sorted component bar chart."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.figure = Figure(figsize=(3.6, 5.0), dpi=100)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(360)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)

    def show_result(self, result: ComponentExplanation, top: int = 20) -> None:
        self.figure.clear()
        with matplotlib.rc_context(_STYLE):
            ax = self.figure.add_subplot()
            result.plot(ax, top=top, title=f"{result.model_identity.get('name', 'model')}: base outcome "
                                           f"{result.base_outcome:.1f}")
            self.figure.tight_layout()
        self.canvas.draw_idle()


class ComponentsWidget(BackgroundRun, QWidget):
    """Explain which network components a model's output in a region relies on."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.result: ComponentExplanation | None = None
        self.given_model: SegmentationModel | None = None

        setup = QWidget()
        setup_layout = QVBoxLayout(setup)
        setup_layout.addWidget(self._inputs_group())
        setup_layout.addWidget(self._components_group())
        setup_layout.addWidget(self._parameters_group())
        setup_layout.addStretch(1)
        self.tabs = QTabWidget()
        self.tabs.addTab(_scrolled(setup), "Setup")
        self.tabs.addTab(self._results_page(), "Results")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.tabs, 1)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Estimate every component's effect in the background.")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current batch; nothing is kept.")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        layout.addWidget(self.progress)

        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        self._on_model_changed(self.model_choice.currentText())
        self._on_granularity_changed(self.granularity.currentText())
        self._on_intervention_changed(self.intervention.currentText())

    # ------------------------------------------------------------------ layout
    def _results_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        self.summary = QLabel("No result yet: set up a run and press Run.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.summary)
        self.plot = ComponentPlot()
        layout.addWidget(self.plot, 1)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the component effects (with parameters and provenance) as .npz.")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(lambda: self.save_result())
        layout.addWidget(self.save_button)
        return page

    def _inputs_group(self) -> QGroupBox:
        group = QGroupBox("Image, model and region")
        form = QFormLayout(group)
        self.image_choice = LayerChoice(self.viewer, Image, tooltip="The image layer to explain.")
        form.addRow("Image", self.image_choice)
        self.model_choice = _combo([*demo_model_names(), MODEL_FILE], "A bundled demo model or a model file.")
        self.model_choice.currentTextChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_choice)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("path to a model file (an nn.Module)")
        form.addRow(self.model_path)
        self.region_choice = LayerChoice(
            self.viewer, (Labels, Shapes), tooltip="Labels layer (non-zero voxels, or the label value below) "
            "or shapes layer (rectangles) holding the target region."
        )
        form.addRow("Region", self.region_choice)
        self.region_value = _spin(0, 0, 2**31 - 1, "Label value of the region (0: every non-zero label).")
        form.addRow("Label value", self.region_value)
        self.reference = LayerChoice(
            self.viewer, Labels, fixed=(PREDICTION,),
            tooltip="Reference of the Dice outcome: the model's own prediction, or a labels layer.",
        )
        form.addRow("Reference", self.reference)
        return group

    def _components_group(self) -> QGroupBox:
        group = QGroupBox("Components")
        form = QFormLayout(group)
        self.granularity = _combo(
            GRANULARITIES,
            "stages: encoder/decoder stages; blocks: every block; skips: skip connections; "
            "channels: the channels of one layer.",
        )
        self.granularity.currentTextChanged.connect(self._on_granularity_changed)
        form.addRow("Granularity", self.granularity)
        self.layer_choice = _combo([], "The layer whose channels are explained.")
        form.addRow("Layer", self.layer_choice)
        self.list_button = QPushButton("List components")
        self.list_button.setToolTip("Show the model's components at this granularity (probed on the image).")
        self.list_button.clicked.connect(self.list_components)
        form.addRow(self.list_button)
        self.listing = QPlainTextEdit()
        self.listing.setReadOnly(True)
        self.listing.setFont(QFont("monospace", 8))
        self.listing.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.listing.setMinimumHeight(150)
        self.listing.setVisible(False)
        form.addRow(self.listing)
        return group

    def _parameters_group(self) -> QGroupBox:
        group = QGroupBox("Intervention and parameters")
        form = QFormLayout(group)
        self.intervention = _combo(
            ACTIVATION_INTERVENTIONS,
            "resample: the component's activation on another image (natural); zero: ablation; "
            "mean: mean activation over the bank; noise: Gaussian with the activation's statistics.",
        )
        self.intervention.currentTextChanged.connect(self._on_intervention_changed)
        form.addRow("Intervention", self.intervention)
        self.bank_choice = LayerChoice(
            self.viewer, Image, fixed=(BUNDLED_BANK,),
            tooltip="Other images of the same size (a stack) whose activations are resampled / averaged.",
        )
        form.addRow("Bank", self.bank_choice)
        self.n_bank = _spin(16, 1, 1000, "At most this many bank images (evenly spaced); each keeps its activations in memory.")
        form.addRow("Bank images", self.n_bank)
        self.outcome = _combo(OUTCOME_KINDS, "The number measured in the region (dice: published).", "dice")
        form.addRow("Outcome", self.outcome)
        self.n_screen = _spin(3, 0, 1000, "Screening draws per component.")
        form.addRow("Screen draws", self.n_screen)
        self.n_estimate = _spin(50, 1, 100_000, "Draws per component that passes the screen.")
        form.addRow("Estimate draws", self.n_estimate)
        self.tau = _double(0.02, 0.0, 100.0, 3, 0.01, "Effects below tau (outcome units) are reported as 0.")
        form.addRow("Tau", self.tau)
        self.seed = _spin(0, 0, 2**31 - 1, "Seed of every random draw.")
        form.addRow("Seed", self.seed)
        self.device = _combo(DEVICE_CHOICES, "Where the model runs.")
        form.addRow("Device", self.device)
        return group

    # ------------------------------------------------------------------ reactions
    def _refresh_layers(self, event=None) -> None:
        for choice in (self.image_choice, self.region_choice, self.reference, self.bank_choice):
            choice.refresh()

    def _on_model_changed(self, name: str) -> None:
        self.model_path.setVisible(name == MODEL_FILE)
        self.layer_choice.clear()

    def _on_granularity_changed(self, name: str) -> None:
        self.layer_choice.setEnabled(name == "channels")
        if name == "channels" and self.layer_choice.count() == 0:
            self._fill_layers()

    def _on_intervention_changed(self, name: str) -> None:
        needs_bank = ACTIVATION_INTERVENTIONS[name].needs_bank
        self.bank_choice.setEnabled(needs_bank)
        self.n_bank.setEnabled(needs_bank)

    def set_model(self, model: SegmentationModel) -> None:
        """Explain ``model`` (e.g. from the napari console) instead of a demo model or file."""
        self.given_model = model
        if self.model_choice.findText(GIVEN_MODEL) < 0:
            self.model_choice.addItem(GIVEN_MODEL)
        self.model_choice.setCurrentText(GIVEN_MODEL)

    def _model(self) -> str | SegmentationModel:
        name = self.model_choice.currentText()
        if name == GIVEN_MODEL:
            return self.given_model
        if name == MODEL_FILE:
            path = self.model_path.text().strip()
            if not path:
                raise ValueError("choose a model file or a demo model")
            return path
        return name

    def _fill_layers(self) -> None:
        try:
            model = resolve_model(self._model())
            names = [c.name for c in enumerate_components(model, "stages") + enumerate_components(model, "skips")]
        except (*USER_ERRORS, TypeError) as error:
            show_error(user_message(error))
            return
        self.layer_choice.addItems(names)

    def list_components(self) -> str:
        """Show (and return) the readable listing of the chosen granularity's components."""
        try:
            job = self.make_job()
            model = resolve_model(job.model)
            image = model.prepare_image(model_input(job.image, model))
            p = job.parameters
            components = enumerate_components(model, p["granularity"], p.get("layer"), image)
        except (*USER_ERRORS, TypeError) as error:
            show_error(user_message(error))
            return ""
        text = format_components(components)
        self.listing.setPlainText(text)
        self.listing.setVisible(True)
        return text

    # ------------------------------------------------------------------ run
    def make_job(self) -> ComponentJob:
        """The run the current settings describe; ``ValueError`` with a user sentence if impossible."""
        image = self.image_choice.layer()
        if image is None:
            raise ValueError("there is no image layer to explain: open an image first")
        region_layer = self.region_choice.layer()
        if region_layer is None:
            raise ValueError("there is no target region: choose a labels or shapes layer")
        shape = image_spatial_shape(image)
        region = region_mask(region_layer, image, label=self.region_value.value())
        if region.shape != shape or not region.any():
            raise ValueError(
                f"the target region {region_layer.name!r} must be non-empty and of the image's shape {shape}"
            )
        reference = self.reference.layer()
        reference_mask = None if reference is None else region_mask(reference, image)
        bank = self.bank_choice.layer()
        granularity = self.granularity.currentText()
        if granularity == "channels" and not self.layer_choice.currentText():
            raise ValueError("choose the layer whose channels are explained")
        return ComponentJob(
            image=np.array(image_array(image), dtype=np.float32),
            target_region=region,
            model=self._model(),
            reference=reference_mask,
            bank=None if bank is None else np.array(image_array(bank), dtype=np.float32),
            n_bank=self.n_bank.value(),
            parameters={
                "intervention": self.intervention.currentText(),
                "outcome": Outcome(self.outcome.currentText()),
                "granularity": granularity,
                "layer": self.layer_choice.currentText() if granularity == "channels" else None,
                "n_screen": self.n_screen.value(),
                "n_estimate": self.n_estimate.value(),
                "tau": self.tau.value(),
                "seed": self.seed.value(),
                "device": self.device.currentText(),
            },
        )

    def run(self) -> None:
        """Start a run in a background worker (refused while one is going)."""
        if self.refuse_if_running():
            return
        try:
            job = self.make_job()
        except USER_ERRORS as error:
            show_error(user_message(error))
            return
        self.start_worker(job.iter_run, loading_text="loading the model and bank activations…")

    def settings_panel(self) -> QWidget:
        return self.tabs.widget(0)

    def _on_returned(self, result: ComponentExplanation) -> None:
        self.result = result
        attached = self.attach_to_explanations(result)
        top = result.table()[0]
        self.summary.setText(
            f"<b>{result.model_identity.get('name', 'model')}</b>, {len(result.components)} components, "
            f"{result.parameters['intervention']['name']} intervention: largest effect "
            f"<b>{top['name']}</b> ({top['ate']:+.2f} ± {1.96 * top['standard_error']:.2f}). "
            f"{result.forward_passes} forward passes, {result.timings.get('total_s', 0):.1f} s."
            + (f" Attached to {attached} result layer(s): saved with them." if attached else "")
        )
        self.plot.show_result(result)
        self.save_button.setEnabled(True)
        self.tabs.setCurrentIndex(1)
        self.progress.setValue(1000)
        self.progress.setFormat(f"done in {result.timings.get('total_s', 0):.1f} s")

    def attach_to_explanations(self, result: ComponentExplanation) -> int:
        """Put ``result`` into the extras of region explanations of the same model and region."""
        seen = []
        for layer in self.viewer.layers:
            explanation = explanation_from_layer(layer)
            if explanation is None or any(explanation is e for e in seen):
                continue
            same_model = explanation.model_identity.get("sha256") == result.model_identity.get("sha256")
            if same_model and np.array_equal(explanation.target_region, result.target_region):
                explanation.extras.update(result.to_extras())
                seen.append(explanation)
        return len(seen)

    def _on_errored(self, error: Exception) -> None:
        logger.error("napari-pdcr component run failed", exc_info=(type(error), error, error.__traceback__))
        self.progress.setFormat("failed")
        if isinstance(error, TypeError) and "nn.Module" in str(error):
            show_error(str(error))
        else:
            show_error(user_message(error))

    # ------------------------------------------------------------------ saving
    def save_result(self, path: str | Path | None = None) -> Path | None:
        """Save the latest result as ``.npz`` (asks for a path when none is given)."""
        if self.result is None:
            show_error("There is no result to save yet: run first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save component effects", "components.npz", "npz (*.npz)")
            if not path:
                return None
        path = Path(path)
        written = self.result.save(path if path.suffix == ".npz" else path.with_name(path.name + ".npz"))
        show_info(f"Saved the component effects to {written}")
        return written
