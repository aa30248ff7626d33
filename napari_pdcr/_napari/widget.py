"""The region-effects dock widget: choose an image, a model and a target region, run, see the ATE map.

The widget only gathers settings into an :class:`~napari_pdcr.jobs.ExplainJob` (reading
layer data on the GUI thread through :mod:`.inputs`), runs its generator in a napari
worker (progress per forward batch, Cancel = ``worker.quit()``), and turns the returned
explanation into layers (:mod:`.layers`) and plots (:mod:`.plots`).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from napari.layers import Labels, Layer, Shapes
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pdcr._napari.base_widget import (
    DockWidget,
    LayerChoice,
    combo_box,
    form_group,
    spin_box,
)
from napari_pdcr._napari.inputs import (
    image_array,
    image_spatial_shape,
    layer_geometry,
    region_name,
)
from napari_pdcr._napari.layers import explanation_layer_data
from napari_pdcr._napari.plots import render_plots
from napari_pdcr.jobs import ExplainJob

REGION_LAYER_NAME = "target region"
REGION_COLOR = "lime"


class RegionEffectsWidget(DockWidget):
    """Explain a segmentation model's output in a region by block interventions (ATE map)."""

    NODE = "block"
    #: Interventions offered in the widget (``constant`` needs a value: use the console).
    INTERVENTIONS = ("patch_bank", "zero", "mean", "blur", "noise")
    INTERVENTION_HELP = (
        "What replaces a block: patch_bank = crops of other images (published); zero / mean / blur / "
        "noise need no other images."
    )
    BANK_LABEL = "Patch bank"
    BANK_HELP = (
        "Other images to crop patches from: the bundled samples (2D: other Colin27 slices; "
        "3D: a second subject), or an image layer (a stack of slices or volumes)."
    )

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.picked_point: tuple[float, ...] | None = None
        groups = [self._model_group(), self._region_group(), self.parameter_group(), self._layers_group()]
        self.assemble(groups, "Compute the ATE map in the background.")
        self._on_region_kind_changed(self.region_kind.currentText())

    @property
    def explanation(self):
        """The latest :class:`~napari_pdcr.explanation.RegionExplanation` (None before a run)."""
        return self.result

    # ------------------------------------------------------------------ layout
    def _model_group(self) -> QGroupBox:
        group, form = form_group("Image and model")
        self.add_image_and_model_rows(form)
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
        self.region_kind = combo_box(
            ["labels", "shapes rectangle"],
            "Where the target region comes from: a labels layer (painted or a segmentation) or a rectangle.",
            on_change=self._on_region_kind_changed,
        )
        form.addRow("Region from", self.region_kind)

        self.labels_box = QWidget()
        labels_form = QFormLayout(self.labels_box)
        labels_form.setContentsMargins(0, 0, 0, 0)
        self.region_labels = LayerChoice(self.viewer, Labels, tooltip="The labels layer holding the target region.")
        labels_form.addRow("Labels", self.region_labels)
        self.region_value = spin_box(1, 0, 2**31 - 1, "Label value of the region (0: every non-zero label).")
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

        self.add_reference_rows(form)
        return group

    def add_method_rows(self, form) -> None:
        self.block_size = spin_box(8, 1, 256, "Block edge in pixels/voxels: the map's resolution (smaller = slower).")
        form.addRow("Block size", self.block_size)
        self.mode = combo_box(
            ("exact", "fast"),
            "exact: the published estimate, skipping blocks that provably cannot reach the region; "
            "fast: also stops drawing once a block's standard error is small (approximate).",
        )
        form.addRow("Mode", self.mode)

    def _layers_group(self) -> QGroupBox:
        group, form = form_group("Result layers")
        self.show_se = QCheckBox("Standard-error map")
        self.show_se.setToolTip("Also add the standard error of each block's effect (hidden layer).")
        self.show_prediction = QCheckBox("Prediction outline")
        self.show_prediction.setToolTip("Also add the outline of the model's prediction.")
        form.addRow("Also add", self.show_se)
        form.addRow("", self.show_prediction)
        return group

    # ------------------------------------------------------------------ reactions
    def _on_region_kind_changed(self, kind: str) -> None:
        self.labels_box.setVisible(kind == "labels")
        self.shapes_box.setVisible(kind != "labels")

    def _on_intervention_changed(self, name: str) -> None:
        self.bank_choice.setEnabled(name == "patch_bank")

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
        image = self.chosen_image()
        model = self.chosen_model()
        region, target_name = self._region(image)
        bank_layer = self.bank_choice.layer() if self.intervention.currentText() == "patch_bank" else None
        geometry = layer_geometry(image)
        return ExplainJob(
            image=np.array(image_array(image), dtype=np.float32),
            target_region=region,
            model=model,
            reference=self.reference_mask(image),
            intervention=self.intervention.currentText(),
            outcome=self.outcome.currentText(),
            temperature=self.temperature.value(),
            bank=None if bank_layer is None else np.array(image_array(bank_layer), dtype=np.float32),
            bank_description=f"image layer {bank_layer.name}" if bank_layer is not None else "",
            trusted=self.trusted.isChecked(),
            spacing=tuple(geometry["scale"]),
            source_layer=geometry,
            target_name=target_name,
            parameters={
                "block_shape": self.block_size.value(),
                "mode": self.mode.currentText(),
                **self.estimator_parameters(),
            },
        )

    def _region(self, image) -> tuple[np.ndarray, str]:
        if self.region_kind.currentText() == "labels":
            labels = self.region_labels.layer()
            if labels is None:
                raise ValueError("there is no target region: press 'Brush region' and paint, or choose a labels layer")
            value = self.region_value.value()
            point = self.picked_point if self.use_component.isChecked() else None
            if self.use_component.isChecked() and point is None:
                raise ValueError("pick a point inside the region first ('Pick point'), or untick 'Only the piece at a point'")
            return self.target_mask(labels, image, label=value, point=point), region_name(labels, value)
        shapes = self.region_shapes.layer()
        if shapes is None:
            raise ValueError("there is no shapes layer: add one and draw a rectangle over the image")
        return self.target_mask(shapes, image), shapes.name

    def _checked_job(self) -> ExplainJob:
        job = self.make_job()
        job.check()
        return job

    def run(self) -> None:
        """Start a run in a background worker (refused while one is going)."""
        options = {"show_standard_error": self.show_se.isChecked(), "show_prediction": self.show_prediction.isChecked()}
        self.start_run(
            self._checked_job,
            partial(explanation_layer_data, **options),
            partial(render_plots, width_px=self.plot_width(), scale=self.devicePixelRatioF()),
            loading_text="loading the model…",
        )

    def _on_returned(self, result) -> None:
        """Add the result layers, then show the summary and the plots in the Results tab."""
        explanation, layer_data, figure = result
        for item in layer_data:
            self.viewer.add_layer(Layer.create(*item))
        counts = explanation.counts()
        summary = (
            f"<b>{explanation.model_identity.get('name', 'model')}</b> on "
            f"{explanation.provenance.get('target_layer') or 'the region'}: "
            f"{explanation.parameters.get('outcome', {}).get('kind', 'outcome')} without intervention "
            f"{explanation.base_outcome:.1f}. Blocks: {counts['negative']} negative (supported it), "
            f"{counts['positive']} positive (hurt it), {counts['zero']} zero. "
            f"{explanation.forward_passes} forward passes on {explanation.parameters.get('device', '?')}, "
            f"{explanation.timings.get('total_s', 0):.1f} s."
        )
        self.present(explanation, summary, figure)
