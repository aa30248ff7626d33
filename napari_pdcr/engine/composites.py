"""Composite images as nodes: the image kept where a mask is 1 and a fill elsewhere.

RISE (random masks) and the deletion / insertion curves of the faithfulness metrics both
score images ``x * m + fill * (1 - m)`` for many masks ``m``. Node ``i`` is the
composite of mask ``mask_for(i)``; batches run through :class:`~napari_pdcr.engine.estimator.BatchRunner`
(out-of-memory back-off) and are scored by :class:`~napari_pdcr.engine.scoring.RegionScoring`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch

from napari_pdcr.engine.estimator import BatchRunner, NodeSet, Progress
from napari_pdcr.engine.scoring import region_scoring
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome


class CompositeImages(NodeSet):
    """Images mixed from ``image`` and ``fill`` by keep masks.

    Parameters
    ----------
    model, image, fill
        The model (on its device) and two ``(C, *S)`` float32 tensors on that device.
    target_region
        Bool ``S``: where the outcome is measured.
    outcome
        One outcome (outcomes ``(B,)``) or several scored on the same batches (``(B, J)``).
    masks
        ``(n_nodes, mask_for)``: ``mask_for(i)`` is node ``i``'s keep mask, float ``S``
        (1 keeps the image, 0 takes the fill), made when its batch runs.
    reference
        Bool ``S`` reference mask for Dice outcomes; ``None``: the model's own prediction.
    """

    deterministic = True

    def __init__(
        self,
        model: SegmentationModel,
        image: torch.Tensor,
        fill: torch.Tensor,
        target_region: np.ndarray,
        outcome: Outcome | Sequence[Outcome],
        masks: tuple[int, Callable[[int], torch.Tensor]],
        reference: np.ndarray | None = None,
        precision: str = "float32",
    ):
        self.model, self.image, self.fill = model, image, fill
        self._n_nodes, self.mask_for = masks
        self.scoring = region_scoring(model, np.flatnonzero(target_region), outcome, precision)
        self.scoring.set_base(self.scoring.region_scores(image[None]), self.scoring.region_reference(reference))
        self.item_bytes = image.numel() * image.element_size()

    @property
    def n_nodes(self) -> int:
        return self._n_nodes

    def base_outcome(self) -> float | np.ndarray:
        return self.scoring.base

    def sample(self, node: int, n_draws: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Node ``node``'s keep mask ``(n_draws, *S)`` (every draw is the same)."""
        return self.mask_for(int(node))[None].expand(n_draws, *self.image.shape[1:])

    def outcomes(self, nodes: Sequence[int], replacements: Sequence[torch.Tensor]) -> torch.Tensor:
        keep = torch.stack([m.to(self.image.device, self.image.dtype) for m in replacements])[:, None]
        return self.scoring(self.scoring.region_scores(self.fill + keep * (self.image - self.fill)))


def iter_composite_outcomes(
    composites: CompositeImages,
    nodes: Sequence[int],
    runner: BatchRunner,
    stage: str,
    consume: Callable[[np.ndarray, torch.Tensor], None] | None = None,
) -> Generator[Progress, None, np.ndarray]:
    """Outcomes of ``nodes`` (float64 ``(len(nodes),)`` or ``(len(nodes), J)``), a batch at a time.

    Masks are made per batch, so memory stays bounded; ``consume(batch nodes, outcomes)``
    sees every batch (RISE accumulates its map there). Yields :class:`Progress` after
    every batch; closing the generator cancels between batches.
    """
    t0, passes0 = time.perf_counter(), runner.forward_passes
    nodes = np.asarray(nodes, dtype=np.int64)
    values, done = [], 0
    while done < len(nodes):
        chunk = nodes[done : done + runner.batch_size]
        masks = [composites.sample(int(n), 1)[0] for n in chunk]
        batch_values = runner.run(composites, chunk.tolist(), masks)
        if consume is not None:
            consume(chunk, batch_values)
        values.append(batch_values.numpy())
        done += len(chunk)
        yield Progress(stage, done, len(nodes), runner.forward_passes - passes0, time.perf_counter() - t0)
    return np.concatenate(values) if values else np.zeros(0)
