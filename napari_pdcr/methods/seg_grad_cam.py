"""Seg-Grad-CAM (Vinogradova et al. 2020): Grad-CAM of the region score at a chosen layer (Captum)."""

from __future__ import annotations

import time

import torch

from napari_pdcr.components.enumerate import (
    Component,
    enumerate_components,
    find_component,
    network_of,
)
from napari_pdcr.engine.estimator import Progress
from napari_pdcr.methods.attribution import AttributionMethod


def default_layer(stages: list[Component], spatial_dims: int, classifier: bool = False) -> Component:
    """The bottleneck stage; else the deepest one: smallest spatial size, the last such before the output
    (a classifier's output has no spatial size: the last spatial stage may be chosen, as Grad-CAM does)."""
    spatial = [c for c in stages if c.shape is not None and len(c.shape) == spatial_dims + 1]
    for c in spatial:
        if c.name.startswith("bottleneck"):
            return c
    if not spatial:
        raise ValueError("the model has no stage with a spatial output for Seg-Grad-CAM: choose a layer (layer=...)")
    candidates = spatial if classifier else spatial[:-1] or spatial  # a segmentation's last stage is its output
    smallest = min(int(torch.tensor(c.shape[1:]).prod()) for c in candidates)
    return [c for c in candidates if int(torch.tensor(c.shape[1:]).prod()) == smallest][-1]


class SegGradCam(AttributionMethod):
    """Seg-Grad-CAM: Grad-CAM whose score is the sum of the explained channel's logits over
    the target region.

    Parameters
    ----------
    layer
        The layer whose activation is weighted by its pooled gradients: a name from
        :func:`~napari_pdcr.components.enumerate_components` (stages, blocks or skips,
        e.g. ``"encoder 2"``) or a module path; ``None``: the bottleneck (for networks
        without one, the deepest stage, see :func:`default_layer`).
    relu
        Keep only positive evidence (as in Grad-CAM); False keeps the sign.
    outcome, seed, device, batch_size, memory_budget_mb
        See :class:`~napari_pdcr.methods.attribution.AttributionMethod`.

    The layer's map is upsampled (bi/trilinear) to the image's spatial shape. Positive
    supports the region.
    """

    name = "seg_grad_cam"
    units = "layer activation x pooled gradient of the region logit sum"

    def __init__(self, model, layer: str | None = None, relu: bool = True, **options):
        super().__init__(model, **options)
        self.layer, self.relu = layer, bool(relu)
        self.chosen_layer: str | None = None  #: the layer of the last run (the default resolved)
        network_of(model)  # a clear error now for a model whose layers cannot be hooked
        if layer is not None:
            self._find_layer(None)

    def _find_layer(self, example: torch.Tensor | None) -> Component:
        stages = enumerate_components(self.model, "stages", example=example)
        if self.layer is None:
            return default_layer(stages, self.model.spatial_dims, self.model.is_classifier)
        candidates = stages + enumerate_components(self.model, "skips") + enumerate_components(self.model, "blocks")
        try:
            return find_component(candidates, self.layer, network_of(self.model))
        except KeyError as error:
            raise ValueError(f"Seg-Grad-CAM layer: {error.args[0]}") from None

    def method_parameters(self) -> dict:
        return {"layer": self.layer, "layer_used": self.chosen_layer, "relu": self.relu, "outcome": self.outcome.describe()}

    def iter_map(self, score, x):
        from captum.attr import LayerAttribution, LayerGradCam

        t0 = time.perf_counter()
        component = self._find_layer(x.cpu())
        module = dict(network_of(self.model).named_modules())[component.path]
        attribution = LayerGradCam(score, module).attribute(x[None].clone().requires_grad_(True), relu_attributions=self.relu)
        if attribution.ndim != x.ndim + 1:
            raise ValueError(
                f"Seg-Grad-CAM needs a layer with a spatial output (N, C, *S'); {component.name!r} gives shape "
                f"{tuple(attribution.shape)}: choose another layer (layer=...)"
            )
        mode = "bilinear" if self.model.spatial_dims == 2 else "trilinear"
        upsampled = LayerAttribution.interpolate(attribution.detach(), tuple(x.shape[1:]), interpolate_mode=mode)
        yield Progress("seg-grad-cam", 1, 1, 1, time.perf_counter() - t0)
        self.chosen_layer = component.name
        return upsampled[0, 0].float().cpu().numpy(), 1
