"""Scoring of a classifier: from class scores ``(N, K)`` to outcomes of the chosen class.

A classifier's output is global, so there is no target region: its scores are scored as
one "voxel" with ``K`` channels, ``(N, K, 1)``, by the same :class:`~napari_pdcr.outcomes.Outcome`
kinds as a region, with the chosen class as the reference (that voxel *is* of the
chosen class). So for a classifier:

- ``"mean_logit"``: the chosen class's logit;
- ``"mean_probability"``: 100 x its probability at temperature ``T`` (softmax over the
  classes, or sigmoid for one output);
- ``"dice"``: 100 while the predicted class stays the chosen one, 0 when it changes
  (the hard outcome: the Dice of one voxel against the chosen class);
- ``"soft_dice"``: ``200 p / (1 + p)`` of that probability ``p``.

:class:`ClassScoring` is the classifier's :class:`~napari_pdcr.engine.scoring.RegionScoring`
(:func:`~napari_pdcr.engine.scoring.region_scoring` returns it for a classifier), so input
blocks, RISE and the faithfulness curves run on classifiers unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_pdcr.engine.scoring import RegionScoring, SharedRegionScoring, check_finite
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome


def class_channel(outcome: Outcome, class_scores: torch.Tensor, activation: str) -> int:
    """The class a classifier's outcome explains, for unperturbed scores ``(1, K)``.

    The outcome's channel when it has one (checked against ``K``); else the default of the
    activation (one sigmoid output: 0; two softmax classes: 1, e.g. "lesion present");
    else, for more classes, the predicted class.
    """
    n_classes = int(class_scores.shape[1])
    if outcome.channel is None and n_classes > 2 and activation != "sigmoid":
        return int(class_scores[0].argmax())
    return outcome.resolve_channel(n_classes, activation)


def class_prediction(outcome: Outcome, class_scores: torch.Tensor, activation: str, channel: int,
                     spatial_shape: Sequence[int]) -> np.ndarray:
    """Bool ``spatial_shape``: everywhere True when the classifier, on scores ``(1, K)``, predicts
    the chosen class ``channel`` (the classifier's "prediction" drawn over the image), else False."""
    predicted = outcome.predicted_mask(class_scores[:, :, None], activation, channel)[0, 0]
    return np.full(tuple(spatial_shape), bool(predicted))


class ClassScoring(RegionScoring):
    """The outcome of a classifier's class scores (see the module docstring).

    ``region_index`` is ignored (a classifier's output has no region); the reference is
    always the chosen class. Other parameters: :class:`~napari_pdcr.engine.scoring.RegionScoring`.
    """

    def __init__(self, model: SegmentationModel, region_index=None, outcome: Outcome | None = None,
                 precision: str = "float32"):
        super().__init__(model, np.zeros(1, np.int64), outcome, precision)

    def region_scores(self, batch: torch.Tensor, forward=None) -> torch.Tensor:
        """Class scores as one voxel, ``(N, K, 1)`` float32, for a batch ``(N, C, *S)``."""
        with torch.inference_mode(), self.autocast():
            scores = (forward or self.model)(batch)
        return check_finite(self.model, scores).float()[:, :, None]

    def set_base(self, base_scores: torch.Tensor, reference: np.ndarray | None = None) -> float:
        """Fix the class from unperturbed scores ``(1, K, 1)``; return ``Y(x)``. ``reference`` is ignored."""
        self.channel = class_channel(self.outcome, base_scores[:, :, 0], self.model.activation)
        self.reference = torch.ones(1, dtype=torch.bool)
        self.base = float(self(base_scores)[0])
        return self.base

    def region_reference(self, reference, window=None):
        """None: a classifier's reference is its chosen class, not a mask."""
        return None


class SharedClassScoring(SharedRegionScoring):
    """Several outcomes of the same class scores (a temperature sweep of a classifier): outcomes ``(N, J)``."""

    def __init__(self, model: SegmentationModel, region_index, outcomes: Sequence[Outcome], precision: str = "float32"):
        super().__init__(model, np.zeros(1, np.int64), outcomes, precision)
        self.members = [ClassScoring(model, None, outcome, precision) for outcome in outcomes]

    region_scores = ClassScoring.region_scores
    region_reference = ClassScoring.region_reference


def class_scoring(model: SegmentationModel, outcome: Outcome | Sequence[Outcome], precision: str = "float32") -> RegionScoring:
    """A :class:`ClassScoring` for one outcome, a :class:`SharedClassScoring` for a sequence."""
    if isinstance(outcome, Outcome):
        return ClassScoring(model, None, outcome, precision)
    return SharedClassScoring(model, None, list(outcome), precision)
