"""Input blocks as nodes: the blocks of an image, each replaced by intervention draws."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from napari_pdcr.engine.estimator import NodeSet, halved_batch_size
from napari_pdcr.engine.incremental import IncrementalForward
from napari_pdcr.engine.intervals import outcome_bounds
from napari_pdcr.engine.scoring import region_scoring
from napari_pdcr.interventions.base import Intervention
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome
from napari_pdcr.regions import BlockGrid


class InputBlocks(NodeSet):
    """The blocks of ``image`` as intervention nodes.

    Parameters
    ----------
    model, image
        The model and the image ``(C, *S)`` in model input space (float32 tensor).
    grid
        Block grid over ``S``.
    target_region
        Bool ``S``: where the outcome is measured.
    outcome, intervention
        What is measured (one outcome, or several scored on the same batches: outcomes
        ``(B, J)``) and what replaces a block.
    reference
        Bool ``S`` reference mask for Dice outcomes; ``None``: the model's own
        unperturbed prediction.
    window
        Spatial slices of the part of the image the model is run on (an exact crop
        found by :mod:`napari_pdcr.engine.reach`); ``None``: the whole image. Every
        intervened block and the target region must lie inside it.
    member_regions
        Several target regions on the same batches: bool ``S`` masks, one per outcome
        (``outcome`` a sequence of the same length), each inside ``target_region`` (their
        union); outcome ``j`` is measured on region ``j``. ``None``: every outcome on
        ``target_region``.
    incremental
        Run intervened batches by incremental inference
        (:class:`~napari_pdcr.engine.incremental.IncrementalForward`: only what a block
        can change inside the region's bounding box is recomputed; exact). A model it does
        not support runs full inference; :attr:`incremental_status` says which ran and why.
    """

    def __init__(
        self,
        model: SegmentationModel,
        image: torch.Tensor,
        grid: BlockGrid,
        target_region: np.ndarray,
        outcome: Outcome | Sequence[Outcome],
        intervention: Intervention,
        reference: np.ndarray | None = None,
        window: tuple[slice, ...] | None = None,
        precision: str = "float32",
        member_regions: Sequence[np.ndarray] | None = None,
        incremental: bool = False,
    ):
        self.model, self.image, self.grid = model, image, grid
        self.outcome, self.intervention = outcome, intervention
        self.deterministic = intervention.deterministic
        self.outcome_bounds = outcome_bounds(outcome) if isinstance(outcome, Outcome) else [outcome_bounds(o) for o in outcome]
        self.window = window or tuple(slice(0, n) for n in grid.spatial_shape)
        self.offset = np.array([w.start for w in self.window])
        self.crop = image[(slice(None), *self.window)].contiguous()
        region_in_window = target_region[self.window]
        if region_in_window.sum() != target_region.sum():
            raise ValueError("the model window must contain the whole target region")
        positions = None if member_regions is None else [
            np.flatnonzero(member[self.window][region_in_window]) for member in member_regions
        ]
        self.scoring = region_scoring(model, np.flatnonzero(region_in_window), outcome, precision, positions)
        self.item_bytes = self.crop.numel() * self.crop.element_size()
        intervention.prepare(image)
        self.scoring.set_base(self._unperturbed_region_scores(target_region), self.scoring.region_reference(reference, self.window))
        self.incremental = None
        if incremental and precision == "float32":
            bounds = np.argwhere(region_in_window)
            needed = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(bounds.min(0), bounds.max(0), strict=True))
            self.incremental = IncrementalForward(model, self.crop, needed)

    @property
    def incremental_status(self) -> str:
        """``"on"``, ``"off: <why>; full inference is used"``, or ``"not requested"``."""
        return "not requested" if self.incremental is None else self.incremental.status

    @property
    def region_index(self) -> torch.Tensor:
        """Flat indices ``(M,)`` of the target region's voxels in the window."""
        return self.scoring.region_index

    def _unperturbed_region_scores(self, target_region: np.ndarray) -> torch.Tensor:
        """Region scores ``(1, K, M)`` of the unperturbed window."""
        try:
            return self.scoring.region_scores(self.crop[None])
        except Exception as error:  # noqa: BLE001 - re-raised, out-of-memory as a clear MemoryError
            halved_batch_size(error, batch_size=1)  # always raises at batch size 1
            raise

    @property
    def n_nodes(self) -> int:
        return self.grid.n_blocks

    def base_outcome(self) -> float:
        return self.scoring.base

    @property
    def channel(self) -> int:
        """The explained output channel."""
        return self.scoring.channel

    def sample(self, node: int, n_draws: int, rng: np.random.Generator) -> torch.Tensor:
        where = self.grid.slices(node)
        original = self.image[(slice(None), *where)]
        return self.intervention.sample(original, n_draws, rng, where)

    def strata(self, node: int, min_weight: float, max_fixed: int):
        return self.intervention.strata(self.image[(slice(None), *self.grid.slices(node))], min_weight, max_fixed)

    def local_slices(self, node: int) -> tuple[slice, ...]:
        """Slices of block ``node`` inside the window."""
        return tuple(slice(s.start - o, s.stop - o) for s, o in zip(self.grid.slices(node), self.offset, strict=True))

    #: bool ``(n_nodes, J)``: the nodes each outcome's own run would draw for (None: all);
    #: elsewhere the outcome is reported unchanged, so no other target's block passes its screen
    needed: np.ndarray | None = None

    def outcomes(self, nodes: Sequence[int], replacements: Sequence[torch.Tensor]) -> torch.Tensor:
        values = self.grouped_outcomes([(n,) for n in nodes], [(r,) for r in replacements])
        if self.needed is None:
            return values
        needed = torch.from_numpy(self.needed[np.asarray(nodes, dtype=np.int64)]).to(values.device)
        return torch.where(needed, values, torch.as_tensor(self.scoring.base, dtype=values.dtype, device=values.device))

    def grouped_outcomes(
        self, node_groups: Sequence[Sequence[int]], replacement_groups: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Outcomes ``(B,)``: item ``i`` has every block of ``node_groups[i]`` replaced at once."""
        batch = self.crop.expand(len(node_groups), *self.crop.shape).clone()
        for i, (group, reps) in enumerate(zip(node_groups, replacement_groups, strict=True)):
            for node, rep in zip(group, reps, strict=True):
                batch[(i, slice(None), *self.local_slices(node))] = rep
        forward = None
        if self.incremental is not None and self.incremental.supported:
            changed = [self._bounding_slices(group) for group in node_groups]
            forward = partial(self.incremental.forward, changed=changed)
        return self.scoring(self.scoring.region_scores(batch, forward))

    def _bounding_slices(self, group: Sequence[int]) -> tuple[slice, ...]:
        """Slices (in the window) of the bounding box of the blocks of ``group``."""
        return tuple(slice(s.start - o, s.stop - o)
                     for s, o in zip(self.grid.bounding_slices(group), self.offset, strict=True))


class BlockGroups(NodeSet):
    """Groups of input blocks, each group intervened on jointly (for coarse screening).

    A draw for a group is an independent draw for each of its blocks.
    """

    def __init__(self, blocks: InputBlocks, groups: Sequence[np.ndarray]):
        self.blocks, self.groups = blocks, [np.asarray(g) for g in groups]
        self.deterministic, self.item_bytes = blocks.deterministic, blocks.item_bytes

    @property
    def n_nodes(self) -> int:
        return len(self.groups)

    def base_outcome(self) -> float:
        return self.blocks.base_outcome()

    def sample(self, node: int, n_draws: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, ...]]:
        per_block = [self.blocks.sample(int(b), n_draws, rng) for b in self.groups[node]]
        return [tuple(draws[d] for draws in per_block) for d in range(n_draws)]

    def outcomes(self, nodes, replacements) -> torch.Tensor:
        return self.blocks.grouped_outcomes([self.groups[n] for n in nodes], replacements)
