"""Integrated gradients of the region score (Captum), with a zero, mean or blurred baseline image."""

from __future__ import annotations

import time

from napari_pdcr.engine.estimator import Progress
from napari_pdcr.methods.attribution import (
    BASELINES,
    AttributionMethod,
    baseline_image,
    channel_sum,
)
from napari_pdcr.validation import positive_int, shown


class IntegratedGradients(AttributionMethod):
    """Integrated gradients (Sundararajan et al. 2017) of the sum of the explained channel's
    logits over the target region.

    Parameters
    ----------
    baseline
        The image the path starts from: ``"zero"``, ``"mean"`` (per-channel image mean)
        or ``"blur"`` (Gaussian, sigma 4 voxels).
    n_steps
        Points on the path (Gauss-Legendre); each is one forward and backward pass.
    outcome, seed, device, batch_size, memory_budget_mb
        See :class:`~napari_pdcr.methods.attribution.AttributionMethod`.

    The map is in region-logit units per voxel (summed over input channels); its values
    add up to ``score(image) - score(baseline)`` (completeness). Positive supports the region.
    """

    name = "integrated_gradients"
    units = "region logit sum (completeness: the map sums to score(image) - score(baseline))"

    def __init__(self, model, baseline: str = "zero", n_steps: int = 32, **options):
        super().__init__(model, **options)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {shown(baseline)}")
        self.baseline = baseline
        self.n_steps = positive_int("n_steps", n_steps)

    def method_parameters(self) -> dict:
        return {"baseline": self.baseline, "n_steps": self.n_steps, "outcome": self.outcome.describe()}

    def iter_map(self, score, x):
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients

        t0 = time.perf_counter()
        yield Progress("integrated gradients", 0, self.n_steps, 0, 0.0)
        batch_size = self.choose_batch_size(x.numel() * x.element_size())
        attribution = CaptumIntegratedGradients(score).attribute(
            x[None].clone().requires_grad_(True), baselines=baseline_image(x, self.baseline)[None],
            n_steps=self.n_steps, internal_batch_size=batch_size,
        )
        yield Progress("integrated gradients", self.n_steps, self.n_steps, self.n_steps, time.perf_counter() - t0)
        return channel_sum(attribution), self.n_steps
