"""The region score the gradient baselines explain, as one N-D module for Captum.

Seg-Grad-CAM (Vinogradova et al. 2020), integrated gradients and gradient x input all
explain one number per image: the sum of the explained channel's raw scores (logits)
over the target region. :class:`RegionScore` maps a batch ``(N, C, *S)`` to those
``(N,)`` numbers, in 2D and 3D, with the model's padding and sliding windows, and picks
the explained channel as every outcome does (:meth:`~napari_pdcr.outcomes.Outcome.resolve_channel`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for


class RegionScore(nn.Module):
    """``(N, C, *S) -> (N,)``: the sum of the explained channel's logits over the target region.

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` (its network is a submodule, so
        Captum's layer hooks reach it).
    target_region
        Bool mask of the spatial shape ``S``.
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
        """The model's raw scores ``(N, K, *S)``; fixes the explained channel on the first call."""
        scores = self.model(batch)
        if self.channel is None:
            self.channel = self.outcome.resolve_channel(scores.shape[1], self.model.activation)
        return scores

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        scores = self.scores(batch)
        return scores[:, self.channel][:, self.region.to(scores.device)].sum(dim=1)
