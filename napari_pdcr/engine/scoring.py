"""Scoring: from a forward batch to outcomes in the target region, written once.

Every kind of node (input blocks, blocks of a sliding-window model, network components)
measures the same thing: the model's scores at the target region's voxels ``(N, K, M)``,
the explained channel, the reference mask inside the region and the outcome ``(N,)``.
:class:`RegionScoring` holds those; the node sets only decide what goes into a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome

#: ``precision`` values: ``None`` is float32; the others autocast on CUDA, and bfloat16 also
#: on the CPU (opt-in: it changes the scores; docs/benchmarks.md measures speed and fidelity).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision_context(device: torch.device, precision: str):
    """Autocast context for reduced precision on CUDA (and bfloat16 on the CPU); float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None or not (device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16)):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_finite(model: SegmentationModel, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` unchanged; ``FloatingPointError`` if any is NaN or infinite."""
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"model {model.name!r} returned NaN or infinite scores")
    return scores


class RegionScoring:
    """The outcome of a model's scores in a target region.

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` being explained.
    region_index
        Flat indices ``(M,)`` of the target region's voxels in the evaluated grid (the
        whole image, or the crop the model runs on).
    outcome
        What is measured.
    precision
        ``"float32"``, or ``"bfloat16"`` / ``"float16"`` autocast on CUDA.

    Call :meth:`set_base` with the unperturbed scores before scoring anything: it fixes
    the explained channel and the reference, and returns the base outcome ``Y(x)``.
    """

    def __init__(self, model: SegmentationModel, region_index: np.ndarray, outcome: Outcome, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        self.model, self.outcome, self.precision = model, outcome, precision
        self.region_index = torch.from_numpy(np.asarray(region_index, dtype=np.int64))
        self.channel: int | None = None
        self.reference: torch.Tensor | None = None
        self.base: float | None = None

    def autocast(self):
        """The precision context for this model's device."""
        return precision_context(self.model.device, self.precision)

    def region_scores(self, batch: torch.Tensor, forward=None) -> torch.Tensor:
        """Scores ``(N, K, M)`` float32 at the region's voxels, for a batch ``(N, C, *S)``.

        ``forward`` runs the batch (default: the model, with its padding and windows).
        """
        with torch.inference_mode(), self.autocast():
            scores = (forward or self.model)(batch)
        flat = scores.flatten(2)
        # only the region's scores make the outcome: they are the ones checked (a whole map per batch is not)
        return check_finite(self.model, flat[:, :, self.region_index.to(flat.device)]).float()

    def set_base(self, base_scores: torch.Tensor, reference: np.ndarray | None = None) -> float:
        """Fix the channel and the reference from unperturbed scores ``(1, K, M)``; return ``Y(x)``.

        ``reference``: bool ``(M,)`` in region order (``None``: the model's own prediction).
        """
        activation = self.model.activation
        self.channel = self.outcome.resolve_channel(base_scores.shape[1], activation)
        predicted = self.outcome.predicted_mask(base_scores, activation, self.channel)[0].cpu()
        self.reference = predicted if reference is None else torch.from_numpy(np.asarray(reference, dtype=bool))
        self.base = float(self(base_scores)[0])
        return self.base

    def region_reference(self, reference: np.ndarray | None, window: tuple[slice, ...] | None = None):
        """A bool ``S`` reference mask restricted to the evaluated grid, in region order (None stays None)."""
        if reference is None:
            return None
        inside = reference if window is None else reference[window]
        return inside.ravel()[self.region_index.numpy()]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Outcomes ``(N,)`` float64 of region scores ``(N, K, M)``."""
        if self.channel is None:
            raise RuntimeError("RegionScoring.set_base must be called before scoring")
        return self.outcome(scores, self.reference, self.model.activation, self.channel)


class SharedRegionScoring(RegionScoring):
    """Several outcomes of the same forward batch: outcomes ``(N, J)``.

    A temperature sweep measures one outcome at ``J`` temperatures on the same draws;
    several target regions (``member_positions``) measure each outcome ``j`` on its own
    region's voxels. ``region_index`` is then the union of the regions, in flat order,
    and ``member_positions[j]`` the positions ``(M_j,)`` of region ``j``'s voxels in it.
    ``base`` is ``(J,)``; every outcome must explain the same channel.
    """

    def __init__(self, model: SegmentationModel, region_index: np.ndarray, outcomes: Sequence[Outcome],
                 precision: str = "float32", member_positions: Sequence[np.ndarray] | None = None):
        super().__init__(model, region_index, outcomes[0], precision)
        if member_positions is None:
            member_positions = [np.arange(len(self.region_index))] * len(outcomes)
        if len(member_positions) != len(outcomes):
            raise ValueError(f"give one region per outcome; got {len(member_positions)} regions for {len(outcomes)} outcomes")
        self.positions = [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in member_positions]
        self.members = [
            RegionScoring(model, self.region_index.numpy()[p.numpy()], outcome, precision)
            for outcome, p in zip(outcomes, self.positions, strict=True)
        ]

    def set_base(self, base_scores: torch.Tensor, reference: np.ndarray | None = None) -> np.ndarray:
        """Fix every outcome's channel and reference; return the base outcomes ``(J,)``.

        ``reference``: bool ``(M,)`` in the order of :attr:`region_index` (None: the model's prediction).
        """
        self.base = np.array([
            member.set_base(
                base_scores[:, :, positions.to(base_scores.device)],
                None if reference is None else np.asarray(reference)[positions.numpy()],
            )
            for member, positions in zip(self.members, self.positions, strict=True)
        ])
        if len({member.channel for member in self.members}) > 1:
            raise ValueError("outcomes scored on the same draws must explain the same channel")
        self.channel, self.reference = self.members[0].channel, self.members[0].reference
        return self.base

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Outcomes ``(N, J)`` float64 of region scores ``(N, K, M)``."""
        return torch.stack([
            member(scores[:, :, positions.to(scores.device)])
            for member, positions in zip(self.members, self.positions, strict=True)
        ], dim=1)


def region_scoring(model: SegmentationModel, region_index: np.ndarray, outcome: Outcome | Sequence[Outcome],
                   precision: str = "float32", member_positions: Sequence[np.ndarray] | None = None) -> RegionScoring:
    """A :class:`RegionScoring` for one outcome, a :class:`SharedRegionScoring` for a sequence
    (``member_positions``: each outcome's region inside ``region_index``, see there); for a
    classifier their class-score twins (:mod:`napari_pdcr.engine.class_scoring`: no region)."""
    if model.is_classifier:
        from napari_pdcr.engine.class_scoring import class_scoring  # it builds on this module

        return class_scoring(model, outcome, precision)
    if isinstance(outcome, Outcome):
        return RegionScoring(model, region_index, outcome, precision)
    return SharedRegionScoring(model, region_index, list(outcome), precision, member_positions)
