"""The "Components" dock widget: component effects of a model on a target region.

It reads the layers on the GUI thread into a :class:`~napari_pdcr.jobs.ComponentJob`,
runs the job's generator (model loading, bank activations, the estimator) in a napari
worker with progress and Cancel, and shows the sorted bar chart with 95% error bars
(drawn in the worker). Listing the components loads the model in a worker too. A
finished result is attached to napari-pdcr result layers of the same model and region,
so it is saved with that region explanation; "Save result…" writes it on its own (``.npz``).
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels, Shapes
from napari.utils.notifications import show_error
from qtpy.QtGui import QFont
from qtpy.QtWidgets import QGroupBox, QPlainTextEdit, QPushButton

from napari_pdcr._napari.base_widget import (
    PAINT_REGION,
    REGION_LAYER_NAME,
    DockWidget,
    LayerChoice,
    combo_box,
    form_group,
    spin_box,
    user_message,
)
from napari_pdcr._napari.inputs import image_array
from napari_pdcr._napari.layers import explanation_from_layer
from napari_pdcr._napari.plots import render_component_plot
from napari_pdcr.components import (
    ACTIVATION_INTERVENTIONS,
    GRANULARITIES,
    format_components,
)
from napari_pdcr.explanations import ComponentExplanation, RegionExplanation
from napari_pdcr.jobs import ComponentJob, channel_layer_names
from napari_pdcr.outcomes import Outcome


def component_listing(job: ComponentJob) -> str:
    """Worker body of "List components": load the model, probe it on the image, format the listing."""
    return format_components(job.components())


class ComponentsWidget(DockWidget):
    """Explain which network components a model's output in a region relies on."""

    SAVE_DIALOG = ("Save component effects", "components", ".npz")
    RESULT_KIND = ComponentExplanation
    NODE, INTERVENTIONS = "component", ACTIVATION_INTERVENTIONS
    INTERVENTION_HELP = (
        "resample: the component's activation on another image (natural); zero: ablation; "
        "mean: mean activation over the bank; noise: Gaussian with the activation's statistics."
    )
    BANK_HELP = "Other images of the same size (a stack) whose activations are resampled / averaged."

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        groups = [self._inputs_group(), self._components_group(), self.advanced_section()]
        self.assemble(groups, "Estimate every component's effect in the background.")
        self._on_granularity_changed(self.granularity.currentText())

    # ------------------------------------------------------------------ layout
    def _inputs_group(self) -> QGroupBox:
        group, form = form_group("Image, model and region")
        self.add_image_and_model_rows(form)
        self.region_choice = LayerChoice(
            self.viewer, (Labels, Shapes), fixed=(PAINT_REGION,), preferred=REGION_LAYER_NAME,
            tooltip=f"Labels layer (the label value below) or shapes layer (rectangles) holding the target region; "
            f"by default the '{REGION_LAYER_NAME}' layer you paint (created on the first Run).",
        )
        form.addRow("Region", self.region_choice)
        self.region_value = spin_box(1, 0, 2**31 - 1, "Label value of the region (0: every non-zero label).")
        form.addRow("Label value", self.region_value)
        self.add_intervention_row(form)
        return group

    def _components_group(self) -> QGroupBox:
        group, form = form_group("Components")
        self.granularity = combo_box(
            GRANULARITIES,
            "stages: encoder/decoder stages; blocks: every block; skips: skip connections; "
            "channels: the channels of one layer.",
            on_change=self._on_granularity_changed,
        )
        form.addRow("Granularity", self.granularity)
        self.layer_choice = combo_box([], "The layer whose channels are explained.")
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

    def add_advanced_rows(self, form) -> None:
        self.n_bank = spin_box(
            16, 1, 1000, "At most this many bank images (evenly spaced); each keeps its activations in memory."
        )
        form.addRow("Bank images", self.n_bank)

    # ------------------------------------------------------------------ reactions
    def _on_model_changed(self, name: str) -> None:
        super()._on_model_changed(name)
        self.layer_choice.clear()

    def _on_granularity_changed(self, name: str) -> None:
        self.layer_choice.setEnabled(name == "channels")
        if name == "channels" and self.layer_choice.count() == 0:
            self.fill_layers()

    def _on_intervention_changed(self, name: str) -> None:
        needs_bank = ACTIVATION_INTERVENTIONS[name].needs_bank
        self.bank_choice.setEnabled(needs_bank)
        self.n_bank.setEnabled(needs_bank)

    # ------------------------------------------------------------------ tasks that load the model
    def fill_layers(self) -> None:
        """Fill the Layer choice with the model's stages and skips (the model loads in a worker)."""
        self.start_task(
            self.chosen_model, channel_layer_names, self.trusted.isChecked(),
            loading_text="loading the model…", on_returned=self._show_layers,
        )

    def _show_layers(self, names: list[str]) -> None:
        self.layer_choice.addItems(names)
        self.progress.setFormat("idle")

    def list_components(self) -> None:
        """Show the readable listing of the chosen granularity's components (probed in a worker)."""
        self.start_task(
            self.make_job, component_listing, loading_text="loading the model…", on_returned=self._show_listing
        )

    def _show_listing(self, text: str) -> None:
        self.listing.setPlainText(text)
        self.listing.setVisible(True)
        self.progress.setFormat("idle")

    # ------------------------------------------------------------------ run
    def make_job(self) -> ComponentJob:
        """The run the current settings describe; ``ValueError`` with a user sentence if impossible."""
        image = self.chosen_image()
        region_layer = self.region_choice.layer()
        if region_layer is None:
            raise ValueError("there is no target region: choose a labels or shapes layer")
        region = self.target_mask(region_layer, image, label=self.region_value.value())
        bank = self.bank_choice.layer()
        granularity = self.granularity.currentText()
        if granularity == "channels" and not self.layer_choice.currentText():
            raise ValueError("choose the layer whose channels are explained")
        return ComponentJob(
            image=np.array(image_array(image), dtype=np.float32),
            target_region=region,
            model=self.chosen_model(),
            reference=self.reference_mask(image),
            bank=None if bank is None else np.array(image_array(bank), dtype=np.float32),
            n_bank=self.n_bank.value(),
            trusted=self.trusted.isChecked(),
            parameters={
                "intervention": self.intervention.currentText(),
                "outcome": Outcome(self.outcome.currentText(), temperature=self.temperature.value()),
                "granularity": granularity,
                "layer": self.layer_choice.currentText() if granularity == "channels" else None,
                **self.estimator_parameters(),
            },
        )

    def run(self) -> None:
        """Start a run in a background worker (refused while one is going).

        Without a region yet (the default), the 'target region' layer is created in
        paint mode and nothing runs: paint it, then press Run again.
        """
        if self.region_choice.layer() is None and self.worker is None and self.image_choice.layer() is not None:
            self.prompt_to_paint()
            return
        self.start_run(
            self.make_job,
            self.figure_step(),
            loading_text="loading the model and bank activations…",
        )

    @staticmethod
    def render_figure(result, width_px: int, scale: float, theme: dict):
        return render_component_plot(result, width_px=width_px, scale=scale, theme=theme)

    def _on_returned(self, returned) -> None:
        result, figure = returned
        self.result = result
        attached = self.attach_to_explanations(result)
        summary = self.summary_text(result) + (
            f" Attached to {attached} result layer(s): saved with them." if attached else ""
        )
        self.present(result, summary, figure)

    def summary_text(self, result) -> str:
        """The Results tab's summary of a component result."""
        top = result.table()[0]
        return (
            f"<b>{result.model_identity.get('name', 'model')}</b>, {len(result.components)} components, "
            f"{result.parameters['intervention']['name']} intervention: largest effect "
            f"<b>{top['name']}</b> ({top['ate']:+.2f} ± {1.96 * top['standard_error']:.2f}). "
            f"{result.forward_passes} forward passes, {result.timings.get('total_s', 0):.1f} s."
        )

    def attach_to_explanations(self, result: ComponentExplanation) -> int:
        """Put ``result`` into the extras of region explanations of the same model and region."""
        seen = []
        for layer in self.viewer.layers:
            explanation = explanation_from_layer(layer, RegionExplanation)
            if explanation is None or any(explanation is e for e in seen):
                continue
            same_model = explanation.model_identity.get("sha256") == result.model_identity.get("sha256")
            if same_model and np.array_equal(explanation.target_region, result.target_region):
                explanation.related["components"] = result
                seen.append(explanation)
        return len(seen)

    def report_error(self, error: Exception) -> None:
        """Notify the user; a model the components cannot be found in says so in its own words."""
        if isinstance(error, TypeError) and "nn.Module" in str(error):
            show_error(str(error))
        else:
            show_error(user_message(error))
