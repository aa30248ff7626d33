"""Deletion and insertion curves of any explanation map on the region outcome.

The map ranks the blocks of the grid (the blocks that touch the target region are left
out, as region effects leave them out) by the sign that **supports** the region:
negative ATE for region effects and occlusion (removing the block lowers the outcome),
positive attribution for gradient maps and RISE. Then, most important first:

- **deletion**: blocks are replaced by a fill, step by step, starting from the image;
- **insertion**: blocks are restored onto the fully removed image (every ranked block
  filled), step by step.

Each step is scored by two outcomes in the target region: 100 x Dice against the
reference (the model's own prediction when none is given) and 100 x soft Dice. Curves
are divided by the outcome of the unperturbed image, and their areas (trapezoid over
the fraction of ranked blocks, 0 to 1) are the AUCs: a faithful map has a low deletion
AUC and a high insertion AUC. A **random** ranking (the mean of ``n_random`` shuffles)
is the floor. Two fills answer the out-of-distribution objection to deletion curves:
natural patches of other images (a :class:`~napari_pdcr.interventions.PatchBank`, one
draw per block) and a blur of the image.

A map that is constant over the ranked blocks (e.g. an all-zero causal map when no block
outside the region can reach it) ranks nothing. By default it is refused; with
``constant_maps="random"`` it gets **no ranking**: its curves are the random floor's (a
map without an order is no better than chance), it costs no forward pass, and
:attr:`FaithfulnessCurves.unranked` gives the reason.

Every step is one composite image ``x * keep + fill * (1 - keep)``; they run in batches
through the engine's :class:`~napari_pdcr.engine.estimator.BatchRunner` and
:class:`~napari_pdcr.engine.scoring.RegionScoring` (out-of-memory back-off), yielding
:class:`~napari_pdcr.engine.Progress`, and closing the generator cancels.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from napari_pdcr.engine.composites import CompositeImages, iter_composite_outcomes
from napari_pdcr.engine.estimator import BatchRunner, Progress, drive
from napari_pdcr.explanations.attribution import (
    NEGATIVE_SUPPORTS,
    POSITIVE_SUPPORTS,
    SIGNS,
    AttributionMap,
)
from napari_pdcr.explanations.region import RegionExplanation
from napari_pdcr.interventions import Blur, Intervention
from napari_pdcr.methods.base import default_batch_size
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.devices import resolve_device
from napari_pdcr.outcomes import Outcome, outcome_for
from napari_pdcr.regions import BlockGrid, validate_reference, validate_region
from napari_pdcr.validation import non_negative_int, optional_positive_int, positive_int

DIRECTIONS = ("deletion", "insertion")
#: the outcomes every step is scored by
CURVE_OUTCOMES = ("dice", "soft_dice")
#: the name of the random-order floor among the curves
RANDOM = "random"
#: what to do with a map that is constant over the ranked blocks: refuse it, or score it as the random floor
CONSTANT_MAPS = ("error", "random")
#: the note of a map scored as the random floor
NO_RANKING = "the same value on every block outside the target region: no ranking, scored as the random floor"


class ConstantMapError(ValueError):
    """A map has the same value on every ranked block: it ranks nothing."""


def support_map(explanation, sign: str | None = None) -> np.ndarray:
    """A map with the supporting sign positive, float64 ``S``.

    ``explanation``: a :class:`RegionExplanation` (its ATE map; negative supports), an
    :class:`AttributionMap` (its own sign), or an array with ``sign``
    (``"positive_supports"`` or ``"negative_supports"``).
    """
    if isinstance(explanation, RegionExplanation):
        values, sign = explanation.ate, NEGATIVE_SUPPORTS
    elif isinstance(explanation, AttributionMap):
        values, sign = explanation.attribution, explanation.sign
    else:
        if sign not in SIGNS:
            raise ValueError(f"a map given as an array needs its sign convention: sign= one of {', '.join(SIGNS)}")
        values = explanation
    values = np.asarray(values, dtype=np.float64)
    return values if sign == POSITIVE_SUPPORTS else -values


def block_ranking(support: np.ndarray, grid: BlockGrid, ranked: np.ndarray, rng: np.random.Generator,
                  name: str = "the map") -> np.ndarray:
    """Indices of the ``ranked`` blocks (bool ``grid.shape``), most supporting first.

    A block's value is the map's mean over it; ties are broken at random (``rng``).
    Raises ``ValueError`` for a map of the wrong shape, an empty map, NaN or infinite
    values, or one that is constant over the ranked blocks (it ranks nothing).
    """
    support = np.asarray(support, dtype=np.float64)
    if support.size == 0:
        raise ValueError(f"{name} is empty: give a map of the image's spatial shape {grid.spatial_shape}")
    if support.shape != grid.spatial_shape:
        raise ValueError(f"{name} has shape {support.shape}, not the image's spatial shape {grid.spatial_shape}")
    if not np.isfinite(support).all():
        raise ValueError(f"{name} contains NaN or infinite values: replace them (e.g. np.nan_to_num) before scoring it")
    values = grid.mean_per_block(support).ravel()[np.flatnonzero(ranked.ravel())]
    if values.size and np.ptp(values) == 0:
        raise ConstantMapError(f"{name} has the same value on every block outside the target region: it ranks nothing, "
                         "so it has no deletion or insertion curve")
    blocks = np.flatnonzero(ranked.ravel())
    shuffle = rng.permutation(len(blocks))
    return blocks[shuffle][np.argsort(-values[shuffle], kind="stable")]


@dataclass
class FaithfulnessCurves:
    """Deletion and insertion curves of several maps on one image and region.

    ``curves[name]`` is float64 ``(2, n_fills, n_outcomes, n_steps + 1)``: direction
    (deletion, insertion), fill, outcome (:data:`CURVE_OUTCOMES`), step, each divided by
    the unperturbed image's outcome ``base_outcome`` ``(n_outcomes,)``; ``fractions``
    ``(n_steps + 1,)`` is the share of ranked blocks removed (deletion) or restored
    (insertion). ``curves["random"]`` is the random-order floor. ``unranked[name]`` says why
    a map got no ranking (constant over the ranked blocks; its curves are the floor's).
    """

    fractions: np.ndarray
    fills: tuple[str, ...]
    outcomes: tuple[str, ...]
    curves: dict[str, np.ndarray]
    base_outcome: np.ndarray
    n_ranked_blocks: int
    forward_passes: int = 0
    elapsed_s: float = 0.0
    parameters: dict = field(default_factory=dict)
    unranked: dict[str, str] = field(default_factory=dict)

    def auc(self, name: str) -> np.ndarray:
        """Areas under ``name``'s curves, ``(2, n_fills, n_outcomes)`` (1 = the base outcome throughout)."""
        curve = self.curves[name]
        widths = np.diff(self.fractions)
        return ((curve[..., 1:] + curve[..., :-1]) / 2 * widths).sum(axis=-1)

    def table(self) -> list[dict]:
        """One row per map: ``{"method": name, "ranked": bool, "note": text, "deletion auc (fill, outcome)": ...,
        "insertion auc (...)": ...}`` (``ranked`` False: the map ranks nothing, its AUCs are the random floor's)."""
        rows = []
        for name in self.curves:
            area = self.auc(name)
            row = {"method": name, "ranked": name not in self.unranked, "note": self.unranked.get(name, "")}
            for d, direction in enumerate(DIRECTIONS):
                for f, fill in enumerate(self.fills):
                    for o, outcome in enumerate(self.outcomes):
                        row[f"{direction} auc ({fill}, {outcome})"] = float(area[d, f, o])
            rows.append(row)
        return rows

    def beats(self, name: str, other: str) -> np.ndarray:
        """Bool ``(2, n_fills, n_outcomes)``: ``name`` is more faithful than ``other`` (lower deletion,
        higher insertion AUC)."""
        a, b = self.auc(name), self.auc(other)
        return np.stack([a[0] < b[0], a[1] > b[1]])


class Faithfulness:
    """Deletion and insertion curves of explanation maps (see the module docstring).

    Parameters
    ----------
    model
        The :class:`~napari_pdcr.models.SegmentationModel` the maps explain.
    fills
        ``{name: Intervention}``: what replaces a removed block (one draw per block,
        seeded). Default ``{"blur": Blur()}``; add a
        :class:`~napari_pdcr.interventions.PatchBank` as ``"patch_bank"`` for natural
        patches (``compare_methods`` does).
    block_shape
        Blocks the map ranks (default 8; use the causal map's blocks).
    n_steps
        Points on each curve besides the start; ``None``: one step per ranked block.
    n_random
        Shuffles averaged into the random-order floor.
    constant_maps
        ``"error"`` (default): a map constant over the ranked blocks raises ``ValueError``;
        ``"random"``: it gets the random floor's curves and is listed in ``unranked``.
    seed, device, batch_size, memory_budget_mb
        As for :class:`~napari_pdcr.methods.base.Method`.
    """

    def __init__(self, model: SegmentationModel, fills: Mapping[str, Intervention] | None = None,
                 block_shape=8, n_steps: int | None = 20, n_random: int = 3, constant_maps: str = "error",
                 seed: int = 0, device="auto", batch_size: int | None = None, memory_budget_mb: float = 1024):
        if not isinstance(model, SegmentationModel):
            raise TypeError(f"model must be a SegmentationModel; got {type(model).__name__}")
        self.model = model
        self.fills = dict(fills) if fills is not None else {"blur": Blur()}
        if not self.fills or not all(isinstance(f, Intervention) for f in self.fills.values()):
            raise ValueError("fills must map names to Interventions (e.g. {'blur': Blur()}); got none or other values")
        self.block_shape = block_shape
        self.n_steps = optional_positive_int("n_steps", n_steps)
        self.n_random = positive_int("n_random", n_random)
        if constant_maps not in CONSTANT_MAPS:
            raise ValueError(f"constant_maps must be one of {', '.join(CONSTANT_MAPS)}; got {constant_maps!r}")
        self.constant_maps = constant_maps
        self.seed = non_negative_int("seed", seed)
        self.device = resolve_device(device)
        self.batch_size, self.memory_budget_mb = optional_positive_int("batch_size", batch_size), memory_budget_mb
        self.outcomes = [outcome_for(Outcome(kind), model) for kind in CURVE_OUTCOMES]

    def parameters(self) -> dict:
        return {
            "fills": {name: fill.describe() for name, fill in self.fills.items()},
            "block_shape": self.block_shape, "n_steps": self.n_steps, "n_random": self.n_random,
            "constant_maps": self.constant_maps,
            "seed": self.seed, "device": str(self.device),
        }

    def iter_evaluate(self, image, target_region, maps: Mapping[str, object], reference=None
                      ) -> Generator[Progress, None, FaithfulnessCurves]:
        """Curves of ``maps`` (``{name: RegionExplanation | AttributionMap | (array, sign)}``).

        ``image``: ``(C, *S)`` raw intensities; ``target_region`` / ``reference``: bool ``S``
        (see :meth:`~napari_pdcr.methods.base.Method.check_inputs`). Every map is checked
        before any forward pass.
        """
        t0 = time.perf_counter()
        x = self.model.prepare_image(image)
        spatial = tuple(x.shape[1:])
        classifier = self.model.is_classifier  # its outcome is global: the region may be empty, every block is ranked
        region = (np.zeros(spatial, bool) if classifier and target_region is None
                  else validate_region(target_region, spatial, "target region", allow_empty=classifier))
        ref = None if reference is None else validate_reference(reference, spatial)
        grid = BlockGrid.create(spatial, self.block_shape)
        ranked = ~grid.any_per_block(region)
        if not ranked.any():
            raise ValueError("the target region touches every block: no block is left to rank; "
                             "choose a smaller region or smaller blocks")
        if not maps:
            raise ValueError("give at least one map to score")
        rng = np.random.default_rng([self.seed, 1])
        orders, unranked = {}, {}
        for name, value in maps.items():
            support = support_map(*value) if isinstance(value, tuple) else support_map(value)
            try:
                orders[name] = block_ranking(support, grid, ranked, rng, f"the map {name!r}")
            except ConstantMapError:
                if self.constant_maps == "error":
                    raise
                unranked[name] = NO_RANKING
        shuffles = [rng.permutation(np.flatnonzero(ranked.ravel())) for _ in range(self.n_random)]
        n_ranked = int(ranked.sum())
        n_steps = min(self.n_steps or n_ranked, n_ranked)
        counts = np.round(np.linspace(0, n_ranked, n_steps + 1)).astype(int)
        all_orders = [*orders.values(), *shuffles]

        def keep_mask(index: int) -> torch.Tensor:
            order, rest = divmod(index, 2 * (n_steps + 1))
            direction, step = divmod(rest, n_steps + 1)
            chosen = all_orders[order][: counts[step]]
            keep = np.ones(grid.n_blocks, np.float32)
            if direction == 0:  # deletion: the first blocks of the order removed
                keep[chosen] = 0
            else:  # insertion: every ranked block removed, the first ones restored
                keep[ranked.ravel()] = 0
                keep[chosen] = 1
            return torch.from_numpy(grid.to_voxels(keep.reshape(grid.shape)).astype(np.float32))

        n_nodes = len(all_orders) * 2 * (n_steps + 1)
        model = self.model.to(self.device)
        x = x.to(self.device)
        per_fill, base, passes = [], None, 0
        for fill_name, fill in self.fills.items():
            fill.check(x, grid.block_shape)
            composites = CompositeImages(model, x, self._fill_image(fill, x, grid), region, self.outcomes,
                                         masks=(n_nodes, keep_mask), reference=ref)
            base = np.asarray(composites.base_outcome(), dtype=np.float64)
            if (base <= 0).any():
                raise ValueError("the model's outcome in the target region is 0 on the unperturbed image: there is "
                                 "nothing to delete; choose a region the model segments, or give a reference mask")
            runner = BatchRunner(self.batch_size or default_batch_size(self.device, composites.item_bytes,
                                                                       self.memory_budget_mb))
            values = yield from iter_composite_outcomes(composites, range(n_nodes), runner, f"curves ({fill_name})")
            passes += runner.forward_passes
            per_fill.append(values.reshape(len(all_orders), 2, n_steps + 1, len(self.outcomes)) / base)
        # (orders, direction, fill, outcome, step)
        stacked = np.stack(per_fill, axis=2).transpose(0, 1, 2, 4, 3)
        floor = stacked[len(orders):].mean(axis=0)
        ranked_curves = dict(zip(orders, stacked, strict=False))
        curves = {name: ranked_curves[name] if name in ranked_curves else floor.copy() for name in maps}
        curves[RANDOM] = floor
        return FaithfulnessCurves(
            fractions=counts / n_ranked, fills=tuple(self.fills), outcomes=CURVE_OUTCOMES, curves=curves,
            base_outcome=base, n_ranked_blocks=n_ranked, forward_passes=passes,
            elapsed_s=time.perf_counter() - t0, parameters=self.parameters(), unranked=unranked,
        )

    def evaluate(self, image, target_region, maps, reference=None, progress=None) -> FaithfulnessCurves:
        """:meth:`iter_evaluate` run to completion; ``progress(Progress)`` returning False cancels."""
        return drive(self.iter_evaluate(image, target_region, maps, reference), progress)

    def _fill_image(self, fill: Intervention, x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
        """The fully removed image: every block replaced by one draw of ``fill`` (stream ``(seed, 2, block)``)."""
        fill.prepare(x)
        out = x.clone()
        for block in range(grid.n_blocks):
            where = (slice(None), *grid.slices(block))
            draw = fill.sample(x[where], 1, np.random.default_rng([self.seed, 2, block]), grid.slices(block))
            out[where] = draw[0].to(x.device, x.dtype)
        return out
