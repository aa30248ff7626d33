"""The score the gradient baselines explain, as one N-D module for Captum.

Seg-Grad-CAM (Vinogradova et al. 2020), integrated gradients and gradient x input all
explain one number per image: for a segmentation model, the sum of the explained
channel's raw scores (logits) over the target region; for a classifier, the chosen
class's logit (Grad-CAM proper). :class:`RegionScore` maps a batch ``(N, C, *S)`` to those
``(N,)`` numbers, in 2D and 3D, with the model's padding and sliding windows, and picks
the explained channel as every outcome does (:meth:`~napari_pdcr.outcomes.Outcome.resolve_channel`;
a classifier's as :func:`~napari_pdcr.engine.class_scoring.class_channel`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_pdcr.engine.class_scoring import class_channel, class_prediction
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for


class RegionScore(nn.Module):
    """``(N, C, *S) -> (N,)``: the sum of the explained channel's logits over the target region
    (a classifier: the chosen class's logit).

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` (its network is a submodule, so
        Captum's layer hooks reach it).
    target_region
        Bool mask of the spatial shape ``S`` (unused by a classifier's score).
    outcome
        An outcome or its kind; only its channel is used (``None``: the model's
        description, else the default channel of the activation).
    """

    def __init__(self, model: SegmentationModel, target_region: np.ndarray, outcome: Outcome | str = "dice"):
        super().__init__()
        self.model = model
        self.outcome = outcome_for(outcome, model)
        self.register_buffer("region", torch.as_tensor(np.asarray(target_region, dtype=bool)))
        self.channel: int | None = None

    def scores(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's raw scores ``(N, K, *S)`` (a classifier's ``(N, K)``); fixes the explained
        channel on the first call."""
        scores = self.model(batch)
        if self.channel is None:
            activation = self.model.activation
            self.channel = (class_channel(self.outcome, scores.detach(), activation) if self.model.is_classifier
                            else self.outcome.resolve_channel(scores.shape[1], activation))
        return scores

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """``(N,)``: the region's logit sum of the explained channel (a classifier: its logit)."""
        if self.model.is_classifier:
            return scores[:, self.channel]
        return scores[:, self.channel][:, self.region.to(scores.device)].sum(dim=1)

    def prediction(self, scores: torch.Tensor) -> np.ndarray:
        """The thresholded prediction of the explained channel for the first item of ``scores``,
        bool ``S`` (a classifier: everywhere whether it predicts the chosen class)."""
        activation, spatial = self.model.activation, tuple(self.region.shape)
        if self.model.is_classifier:
            return class_prediction(self.outcome, scores[:1], activation, self.channel, spatial)
        return self.outcome.predicted_mask(scores[:1].flatten(2), activation, self.channel)[0].reshape(spatial).cpu().numpy()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.scores(batch))
