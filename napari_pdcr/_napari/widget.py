"""The region-effects dock widget: choose an image, a model and a target region, run, see the ATE map.

The widget only gathers settings into an :class:`~napari_pdcr.jobs.ExplainJob` (reading
layer data on the GUI thread through :mod:`.inputs`), runs its generator in a napari
worker (progress per forward batch, Cancel = ``worker.quit()``), and turns the returned
explanation into layers (:mod:`.layers`) and plots (:mod:`.plots`).

**Method** picks what Run computes: causal region effects (the default) or one of the
baselines of :data:`~napari_pdcr.studies.methods.METHODS`, whose map is shown with the same
colour convention (supporting red, hurting blue). A label under Run gives the upper bound
of a region-effects run's time (:meth:`~napari_pdcr.methods.RegionEffects.estimate_cost`,
computed in a thread) whenever the image, model, region, blocks or mode change.

**Compare methods** runs the ticked methods (region effects with these settings, and the
baselines) on the same image and region through
:func:`~napari_pdcr.studies.methods.iter_compare_methods` in a worker, shows the maps side
by side in grid mode (:func:`~napari_pdcr._napari.viewer.show_method_comparison`) and the
deletion / insertion curves with the AUC table in the Results tab.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from napari.layers import Labels, Layer, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
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
    PAINT_REGION,
    REGION_LAYER_NAME,
    USER_ERRORS,
    DockWidget,
    LayerChoice,
    combo_box,
    form_group,
    plot_theme,
    result_layers,
    spin_box,
    user_message,
)
from napari_pdcr._napari.inputs import (
    image_array,
    image_spatial_shape,
    layer_geometry,
    region_name,
    slice_geometry,
)
from napari_pdcr._napari.layers import METADATA_KEY
from napari_pdcr._napari.plots import EffectPlots, render_method_comparison, render_plots
from napari_pdcr._napari.viewer import add_heatmap_mask, show_method_comparison, view_in_3d
from napari_pdcr.console import cost_message
from napari_pdcr.explanations import AttributionMap, RegionExplanation
from napari_pdcr.jobs import ExplainJob, demo_model_dims, model_kind
from napari_pdcr.metrics.faithfulness import DIRECTIONS, RANDOM
from napari_pdcr.models.base import CLASSIFIER
from napari_pdcr.models.devices import torch_threads, worker_cpu_threads
from napari_pdcr.outcomes import outcome_unit
from napari_pdcr.studies.methods import METHODS, build_method

#: The Results tab's summary after Compare methods when no single run has been made.
NO_RUN_AFTER_COMPARISON = ("Method comparison below; its maps are in the viewer's grid. Press Run for one causal "
                           "map with its plots.")
#: Labels and help of the methods Compare methods offers (every one of :data:`~napari_pdcr.studies.methods.METHODS`).
METHOD_CHOICES = {
    "region_effects": ("Causal region effects", "This widget's run (its intervention, blocks and mode)."),
    "seg_grad_cam": ("Seg-Grad-CAM", "Grad-CAM of the region's logit sum at the bottleneck (fast)."),
    "integrated_gradients": ("Integrated gradients", "Gradients of the region score along a path from a zero image."),
    "gradient_x_input": ("Gradient x input", "One gradient of the region score times the image (fast)."),
    "occlusion": ("Occlusion", "Each block zeroed once: the published ablation, one draw."),
    "rise": ("RISE", "Random masks weighted by the region score (slow: many masks)."),
    "misure": ("MiSuRe", "Minimal sufficient region: dilate, then a sparse smooth mask that keeps the Dice."),
    "lrp": ("LRP (classifiers)", "Layer-wise relevance propagation, epsilon rule, of the chosen class's logit "
            "(classifiers only)."),
}
#: Ticked by default: the causal map and the two fast gradient baselines.
DEFAULT_COMPARED = ("region_effects", "seg_grad_cam", "gradient_x_input")
#: The method Run computes by default.
DEFAULT_METHOD = "region_effects"
#: Quiet time (ms) after the last change of a setting before the time estimate is computed again.
COST_DELAY_MS = 600


def loaded_input(job: ExplainJob):
    """``(model, image)``: the job's model, loaded (cached), and its image in the model's layout ``(C, *S)``."""
    from napari_pdcr.jobs import model_input, resolve_model

    model = resolve_model(job.model, trusted=job.trusted)
    return model, model_input(np.asarray(job.image, dtype=np.float32), model, job.source_layer.get("name", "the image"))


def attribute_in_worker(job: ExplainJob, name: str, *steps):
    """Worker body of a Run with the baseline ``name`` of :data:`METHODS`: its map (progress), then ``steps``.

    The method gets the job's block size (occlusion), seed and device. Returns
    ``(AttributionMap, *(step(map) for step in steps))``.
    """
    job.check()
    with torch_threads(worker_cpu_threads()):
        model, image = loaded_input(job)
        options = job.parameters
        method = build_method(name, model, None, options.get("block_shape", 8), options.get("seed", 0),
                              options.get("device", "auto"))
        explanation = yield from method.iter_attribute(image, job.target_region, job.reference)
        explanation.provenance.update(source_layer=job.source_layer or None, target_layer=job.target_name or None)
        return (explanation, *(step(explanation) for step in steps))


def cost_in_worker(job: ExplainJob) -> str:
    """Worker body of the time estimate: :func:`~napari_pdcr.console.cost_message` with the worker's threads."""
    with torch_threads(worker_cpu_threads()):
        return cost_message(job)


def compare_in_worker(job: ExplainJob, names: list[str], n_steps: int, *steps):
    """Worker body of Compare methods: load the model, run every method and the curves (progress), then ``steps``.

    Returns ``(MethodComparison, *(step(comparison) for step in steps))``.
    """
    from napari_pdcr.studies.methods import iter_compare_methods

    job.check()
    with torch_threads(worker_cpu_threads()):
        model, image = loaded_input(job)
        methods = [job.method(model, image)[0] if name == "region_effects" else name for name in names]
        options = job.parameters
        comparison = yield from iter_compare_methods(
            model, image, job.target_region, methods, job.reference, block_shape=options.get("block_shape", 8),
            bank=job.bank, n_steps=n_steps, seed=options.get("seed", 0), device=options.get("device", "auto"),
        )
        return (comparison, *(step(comparison) for step in steps))


class RegionEffectsWidget(DockWidget):
    """Explain a segmentation model's output in a region by block interventions (ATE map)."""

    NODE = "block"
    #: Interventions offered in the widget (``constant`` needs a value: use the console).
    INTERVENTIONS = ("patch_bank", "zero", "mean", "blur", "noise")
    INTERVENTION_HELP = (
        "What replaces a block: patch_bank = crops of other images (published); zero / mean / blur / "
        "noise need no other images."
    )
    #: Results of a Run: the ATE map (region effects) or a baseline's map.
    RESULT_KIND = (RegionExplanation, AttributionMap)
    BANK_LABEL = "Patch bank"
    BANK_HELP = (
        "Other images to crop patches from: the bundled samples (2D: other Colin27 slices; "
        "3D: a second subject), or an image layer (a stack of slices or volumes)."
    )

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.picked_point: tuple[float, ...] | None = None
        self.job: ExplainJob | None = None
        self.comparison = None  #: the latest MethodComparison (None before Compare methods)
        groups = [self._model_group(), self._region_group(), self._method_group(),
                  self._temperature_group(), self._compare_group(), self.advanced_section(self._add_layer_rows)]
        self.assemble(groups, "Compute the ATE map in the background.")
        self._on_region_kind_changed(self.region_kind.currentText())
        self.view_3d_button = QPushButton("View in 3D around the region")
        self.view_3d_button.setToolTip("3D rendering, the camera centred and zoomed on the region and its effects.")
        self.view_3d_button.clicked.connect(lambda: view_in_3d(self.viewer, self.result))
        results = self.save_button.parentWidget().layout()
        results.insertWidget(results.indexOf(self.save_button) + 1, self.view_3d_button)
        self.view_3d_button.setVisible(self.result is not None and self.result.target_region.ndim == 3)
        self.compare_button = QPushButton("Compare methods")
        self.compare_button.setToolTip("Run the methods ticked under 'Compare methods' on this image and region: "
                                       "maps side by side, deletion / insertion curves and AUCs in Results.")
        self.compare_button.clicked.connect(self.compare)
        self.run_row.insertWidget(1, self.compare_button)
        self._add_cost_label()
        self.comparison_summary = QLabel("")
        self.comparison_summary.setWordWrap(True)
        self.comparison_plot = EffectPlots()
        results.insertWidget(results.indexOf(self.plot) + 1, self.comparison_summary)
        results.insertWidget(results.indexOf(self.comparison_summary) + 1, self.comparison_plot)

    @property
    def explanation(self):
        """The latest :class:`~napari_pdcr.explanations.region.RegionExplanation` (None before a run)."""
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
        self.region_labels = LayerChoice(
            self.viewer, Labels, fixed=(PAINT_REGION,), preferred=REGION_LAYER_NAME,
            tooltip=f"The labels layer holding the target region; by default the '{REGION_LAYER_NAME}' layer you "
            "paint (created on the first Run).",
        )
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
        return group

    def _method_group(self) -> QGroupBox:
        group, form = form_group("Method")
        self.method_names = {METHOD_CHOICES.get(name, (name, ""))[0]: name for name in METHODS}
        self.method_choice = combo_box(
            self.method_names, "What Run computes: " + "; ".join(
                f"{label}: {METHOD_CHOICES.get(name, ('', ''))[1]}" for label, name in self.method_names.items()),
            current=METHOD_CHOICES[DEFAULT_METHOD][0], on_change=self._on_method_changed,
        )
        form.addRow("Method", self.method_choice)
        self.add_intervention_row(form)
        self.block_size = spin_box(8, 1, 256, "Block edge in pixels/voxels: the map's resolution (smaller = slower).")
        form.addRow("Block size", self.block_size)
        self.mode = combo_box(
            ("exact", "fast"),
            "exact: the published estimate, skipping blocks that provably cannot reach the region; "
            "fast: also stops drawing once a block's standard error is small (approximate).",
        )
        form.addRow("Mode", self.mode)
        return group

    def _compare_group(self) -> QGroupBox:
        """The methods Compare methods runs, and the points on each deletion / insertion curve."""
        group, form = form_group("Compare methods")
        self.compared = {}
        for name in METHODS:
            label, tooltip = METHOD_CHOICES.get(name, (name, ""))
            box = QCheckBox(label)
            box.setToolTip(tooltip)
            box.setChecked(name in DEFAULT_COMPARED)
            self.compared[name] = box
            form.addRow(box)
        self.curve_steps = spin_box(20, 2, 200, "Points on each deletion / insertion curve (more = slower).")
        form.addRow("Curve steps", self.curve_steps)
        return group

    # ------------------------------------------------------------------ temperature (issue 14)
    def _temperature_group(self) -> QGroupBox:
        """Fit the model's temperature on a labels layer (in a worker) and explain at it."""
        group, form = form_group("Temperature")
        self.calibrated_label = QLabel("calibrated T = not fitted")
        self.calibrated_label.setWordWrap(True)
        form.addRow(self.calibrated_label)
        self.calibration_labels = LayerChoice(
            self.viewer, Labels, tooltip="Labels of the structure (e.g. the sample's brain mask) to fit T on: "
            "every pixel of the image counts, labelled = foreground.", preferred="colin27_slice brain mask",
        )
        self.fit_temperature_button = QPushButton("Fit T")
        self.fit_temperature_button.setToolTip("Fit the temperature minimising the per-pixel NLL of these labels.")
        self.fit_temperature_button.clicked.connect(self.fit_temperature)
        row = QHBoxLayout()
        row.addWidget(self.calibration_labels, 1)
        row.addWidget(self.fit_temperature_button)
        form.addRow("Labels", row)
        self.at_calibrated = QCheckBox("Soft outcomes at the calibrated temperature")
        self.at_calibrated.setToolTip("Set the outcome's temperature to the fitted T (Advanced > Temperature).")
        self.at_calibrated.setEnabled(False)
        self.at_calibrated.toggled.connect(self._use_calibrated_temperature)
        form.addRow(self.at_calibrated)
        self.calibrated_temperature: float | None = None
        self.model_choice.currentTextChanged.connect(lambda _: self._show_temperature_fit(None))
        return group

    def fit_temperature(self) -> None:
        """Fit the chosen model's temperature on the chosen labels over the chosen image, in a worker."""
        from napari_pdcr._napari.base_widget import check_shape
        from napari_pdcr._napari.inputs import region_mask

        def prepare():
            image, labels = self.chosen_image(), self.calibration_labels.layer()
            if labels is None:
                raise ValueError("choose a labels layer to fit the temperature on (e.g. the sample's brain mask)")
            mask = region_mask(labels, image)
            check_shape(mask, image, f"labels {labels.name!r}")
            return self.chosen_model(), np.array(image_array(image), dtype=np.float32), mask, self.trusted.isChecked()

        self.start_task(prepare, self._fit_in_worker, loading_text="fitting the temperature…",
                        on_returned=self._show_temperature_fit)

    @staticmethod
    def _fit_in_worker(prepared):
        """Worker body: load the model, fit T (progress per forward pass), store it in the model's description."""
        from napari_pdcr.calibration import iter_fit_temperature, store_temperature
        from napari_pdcr.jobs import model_input, resolve_model
        from napari_pdcr.models.devices import torch_threads, worker_cpu_threads

        model_spec, image, mask, trusted = prepared
        with torch_threads(worker_cpu_threads()):
            model = resolve_model(model_spec, trusted)
            fit = yield from iter_fit_temperature(model, model_input(image, model), mask)
        store_temperature(model, fit)
        return fit

    def _show_temperature_fit(self, fit) -> None:
        """Show a fit (None: forget it, the model changed)."""
        self.calibrated_temperature = None if fit is None else fit.temperature
        self.at_calibrated.setEnabled(fit is not None)
        if fit is None:
            self.at_calibrated.setChecked(False)
            self.calibrated_label.setText("calibrated T = not fitted")
            return
        self.calibrated_label.setText(
            f"calibrated T = {fit.temperature:.3f} ({fit.n_pixels:,} pixels; NLL {fit.before.nll:.3f} → "
            f"{fit.after.nll:.3f}, ECE {100 * fit.before.ece:.1f}% → {100 * fit.after.ece:.1f}%)"
        )
        self.progress.setFormat(f"calibrated T = {fit.temperature:.3f}")
        self._use_calibrated_temperature(self.at_calibrated.isChecked())

    def _use_calibrated_temperature(self, on: bool) -> None:
        if on and self.calibrated_temperature is not None:
            self.temperature.setValue(self.calibrated_temperature)
        self.temperature.setEnabled(not on)

    def _add_layer_rows(self, form) -> None:
        self.show_se = QCheckBox("Standard-error map")
        self.show_se.setToolTip("Also add the standard error of each block's effect (hidden layer).")
        self.show_prediction = QCheckBox("Prediction outline")
        self.show_prediction.setToolTip("Also add the outline of the model's prediction.")
        self.show_block_status = QCheckBox("Screened-out / few-draw blocks")
        self.show_block_status.setToolTip(
            "Also add hatching over blocks set to 0 after the screen's few draws, without a test (grey), and over "
            "estimates that rest on few draws (orange): a 0 there means 'not tested', not 'no effect'.")
        self.replace_previous = QCheckBox("Replace the previous result")
        self.replace_previous.setToolTip("Remove the previous result layers of this image (else they are hidden).")
        self.keep_image = QCheckBox("Keep the image with the result")
        self.keep_image.setToolTip("Save the explained image in the result store, so that it reopens under the map.")
        self.keep_image.setChecked(True)
        form.addRow("Also add", self.show_se)
        form.addRow("", self.show_prediction)
        form.addRow("", self.show_block_status)
        form.addRow("", self.replace_previous)
        form.addRow("", self.keep_image)

    def chosen_method(self) -> str:
        """The name (in :data:`METHODS`) of the method Run computes."""
        return self.method_names[self.method_choice.currentText()]

    # ------------------------------------------------------------------ time estimate
    def _add_cost_label(self) -> None:
        """The label under Run with the time estimate, and the settings whose change updates it."""
        self.cost_label = QLabel("")
        self.cost_label.setWordWrap(True)
        self.cost_label.setToolTip("An upper bound of a region-effects run's time with these settings: every block "
                                   "reachable and passing the screen, one timed forward pass each.")
        run_section = self.layout().itemAt(self.layout().count() - 1).layout()
        run_section.insertWidget(1, self.cost_label)
        self.cost_timer = QTimer(self)
        self.cost_timer.setSingleShot(True)
        self.cost_timer.setInterval(COST_DELAY_MS)
        self.cost_timer.timeout.connect(self.estimate_cost)
        self._cost_worker = None  #: the time estimate being computed (None: none)
        self._cost_stale = False  #: a setting changed while it was computed: compute again when it ends
        self._watched_region = None  #: the labels layer whose painting updates the estimate
        for combo in (self.image_choice, self.model_choice, self.method_choice, self.region_kind, self.region_labels,
                      self.region_shapes, self.mode, self.intervention, self.device):
            combo.currentTextChanged.connect(self.schedule_cost)
        for box in (self.block_size, self.region_value, self.n_screen, self.n_estimate):
            box.valueChanged.connect(self.schedule_cost)
        self.schedule_cost()

    def schedule_cost(self, *_) -> None:
        """Compute the time estimate again once the settings have not changed for :data:`COST_DELAY_MS`."""
        region = self.region_labels.layer()
        if region is not self._watched_region:  # painting the region changes the blocks to estimate
            if self._watched_region is not None:
                self._watched_region.events.paint.disconnect(self.schedule_cost)
            if region is not None:
                region.events.paint.connect(self.schedule_cost)
            self._watched_region = region
        self.cost_timer.start()

    def estimate_cost(self) -> None:
        """Start computing the time estimate of the current settings in a thread (the label says the outcome).

        Nothing is computed while a run goes; a region-effects run only (the baselines
        take a few passes, RISE and occlusion one per mask or block). The job is read on
        the GUI thread; the model loads (cached) and one forward pass is timed in the thread.
        """
        if self.worker is not None:
            return
        if self._cost_worker is not None:
            self._cost_stale = True
            return
        name = self.chosen_method()
        if name != "region_effects":
            self.cost_label.setText(f"Time: no estimate for {self.method_choice.currentText()} (the estimate is of "
                                    "causal region effects).")
            return
        try:
            job = self.make_job()
            job.check()
        except USER_ERRORS as error:
            self.cost_label.setText(f"Time: estimated once the run is possible. {user_message(error)}")
            return
        worker = create_worker(cost_in_worker, job, _start_thread=False, _ignore_errors=True)
        # Bound methods of this widget, not lambdas: Qt drops these connections when the widget is
        # deleted, so an estimate that ends after the viewer closed touches no deleted label.
        worker.returned.connect(self._on_cost_returned)
        worker.errored.connect(self._on_cost_errored)
        worker.finished.connect(self._on_cost_finished)
        self._cost_worker = worker
        self.cost_label.setText("Time: estimating…")
        worker.start()

    def _on_cost_returned(self, text: str) -> None:
        self.cost_label.setText(f"Time: {text}.")

    def _on_cost_errored(self, error: Exception) -> None:
        self.cost_label.setText(f"Time: no estimate. {user_message(error)}")

    def _on_finished(self) -> None:
        """After a run the estimate before it is stale: clear it (a changed setting estimates again)."""
        super()._on_finished()
        self.cost_label.setText("")

    def _on_cost_finished(self) -> None:
        self._cost_worker = None
        if self._cost_stale:
            self._cost_stale = False
            self.estimate_cost()

    # ------------------------------------------------------------------ reactions
    def _on_method_changed(self, label: str) -> None:
        """Region effects use the intervention and the mode; occlusion and region effects the block size."""
        name = self.method_names[label]
        self.intervention.setEnabled(name == "region_effects")
        self.mode.setEnabled(name == "region_effects")
        self.block_size.setEnabled(name in ("region_effects", "occlusion"))

    def _on_region_kind_changed(self, kind: str) -> None:
        self.labels_box.setVisible(kind == "labels")
        self.shapes_box.setVisible(kind != "labels")

    def _on_intervention_changed(self, name: str) -> None:
        self.bank_choice.setEnabled(name == "patch_bank")

    # ------------------------------------------------------------------ region tools
    def brush_region(self) -> Labels | None:
        """Create or select the 'target region' labels layer over the image and start painting."""
        image = self.image_choice.layer()
        if image is None:
            show_error("Open or choose an image layer first: the region is painted over it.")
            return None
        layer = self.paint_region_layer(image)
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
        pixels, reference = np.array(image_array(image), dtype=np.float32), self.reference_mask(image)
        z = self._shown_slice(image, model)
        if z is not None:  # a 2D model on a stack of slices: the slice on show
            pixels, region, reference = (None if a is None else a[z] for a in (pixels, region, reference))
            geometry = slice_geometry(geometry, z)
        return ExplainJob(
            image=pixels,
            target_region=region,
            model=model,
            reference=reference,
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

    def _shown_slice(self, image, model) -> int | None:
        """The index of the slice on show when a 2D model explains a stack of slices (a 3D grey image
        layer), else None."""
        dims = model.spatial_dims if hasattr(model, "spatial_dims") else demo_model_dims(str(model))
        if dims != 2 or len(image_spatial_shape(image)) != 3 or getattr(image, "rgb", False):
            return None
        z = int(np.round(image.world_to_data(self.viewer.dims.point)[0]))
        return min(max(z, 0), image.data.shape[0] - 1)

    def _explains_classifier(self) -> bool:
        """Whether the chosen model is known (before loading) to be a classifier, which needs no target region."""
        try:
            return model_kind(self.chosen_model()) == CLASSIFIER
        except ValueError:  # no model file chosen yet
            return False

    def _region(self, image) -> tuple[np.ndarray | None, str]:
        if self._explains_classifier() and (self.region_labels.layer() if self.region_kind.currentText() == "labels"
                                            else self.region_shapes.layer()) is None:
            return None, ""  # a classifier's output is global: every block is explained for its class
        if self.region_kind.currentText() == "labels":
            labels = self.region_labels.layer()
            if labels is None:
                raise ValueError("there is no target region: press Run to create one, paint it, or choose a labels layer")
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
        self.job = job
        return job

    def run(self) -> None:
        """Start a run in a background worker (refused while one is going).

        Without a region yet (the default), the 'target region' layer is created
        in paint mode and nothing runs: paint it, then press Run again. The chosen
        :attr:`method_choice` says what runs: region effects (the job's generator) or a
        baseline (:func:`attribute_in_worker`); either map comes in as layers of one
        colour convention.
        """
        painting = self.region_kind.currentText() == "labels" and self.region_labels.layer() is None
        if painting and self.worker is None and self.image_choice.layer() is not None and not self._explains_classifier():
            self.brush_region()
            self.prompt_to_paint()
            return
        self.cost_timer.stop()
        name = self.chosen_method()
        options = {"show_prediction": self.show_prediction.isChecked()}
        if name == "region_effects":
            options["show_standard_error"] = self.show_se.isChecked()
            options["show_block_status"] = self.show_block_status.isChecked()
            self.start_run(self._checked_job, partial(result_layers, **options), self.figure_step(),
                           loading_text="loading the model…")
            return
        self.start_task(self._checked_job, attribute_in_worker, name, partial(result_layers, **options),
                        self.figure_step(), loading_text="loading the model…")

    def compare(self) -> None:
        """Run the ticked methods on this image and region in a worker (refused while a run is going)."""
        names = [name for name, box in self.compared.items() if box.isChecked()]
        if not names:
            show_error("Tick at least one method under 'Compare methods': nothing to compare.")
            return
        painting = self.region_kind.currentText() == "labels" and self.region_labels.layer() is None
        if painting and self.worker is None and self.image_choice.layer() is not None and not self._explains_classifier():
            self.brush_region()
            self.prompt_to_paint()
            return
        figure = partial(render_method_comparison, width_px=self.plot_width(), scale=self.devicePixelRatioF(),
                         theme=plot_theme(self.viewer))
        self.start_task(self._checked_job, compare_in_worker, names, self.curve_steps.value(), figure,
                        loading_text="loading the model…", on_returned=self._on_compared)

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self.compare_button.setEnabled(not running)

    def _on_compared(self, result) -> None:
        """Show the maps side by side in grid mode, and the curves and AUC table in the Results tab."""
        comparison, figure = result
        self.comparison = comparison
        image_name = (self.job.source_layer or {}).get("name") if self.job is not None else None
        image_layer = self.viewer.layers[image_name] if image_name in self.viewer.layers else None
        if image_layer is not None:
            image_layer.visible = False  # every grid cell has its own copy under the map
        region = self.region_labels.layer() if self.region_kind.currentText() == "labels" else self.region_shapes.layer()
        if region is not None:
            region.visible = False  # every cell has its outline; shown, it would fill a grid cell of its own
        show_method_comparison(self.viewer, comparison, image_layer)
        self.comparison_summary.setText(self.comparison_text(comparison))
        self.comparison_plot.show_figure(figure, self.devicePixelRatioF())
        if self.result is None:  # the tab's top would still say "No result yet"
            self.summary.setText(NO_RUN_AFTER_COMPARISON)
        self.tabs.setCurrentIndex(1)
        self.progress.setValue(1000)
        total = sum(row["wall_s"] or 0 for row in comparison.table) + comparison.curves.elapsed_s
        self.progress.setFormat(f"compared {len(comparison.maps)} methods in {total:.1f} s")

    @staticmethod
    def comparison_text(comparison) -> str:
        """The Results tab's summary of a method comparison: the most faithful method in each direction."""
        fill = comparison.curves.fills[0]
        rows = [row for row in comparison.table if row["method"] != RANDOM]
        best = {direction: (min if direction == "deletion" else max)(
            rows, key=lambda row, direction=direction: row[f"{direction} auc ({fill}, dice)"])["method"]
            for direction in DIRECTIONS}
        unranked = ", ".join(comparison.curves.unranked)
        note = f" No ranking (constant map, scored as random): {unranked}." if unranked else ""
        return (
            f"<b>Compared {len(rows)} methods</b> on the same image and region: the maps are side by side in "
            f"grid mode (red: supported the region, blue: hurt it; each map on its own scale). Most faithful "
            f"({'natural patches' if fill == 'patch_bank' else fill}, Dice): by deletion (lowest AUC) "
            f"<b>{best['deletion']}</b>, by insertion (highest AUC) <b>{best['insertion']}</b>.{note}"
        )

    @staticmethod
    def render_figure(explanation, width_px: int, scale: float, theme: dict):
        """The region-effects plots; None for a baseline's map (its summary says what it shows)."""
        if not isinstance(explanation, RegionExplanation):
            return None
        return render_plots(explanation, width_px=width_px, scale=scale, theme=theme)

    def previous_results(self, image_name: str) -> list[Layer]:
        """Result layers (of any run) over the image layer named ``image_name``."""
        return [
            layer for layer in self.viewer.layers
            if self.result_of_layer(layer) is not None
            and (layer.metadata[METADATA_KEY]["provenance"].get("source_layer") or {}).get("name") == image_name
        ]

    def _on_returned(self, result) -> None:
        """Hide (or remove) the image's previous result, add the new layers with a colour bar, show the plots.

        The layers and the plots come in one per event-loop turn (see ``add_result_layers``).
        """
        explanation, layers, figure = result
        self.result_pending = True
        self.result = explanation  # before the layers go in: they carry it (see _on_layer_inserted)
        if self.job is not None and self.keep_image.isChecked():
            explanation.extras["image"] = np.asarray(self.job.image, dtype=np.float32)
        image_name = (explanation.provenance.get("source_layer") or {}).get("name")
        previous = self.previous_results(image_name)
        replace = self.replace_previous.isChecked()
        for layer in previous if not replace else ():
            layer.visible = False
        self.add_result_layers(
            layers,
            before=[partial(self.viewer.layers.remove, layer) for layer in previous if replace],
            then=partial(self.present, explanation, self.summary_text(explanation), figure),
        )

    def present(self, result, summary: str, figure) -> None:
        """Show the result (see the base class); a 3D result offers the 3D view."""
        super().present(result, summary, figure)
        self.view_3d_button.setVisible(isinstance(result, RegionExplanation) and result.target_region.ndim == 3)
        add_heatmap_mask(self.viewer, result)  # a classifier's map as a segmentation of the reference, scored

    @staticmethod
    def classifier_target(explanation) -> str:
        """What a run without a target layer explained: a classifier's class on the whole image, else "the region"."""
        return "the whole image (a classifier)" if explanation.model_identity.get("kind") == CLASSIFIER else "the region"

    def summary_text(self, explanation) -> str:
        """The Results tab's summary of a region explanation or a baseline's map (with the colour bar's unit)."""
        if isinstance(explanation, AttributionMap):
            return self.attribution_summary(explanation)
        counts = explanation.counts()
        kind = explanation.parameters.get("outcome", {}).get("kind", "outcome")
        return (
            f"<b>{explanation.model_identity.get('name', 'model')}</b> on "
            f"{explanation.provenance.get('target_layer') or self.classifier_target(explanation)}: "
            f"{kind} without intervention "
            f"{explanation.base_outcome:.1f}. Blocks: {counts['negative']} negative (supported it), "
            f"{counts['positive']} positive (hurt it), {counts['zero']} zero. "
            f"{explanation.forward_passes} forward passes on {explanation.parameters.get('device', '?')}, "
            f"{explanation.timings.get('total_s', 0):.1f} s. Colour bar: the effect in "
            f"{outcome_unit(explanation.parameters)} (red: the block supported the outcome)."
        )

    @staticmethod
    def attribution_summary(explanation: AttributionMap) -> str:
        """The Results tab's summary of a baseline's map: what it explains, its cost and its colours."""
        label = METHOD_CHOICES.get(explanation.method, (explanation.method, ""))[0]
        units = f" ({explanation.units})" if explanation.units else ""
        return (
            f"<b>{label}</b> of <b>{explanation.model_identity.get('name', 'model')}</b> on "
            f"{explanation.provenance.get('target_layer') or 'the region'}: region score without intervention "
            f"{explanation.base_score:.3g}. {explanation.forward_passes} forward passes, "
            f"{explanation.timings.get('total_s', 0):.1f} s. Colour bar: the method's own values{units}; "
            "red: supported the region, blue: hurt it (the same convention as the ATE map)."
        )
