"""The base of the map-valued baselines: check inputs, run, return an :class:`AttributionMap`.

Seg-Grad-CAM, integrated gradients, gradient x input and RISE share everything but the
map itself: the inputs are checked before the model moves, the unperturbed prediction
and region score are recorded, and the map is returned as an
:class:`~napari_pdcr.explanations.attribution.AttributionMap` of the image's spatial
shape. A subclass implements :meth:`AttributionMethod.iter_map`.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Generator
from typing import ClassVar

import numpy as np
import torch

from napari_pdcr.engine.estimator import Progress
from napari_pdcr.explanations.attribution import POSITIVE_SUPPORTS, AttributionMap
from napari_pdcr.interventions import make_intervention
from napari_pdcr.methods.base import Method
from napari_pdcr.methods.region_score import RegionScore
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for


class AttributionMethod(Method):
    """A method whose result is one value per voxel; see the module docstring.

    ``outcome`` (an :class:`~napari_pdcr.outcomes.Outcome` or its kind) chooses the
    explained channel (and, for perturbation methods, what is measured). Other
    parameters: :class:`~napari_pdcr.methods.base.Method`.
    """

    #: which sign of the map supports the region
    sign: ClassVar[str] = POSITIVE_SUPPORTS
    #: what a value of the map means (for a classifier: of the chosen class's logit)
    units: ClassVar[str] = "region logit sum"

    def __init__(self, model: SegmentationModel, outcome: Outcome | str = "dice", **options):
        super().__init__(model, **options)
        self.outcome = outcome_for(outcome, model)

    @abstractmethod
    def iter_map(self, score: RegionScore, x: torch.Tensor) -> Generator[Progress, None, tuple[np.ndarray, int]]:
        """The map as a generator of progress: returns ``(map float32 S, forward passes)``.

        ``score`` is the region score on the method's device, its channel fixed;
        ``x`` the ``(C, *S)`` image in model input space on that device.
        """

    def iter_attribute(self, image, target_region=None, reference=None) -> Generator[Progress, None, AttributionMap]:
        """The map as a generator of progress; ``image``, ``target_region`` (optional for a
        classifier), ``reference``: see :meth:`Method.check_inputs`."""
        t_start = time.perf_counter()
        x, region, ref = self.check_inputs(image, target_region, reference)
        model, x = self.to_device(x)
        score = RegionScore(model, region, self.outcome).to(x.device)
        with torch.inference_mode():
            scores = score.scores(x[None])
            base_score = float(score.reduce(scores)[0])
            prediction = score.prediction(scores)
        attribution, passes = yield from self.iter_map(score, x)
        if not np.isfinite(attribution).all():
            raise FloatingPointError(f"{self.name} gave NaN or infinite values: the model's gradients are not finite")
        return AttributionMap(
            attribution=np.asarray(attribution, np.float32),
            target_region=region,
            prediction=prediction,
            reference=ref,
            method=self.name,
            sign=self.sign,
            units=self.units,
            base_score=base_score,
            parameters=self.parameters(),
            model_identity=model.identity(),
            provenance=self.provenance(),
            timings={"total_s": time.perf_counter() - t_start},
            forward_passes=passes,
        )


def channel_sum(attribution: torch.Tensor) -> np.ndarray:
    """A Captum attribution ``(1, C, *S)`` summed over channels: float32 ``S`` on the CPU."""
    return attribution.detach()[0].sum(dim=0).float().cpu().numpy()


#: baseline (or fill) images made from the image itself
BASELINES = ("zero", "mean", "blur")


def baseline_image(x: torch.Tensor, baseline: str) -> torch.Tensor:
    """The baseline image ``(C, *S)`` for ``x`` ``(C, *S)``: zeros, the per-channel mean, or a
    Gaussian blur (sigma 4 voxels), on ``x``'s device."""
    intervention = make_intervention(baseline)
    intervention.prepare(x)
    return intervention.sample(x, 1, None, tuple(slice(0, n) for n in x.shape[1:]))[0].to(x.device)
