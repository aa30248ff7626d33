"""Gradient x input of the region score (Captum's ``InputXGradient``)."""

from __future__ import annotations

import time

from napari_pdcr.engine.estimator import Progress
from napari_pdcr.methods.attribution import AttributionMethod, channel_sum


class GradientXInput(AttributionMethod):
    """The gradient of the sum of the explained channel's logits over the target region,
    times the input (one forward and backward pass). Positive supports the region.

    Parameters: see :class:`~napari_pdcr.methods.attribution.AttributionMethod`.
    """

    name = "gradient_x_input"

    def method_parameters(self) -> dict:
        return {"outcome": self.outcome.describe()}

    def iter_map(self, score, x):
        from captum.attr import InputXGradient

        t0 = time.perf_counter()
        attribution = InputXGradient(score).attribute(x[None].clone().requires_grad_(True))
        yield Progress("gradient x input", 1, 1, 1, time.perf_counter() - t0)
        return channel_sum(attribution), 1
