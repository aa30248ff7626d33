"""Input blocks as nodes: the blocks of an image, each replaced by intervention draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_pdcr.engine.estimator import NodeSet, halved_batch_size
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
    ):
        self.model, self.image, self.grid = model, image, grid
        self.outcome, self.intervention = outcome, intervention
        self.deterministic = intervention.deterministic
        self.window = window or tuple(slice(0, n) for n in grid.spatial_shape)
        self.offset = np.array([w.start for w in self.window])
        self.crop = image[(slice(None), *self.window)].contiguous()
        region_in_window = target_region[self.window]
        if region_in_window.sum() != target_region.sum():
            raise ValueError("the model window must contain the whole target region")
        self.scoring = region_scoring(model, np.flatnonzero(region_in_window), outcome, precision)
        self.item_bytes = self.crop.numel() * self.crop.element_size()
        intervention.prepare(image)
        self.scoring.set_base(self._unperturbed_region_scores(target_region), self.scoring.region_reference(reference, self.window))

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

    def local_slices(self, node: int) -> tuple[slice, ...]:
        """Slices of block ``node`` inside the window."""
        return tuple(slice(s.start - o, s.stop - o) for s, o in zip(self.grid.slices(node), self.offset, strict=True))

    def outcomes(self, nodes: Sequence[int], replacements: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.grouped_outcomes([(n,) for n in nodes], [(r,) for r in replacements])

    def grouped_outcomes(
        self, node_groups: Sequence[Sequence[int]], replacement_groups: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Outcomes ``(B,)``: item ``i`` has every block of ``node_groups[i]`` replaced at once."""
        batch = self.crop.expand(len(node_groups), *self.crop.shape).clone()
        for i, (group, reps) in enumerate(zip(node_groups, replacement_groups, strict=True)):
            for node, rep in zip(group, reps, strict=True):
                batch[(i, slice(None), *self.local_slices(node))] = rep
        return self.scoring(self.scoring.region_scores(batch))


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
