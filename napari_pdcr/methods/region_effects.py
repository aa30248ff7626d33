"""Region effects: the ATE of every input block on a model's outcome in a target region.

Usage (console or script)::

    from napari_pdcr import RegionEffects, load_demo_model, box_region
    model = load_demo_model("unet2d")
    method = RegionEffects(model, intervention=PatchBank(other_slices), block_shape=8)
    explanation = method.attribute(image, target_region=box_region(image.shape[1:], (100, 80), 32))
    explanation.ate            # (H, W) float32, Dice points

``iter_attribute`` is the same computation as a generator that yields
:class:`~napari_pdcr.engine.estimator.Progress` after every forward batch and returns
the :class:`~napari_pdcr.explanations.region.RegionExplanation`; the napari widget runs it in a
worker, and stopping the generator cancels the run with nothing half-made.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from napari_pdcr.engine.blocks import BlockGroups, InputBlocks
from napari_pdcr.engine.class_scoring import class_prediction
from napari_pdcr.engine.estimator import (
    SHARED_DRAWS_NOT_ADAPTIVE,
    BatchRunner,
    EstimatorSettings,
    NodeStatus,
    Progress,
    estimate_effects,
    relay,
)
from napari_pdcr.engine.incremental import IncrementalForward
from napari_pdcr.engine.reach import (
    aligned_window,
    iter_reachable_blocks_of_regions,
    verify_unreachable,
    window_is_exact,
)
from napari_pdcr.engine.scoring import PRECISIONS
from napari_pdcr.engine.throughput import fastest_batch_size
from napari_pdcr.engine.windowed import WindowedInputBlocks
from napari_pdcr.explanations.region import RegionExplanation
from napari_pdcr.interventions import Intervention, make_intervention
from napari_pdcr.methods.base import Method
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for
from napari_pdcr.regions import (
    BlockGrid,
    block_shape_for,
    bounding_box,
    cluster_by_box,
    validate_region,
    voxel_spacing,
)
from napari_pdcr.validation import shown

#: Presets of the ``mode`` argument: which accelerations are on.
MODES = {
    # the published estimator, no acceleration but batching (the reference implementation)
    "published": dict(skip_unreachable=False, crop_to_reach=False, adaptive=False, coarse_factor=1, stratify=False,
                      sequential=False),
    # the same estimand, with the exact accelerations (and a patch bank's repeated crops evaluated once)
    "exact": dict(skip_unreachable=True, crop_to_reach=True, adaptive=False, coarse_factor=1, stratify=True,
                  sequential=False),
    # exact accelerations + adaptive numbers of draws + coarse-to-fine screening, also for
    # deterministic interventions (approximate, opt-in; RegionEffects.coarse_levels)
    "fast": dict(skip_unreachable=True, crop_to_reach=True, adaptive=True, coarse_factor=2, stratify=True,
                 sequential=False),
    # exact accelerations + a sequential screen: draws go on while a block's interval crosses +-tau
    # (docs/uncertainty.md)
    "sequential": dict(skip_unreachable=True, crop_to_reach=True, adaptive=False, coarse_factor=1, stratify=True,
                       sequential=True),
}


REGIONS_NOT_ADAPTIVE = (
    "several regions share every draw, but adaptive or sequential draws (mode='fast' or 'sequential') would "
    "stop at other draws in each: "
    "use mode='exact', or one run per region"
)


def coarse_groups(grid: BlockGrid, blocks: np.ndarray, levels: tuple[int, ...]) -> list[list[np.ndarray]]:
    """The groups of a coarse-to-fine screen of ``blocks`` (flat indices), one list per level of ``levels``.

    At level ``f`` the blocks fall into groups of ``f`` blocks per axis (aligned to the
    grid). A group of level ``f`` whose blocks all lie in one group of the next, finer
    level (or that is a single block, at the finest level) is left to that level, where
    it costs the same pass; the finer levels list every group of ``blocks`` (the run then
    screens only those inside the groups a coarser level kept).
    """
    blocks = np.asarray(blocks, dtype=np.int64)
    coords = np.stack(np.unravel_index(blocks, grid.shape), axis=1) if len(blocks) else np.zeros((0, len(grid.shape)), int)
    out = []
    for i, factor in enumerate(levels):
        finer = levels[i + 1] if i + 1 < len(levels) else 1
        groups = []
        if len(blocks):
            _, inverse = np.unique(coords // factor, axis=0, return_inverse=True)
            inverse = inverse.ravel()
            for g in range(inverse.max() + 1):
                members = np.flatnonzero(inverse == g)
                if len(np.unique(coords[members] // finer, axis=0)) > 1:
                    groups.append(blocks[members])
        out.append(groups)
    return out


def region_masks(regions, spatial_shape: tuple[int, ...]) -> dict:
    """Target regions as ``{label or key: bool S mask}``, checked.

    ``regions``: a label image of shape ``S`` (integers; every non-zero label is a
    region; a bool mask is the one label 1) or a mapping ``key -> mask`` with ``str`` or
    ``int`` keys (masks may overlap).
    """
    if isinstance(regions, Mapping):
        if not regions:
            raise ValueError("regions is an empty mapping: give at least one region mask")
        for key in regions:
            if not isinstance(key, str | int | np.integer):
                raise TypeError(f"region keys must be str or int (they are saved with the results); got {shown(key)}")
        return {
            key if isinstance(key, str) else int(key): validate_region(mask, spatial_shape, f"region {key!r}")
            for key, mask in regions.items()
        }
    labels = np.asarray(regions)
    if labels.shape != tuple(spatial_shape):
        raise ValueError(f"the label image has shape {labels.shape} but the image's spatial shape is {tuple(spatial_shape)}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ValueError("the label image must hold whole numbers (one label per region); round it or use a Labels layer")
        labels = labels.astype(np.int64)
    values = np.unique(labels)
    values = values[values != 0]
    if not len(values):
        raise ValueError("the label image has no non-zero label: paint at least one region")
    return {int(value): labels == value for value in values}


@dataclass(frozen=True)
class CostEstimate:
    """Upper bound of a region-effects run (:meth:`RegionEffects.estimate_cost`).

    ``n_blocks``: candidate blocks; ``passes``: forward passes (images) at most;
    ``seconds_per_pass``: one timed whole-image pass; ``mode``: the run's mode;
    ``passes_if_pruned``: with a coarse screen (``mode="fast"``), the passes when every
    block reaches the region and the screen prunes every group at the first level that
    screens it (the short end for a model that reads the whole image; ``None`` without
    a coarse screen).
    """

    n_blocks: int
    passes: int
    seconds_per_pass: float
    mode: str
    passes_if_pruned: int | None = None

    @property
    def seconds(self) -> float:
        """Time at most, in seconds."""
        return self.passes * self.seconds_per_pass

    def message(self) -> str:
        """One line for a person: the bound, and what to change when it is long."""
        minutes = self.seconds / 60
        text = (
            f"at most about {minutes:.0f} minutes ({self.passes} forward passes of {self.seconds_per_pass:.2g} s "
            f"for {self.n_blocks} blocks)" if minutes >= 1 else
            f"at most about {self.seconds:.0f} s ({self.passes} forward passes for {self.n_blocks} blocks)"
        )
        if self.passes_if_pruned is not None and self.passes_if_pruned < self.passes:
            best = self.passes_if_pruned * self.seconds_per_pass
            text += (f", about {best / 60:.0f} minutes" if best >= 120 else f", about {best:.0f} s") + (
                f" ({self.passes_if_pruned} passes) where the coarse screen prunes everything")
        if minutes >= 2:
            text += ": choose " + ("larger blocks" if self.mode == "fast" else "fast mode or larger blocks") + " to make it shorter"
        return text


class RegionEffects(Method):
    """Causal effects of input blocks on a segmentation model's output in a target region.

    Parameters
    ----------
    model
        A :class:`~napari_pdcr.models.SegmentationModel`; for a classifier the target region
        is optional and every block is explained for its class (no reach, window or
        incremental acceleration: its output is global).
    intervention
        What replaces a block: an :class:`~napari_pdcr.interventions.Intervention` (e.g.
        a :class:`~napari_pdcr.interventions.PatchBank` of other images) or a name
        (``"zero"``, ``"mean"``, ``"blur"``, ``"noise"``, ``"constant"``).
    outcome
        An :class:`~napari_pdcr.outcomes.Outcome` or its kind (``"dice"`` default); the
        channel of the model's description is used where it gives none.
    block_shape
        Block size in voxels, one int or one per spatial axis (default 8).
    n_screen, n_estimate, tau
        The published two-stage estimate: ``n_screen`` draws screen each block; blocks
        whose every change is below ``tau`` get 0; the others get ``n_estimate`` fresh
        draws, and a mean below ``tau`` is reported as 0. Deterministic interventions use
        one draw.
    mode
        ``"exact"`` (default): the published estimand with exact accelerations (blocks
        that provably cannot reach the region are skipped; the model runs on the
        smallest verified window). ``"fast"``: also adaptive draws (approximate; stops a
        block once its standard error is below ``se_target``) and a coarse-to-fine
        screen (approximate; groups of blocks intervened on jointly, and pruned,
        status PRUNED_COARSE, when the joint change is below tau: effects inside a group
        can cancel; for a deterministic intervention one pass per group, at two levels,
        see :meth:`coarse_levels`). ``"sequential"``
        (recommended, docs/uncertainty.md): the exact accelerations with a sequential
        screen: a block's draws go on, in rounds of 10, while its 95 % interval still
        crosses +-tau (or its standard error is above ``se_target``), up to ``n_estimate``. ``"published"``: no accelerations besides
        batching. Outside ``"published"`` a patch bank's repeated crops (e.g. all-zero
        background) are evaluated once each: the same ATE, stratified.
    seed
        Seed of every random draw; a run is reproducible on CPU whatever the batch size.
    device
        ``"auto"`` (cuda, mps, cpu), or a device. The model is moved there.
    batch_size, memory_budget_mb
        Images per forward pass; by default chosen from the memory budget. Halved
        automatically on out-of-memory.
    precision
        ``"float32"``, or ``"bfloat16"`` / ``"float16"`` autocast on CUDA; ``"bfloat16"``
        also autocasts on the CPU (faster on some CPUs; changes the scores slightly).
    batch_probe
        Without ``batch_size``: time a few batch sizes up to the memory budget's on the
        evaluated window and use the fastest (:mod:`napari_pdcr.engine.throughput`); the
        probe's images count in ``forward_passes``. Changes the speed, not the numbers.
    incremental
        Exact incremental inference (:mod:`napari_pdcr.engine.incremental`): recompute
        only what a block can change inside the region. ``None`` (default): on in
        ``"exact"`` and ``"fast"``, off in ``"published"``; models it does not support run
        full inference (``parameters["incremental"]`` says which ran).
    """

    def __init__(
        self,
        model: SegmentationModel,
        intervention: Intervention | str = "zero",
        outcome: Outcome | str = "dice",
        block_shape: int | tuple[int, ...] = 8,
        n_screen: int = 3,
        n_estimate: int = 50,
        tau: float = 0.02,
        mode: str = "exact",
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        memory_budget_mb: float = 1024,
        precision: str = "float32",
        se_target: float = 0.1,
        incremental: bool | None = None,
        batch_probe: bool = False,
    ):
        super().__init__(model, seed=seed, device=device, batch_size=batch_size, memory_budget_mb=memory_budget_mb)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {shown(mode)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {shown(precision)}")
        self.settings = EstimatorSettings(
            n_screen=n_screen, n_estimate=n_estimate, tau=tau, seed=self.seed,
            adaptive=MODES[mode]["adaptive"], se_target=se_target,
            stratify=MODES[mode]["stratify"], sequential=MODES[mode]["sequential"],
        )
        block_shape_for(block_shape, model.spatial_dims)
        self.intervention = make_intervention(intervention) if isinstance(intervention, str) else intervention
        self.outcome = outcome_for(outcome, model)
        self.block_shape = block_shape
        self.mode, self.precision = mode, precision
        self.batch_probe = bool(batch_probe)
        self.incremental = mode != "published" if incremental is None else bool(incremental)

    name = "region_effects"

    def method_parameters(self) -> dict:
        s = self.settings
        return {
            "intervention": self.intervention.describe(),
            "outcome": self.outcome.describe(),
            "block_shape": self.block_shape,
            "n_screen": s.n_screen,
            "n_estimate": s.n_estimate,
            "tau": s.tau,
            "mode": self.mode,
            "adaptive": s.adaptive,
            "coarse_factor": MODES[self.mode]["coarse_factor"],
            "coarse_levels": list(self.coarse_levels(self.intervention.deterministic)),
            "se_target": s.se_target if s.adaptive or s.sequential else None,
            "stratify": s.stratify,
            "sequential": s.sequential,
            "interval": f"betting, {s.confidence:.0%}",
            "precision": self.precision,
            "batch_probe": self.batch_probe,
        }

    def iter_attribute(
        self, image, target_region=None, reference=None, spacing=None, *, regions=None
    ) -> Generator[Progress, None, RegionExplanation | dict]:
        """Region effects as a generator of progress.

        ``image``, ``target_region``, ``reference``: see :meth:`Method.check_inputs`.

        spacing
            Voxel size per axis (e.g. mm), used for distances in the summaries.
        regions
            Instead of ``target_region``: several target regions explained on the same
            forward passes (:meth:`iter_attribute_regions`); the result is then a dict
            ``label -> RegionExplanation``.
        """
        if regions is not None:
            if target_region is not None:
                raise ValueError("give either target_region (one region) or regions (a label image), not both")
            return (yield from self.iter_attribute_regions(image, regions, reference, spacing))
        if target_region is None and not self.model.is_classifier:  # a classifier's output is global
            raise ValueError("give the target region: a bool mask of the image's spatial shape (or regions=, a label image)")
        explanations = yield from self.iter_attribute_outcomes(image, target_region, [self.outcome], reference, spacing)
        return explanations[0]

    def iter_attribute_outcomes(
        self, image, target_region, outcomes, reference=None, spacing=None
    ) -> Generator[Progress, None, list[RegionExplanation]]:
        """Region effects for several outcomes on the same draws (e.g. a temperature sweep).

        Every forward batch is scored by each outcome, so the run costs the forward passes
        of one (a block passing any outcome's screen gets the full estimate); explanation
        ``j`` equals a run with ``outcomes[j]`` alone and the same seed.
        Several outcomes need a non-adaptive mode (``"exact"`` or ``"published"``).
        """
        outcomes = [outcome_for(outcome, self.model) for outcome in outcomes]
        if not outcomes:
            raise ValueError("give at least one outcome to measure")
        if len(outcomes) > 1 and (self.settings.adaptive or self.settings.sequential):
            raise ValueError(SHARED_DRAWS_NOT_ADAPTIVE)
        t_start = time.perf_counter()
        # every input is checked here, before the model moves or runs
        x, region, ref = self.check_inputs(image, target_region, reference)
        return (yield from self._iter_targets(x, [region] * len(outcomes), outcomes, ref, spacing, t_start))

    def iter_attribute_regions(
        self, image, regions, reference=None, spacing=None
    ) -> Generator[Progress, None, dict]:
        """Region effects of every region of ``regions`` on one set of forward passes.

        ``regions``: a label image of the image's spatial shape ``S`` (every non-zero
        label is a region), or a mapping ``key -> bool S mask`` (e.g. several brushes;
        masks may overlap). Every intervention draw is scored in every region, the reach
        and the model's window are the union of the regions' own, so the run costs about
        the forward passes of one region, not one per region. With incremental inference,
        whose passes recompute the bounding box of a run's regions, the regions run in
        groups (:func:`~napari_pdcr.regions.cluster_by_box`: regions whose joint box is no
        larger than their own boxes together); far-apart regions run one after another,
        as separate runs would. Returns ``{label or key:
        RegionExplanation}``, each equal (to floating-point tolerance: the model may run
        on a larger window) to a run for that region alone with the same seed; each
        explanation's ``forward_passes`` is its group's shared run's, and its parameters
        name its ``label`` and the ``regions_in_run`` (its group). Several regions need a
        non-adaptive mode (``"exact"`` or ``"published"``); save them one by one or as
        ``related`` results of one of them.
        """
        t_start = time.perf_counter()
        x = self.model.prepare_image(image)
        masks = region_masks(regions, tuple(x.shape[1:]))
        if len(masks) > 1 and (self.settings.adaptive or self.settings.sequential):
            raise ValueError(REGIONS_NOT_ADAPTIVE)
        union = np.logical_or.reduce(list(masks.values()))
        x, _, ref = self.check_inputs(image, union, reference)
        # incremental inference recomputes the bounding box of a run's regions: far-apart
        # regions (a mostly empty joint box) run apart, with the same draws per block
        incremental = self.incremental and not self.model.is_classifier and self.model.sliding_window is None
        groups = cluster_by_box(masks) if incremental else [list(masks)]
        results = {}
        for keys in groups:
            explanations = yield from self._iter_targets(
                x, [masks[key] for key in keys], [self.outcome] * len(keys), ref, spacing, t_start, names=keys
            )
            for key, explanation in zip(keys, explanations, strict=True):
                explanation.parameters.update(label=key, regions_in_run=keys)
                results[key] = explanation
            t_start = time.perf_counter()
        return {key: results[key] for key in masks}

    def _iter_targets(
        self, x: torch.Tensor, regions: list[np.ndarray], outcomes: list[Outcome], ref, spacing, t_start: float,
        names: list | None = None,
    ) -> Generator[Progress, None, list[RegionExplanation]]:
        """One run for targets ``j`` (outcome ``outcomes[j]`` in bool ``S`` region ``regions[j]``)
        on shared forward passes; returns one explanation per target."""
        spatial = tuple(x.shape[1:])
        spacing = voxel_spacing(spacing, len(spatial))
        grid = BlockGrid.create(spatial, self.block_shape)
        if any(b > n for b, n in zip(grid.block_shape, spatial, strict=True)):
            raise ValueError(
                f"block_shape {grid.block_shape} is larger than the image {spatial}: "
                "choose blocks smaller than the image"
            )
        # distinct regions (an outcome sweep has one): reach and its checks run once per region
        distinct: dict[bytes, int] = {}
        region_of = [distinct.setdefault(region.tobytes(), len(distinct)) for region in regions]
        distinct_regions = [regions[region_of.index(d)] for d in range(len(distinct))]
        # a classifier's output is global: every block is explained for its class (a given region is only shown)
        target_blocks = [np.zeros(grid.shape, bool) if self.model.is_classifier else grid.any_per_block(region)
                         for region in distinct_regions]
        for d, blocks in enumerate(target_blocks):
            if blocks.all():
                what = "the target region" if names is None else f"region {names[region_of.index(d)]!r}"
                raise ValueError(
                    f"{what} covers every block of the image: nothing is left to intervene on; "
                    "choose a smaller region or smaller blocks"
                )
        union = np.logical_or.reduce(distinct_regions)
        self.intervention.check(x, grid.block_shape)
        model, x = self.to_device(x)
        options = MODES[self.mode]
        if model.is_classifier:  # every block reaches a global output, and no crop of the image is exact
            options = {**options, "skip_unreachable": False, "crop_to_reach": False}
        candidates = [~blocks for blocks in target_blocks]
        timings, log = {}, []

        # A model applied by sliding windows: outside "published" mode, only the windows over
        # the region run (engine/windowed.py), which replaces accelerations 1 and 2 (a crop
        # would change the window grid; reach follows from the windows, with no probe).
        windowed = model.sliding_window is not None and options["crop_to_reach"]

        # Exact acceleration 1: skip blocks that provably cannot reach the region.
        reach, probe_passes = list(candidates), 0
        if options["skip_unreachable"] and any(c.any() for c in candidates) and not windowed:
            t0 = time.perf_counter()
            # with a deterministic coarse screen (fast mode) the finer reach levels are left to it: a
            # group that cannot reach the region changes nothing and is pruned at the same one pass
            joint = self.intervention.deterministic and bool(self.coarse_levels(True))
            union_of_regions = np.logical_or.reduce(distinct_regions)
            reach, probe_passes = yield from relay(
                iter_reachable_blocks_of_regions(model, x, grid, distinct_regions, candidates,
                                                 stop_when_all_reach=joint,
                                                 forward=self._incremental_probe(model, x, grid, union_of_regions)),
                lambda step: Progress("reach", *step, time.perf_counter() - t_start),
            )
            for d, region in enumerate(distinct_regions):
                verified, passes = verify_unreachable(model, x, grid, region, reach[d], candidates[d], self.seed)
                probe_passes += passes
                if not verified:
                    log.append("NaN propagation does not hold for this model (does it remove NaN?); no block is skipped")
                    reach[d] = candidates[d]
            timings["reach_s"] = time.perf_counter() - t0
            yield Progress("reach", 1, 1, probe_passes, time.perf_counter() - t_start)
        any_reach = np.logical_or.reduce(reach)

        # Exact acceleration 2: run the model on the smallest window that is verified exact.
        window = None
        if options["crop_to_reach"] and not windowed:
            t0 = time.perf_counter()
            window = aligned_window(grid, any_reach | np.logical_or.reduce(target_blocks), model._divisors())
            if window != tuple(slice(0, n) for n in spatial):
                probes = self._window_probes(x, grid, any_reach)
                try:
                    exact = window_is_exact(model, x, window, union, probes)
                except Exception as error:  # noqa: BLE001 - e.g. a model that only takes one input size
                    log.append(f"the model failed on the reach window ({type(error).__name__}: {error}); using the full image")
                    exact = False
                else:
                    if not exact:
                        log.append("the reach window did not reproduce the full-image scores; using the full image")
                if not exact:
                    window = None
            else:
                window = None
            timings["window_s"] = time.perf_counter() - t0

        # one outcome column per target; several regions are scored inside their union
        scored = outcomes[0] if len(outcomes) == 1 else outcomes
        members = None if len(distinct_regions) == 1 else regions
        if windowed:
            nodes = WindowedInputBlocks(model, x, grid, union, scored, self.intervention, ref, self.precision, members)
            if options["skip_unreachable"]:
                reach = [c & nodes.reachable_blocks(None if members is None else region_of.index(d))
                         for d, c in enumerate(candidates)]
                any_reach = np.logical_or.reduce(reach)
        else:
            nodes = InputBlocks(model, x, grid, union, scored, self.intervention, ref, window, self.precision, members,
                                incremental=self.incremental and not model.is_classifier)  # a global output
        if len(outcomes) > 1:
            nodes.needed = np.stack([reach[d].ravel() for d in region_of], axis=1)
        batch_size, probe = self.choose_batch_size(nodes.item_bytes), None
        if self.batch_probe and self.batch_size is None and not windowed:
            probe = fastest_batch_size(nodes.scoring.region_scores, nodes.crop, batch_size)
            batch_size = probe.batch_size
        runner = BatchRunner(batch_size)
        to_estimate = np.flatnonzero(any_reach.ravel())
        pruned, coarse_passes = np.zeros(grid.n_blocks, bool), 0
        levels = self.coarse_levels(nodes.deterministic)
        if levels:
            pruned, coarse_passes = yield from self._coarse_screen(nodes, grid, to_estimate, runner, levels)
            to_estimate = to_estimate[~pruned[to_estimate]]
        estimates = yield from estimate_effects(nodes, to_estimate, self.settings, runner)

        # one column per target
        ate, standard_error, n_draws, status, lower, upper, few_draws = (
            np.asarray(values).reshape(grid.n_blocks, -1)
            for values in (estimates.ate, estimates.standard_error, estimates.n_draws, estimates.status,
                           estimates.lower, estimates.upper, estimates.few_draws)
        )
        status[pruned] = NodeStatus.PRUNED_COARSE
        n_draws[pruned] = 1 if nodes.deterministic else self.settings.n_screen  # the group's joint draws
        lower[pruned], upper[pruned], few_draws[pruned] = np.nan, np.nan, True
        for j, d in enumerate(region_of):
            # blocks another target needed: this target's own run would not have drawn for them
            unreached = ~reach[d].ravel()
            ate[unreached, j], standard_error[unreached, j], n_draws[unreached, j] = 0, 0, 0
            status[unreached, j] = NodeStatus.UNREACHABLE
            lower[unreached, j], upper[unreached, j], few_draws[unreached, j] = 0, 0, False
            status[target_blocks[d].ravel(), j] = NodeStatus.TARGET
            lower[target_blocks[d].ravel(), j] = upper[target_blocks[d].ravel(), j] = np.nan
        base_outcomes = np.atleast_1d(estimates.base_outcome)
        timings["estimate_s"] = estimates.elapsed_s
        timings["total_s"] = time.perf_counter() - t_start
        parameters = self.parameters()
        parameters.update(
            batch_size=batch_size,
            batch_size_after_backoff=runner.batch_size,
            window=[[w.start, w.stop] for w in window] if window else None,
            reference="given" if ref is not None else "model prediction",
            incremental=nodes.incremental_status,
            forward_passes_by_stage={"reach": probe_passes, "coarse": coarse_passes, "estimate": estimates.forward_passes,
                                     "batch_probe": probe.forward_passes if probe else 0},
            batch_probe_images_per_second=[[k, round(v, 1)] for k, v in probe.images_per_second.items()] if probe else None,
        )
        if windowed:
            parameters["sliding_window"] = {**model.sliding_window.describe(), **nodes.summary()}
            log += nodes.log
        distinct_outcomes = {id(outcome): outcome for outcome in outcomes}
        predictions = {key: self._full_prediction(model, x, nodes, outcome) for key, outcome in distinct_outcomes.items()}
        return [
            RegionExplanation(
                block_effects=ate[:, j].reshape(grid.shape).astype(np.float32),
                block_standard_error=standard_error[:, j].reshape(grid.shape).astype(np.float32),
                block_draws=n_draws[:, j].reshape(grid.shape),
                block_status=status[:, j].reshape(grid.shape),
                block_lower=lower[:, j].reshape(grid.shape).astype(np.float32),
                block_upper=upper[:, j].reshape(grid.shape).astype(np.float32),
                block_few_draws=few_draws[:, j].reshape(grid.shape).astype(bool),
                block_shape=grid.block_shape,
                target_region=regions[j],
                prediction=predictions[id(outcome)],
                reference=ref,
                base_outcome=float(base_outcomes[j]),
                parameters={
                    **parameters, "outcome": outcome.describe(),
                    "n_candidate_blocks": int(candidates[d].sum()), "n_reachable_blocks": int(reach[d].sum()),
                },
                model_identity=model.identity(),
                provenance=self.provenance(),
                timings=timings,
                forward_passes=sum(parameters["forward_passes_by_stage"].values()),
                spacing=None if spacing is None else tuple(float(s) for s in spacing),
                log=log + estimates.log,
            )
            for j, (outcome, d) in enumerate(zip(outcomes, region_of, strict=True))
        ]

    def estimate_cost(self, image, target_region, reference=None) -> CostEstimate:
        """An upper bound on the forward passes and time of :meth:`attribute`, before running it.

        Counts the candidate blocks (every block outside the region), the passes of the
        reach probe (one per group of 4^d and 2^d blocks), of the coarse screen in
        ``mode="fast"`` if no group were pruned (every group of every level of
        :meth:`coarse_levels`: one pass each for a deterministic intervention,
        ``n_screen`` otherwise) and of the estimate if every block were reachable and
        passed the screen (``n_screen + n_estimate`` draws; one for a deterministic
        intervention), and times one forward pass of the whole image at batch size 1.
        With a coarse screen the bound is above the passes of ``mode="exact"`` (the screen
        costs passes where it prunes nothing); ``passes_if_pruned`` gives the other end
        for a model that reads the whole image: every block reaches the region (for a
        deterministic intervention the reach probe then stops after its first level) and
        the coarse screen prunes every group where it first screens it. It is a guide to
        the shortest run, not a lower bound (a model with a small receptive field skips
        unreachable blocks instead).
        The windowed and cropped passes of a real run are cheaper, so the time is a bound,
        not a forecast. Inputs are checked as in :meth:`attribute`.
        """
        x, region, _ = self.check_inputs(image, target_region, reference)
        grid = BlockGrid.create(tuple(x.shape[1:]), self.block_shape)
        candidates = np.flatnonzero(~grid.any_per_block(region).ravel())
        coords = np.stack(np.unravel_index(candidates, grid.shape), axis=1)
        reach_passes = sum(len(np.unique(coords // level, axis=0)) for level in (4, 2))
        deterministic = self.intervention.deterministic
        draws = 1 if deterministic else self.settings.n_screen + self.settings.n_estimate
        levels = self.coarse_levels(deterministic)
        coarse_draws = 1 if deterministic else self.settings.n_screen
        by_level = coarse_groups(grid, candidates, levels)
        coarse_passes = coarse_draws * sum(len(groups) for groups in by_level)
        if_pruned = None
        if levels:  # every group pruned where it is first screened; blocks in no group are estimated alone
            screened, first_look = np.zeros(grid.n_blocks, bool), 0
            for groups in by_level:
                fresh = [g for g in groups if not screened[g].any()]
                first_look += len(fresh)
                for g in fresh:
                    screened[g] = True
            # every block reaching the region: a deterministic screen's reach probe stops after its first level
            first_reach = len(np.unique(coords // 4, axis=0)) if deterministic else reach_passes
            if_pruned = first_reach + coarse_draws * first_look + int((~screened[candidates]).sum()) * draws
        model, x = self.to_device(x)
        with torch.inference_mode():
            model(x[None])  # warm-up: first calls allocate
            t0 = time.perf_counter()
            model(x[None])
            seconds = time.perf_counter() - t0
        return CostEstimate(len(candidates), reach_passes + coarse_passes + len(candidates) * draws, seconds, self.mode,
                            if_pruned)

    def coarse_levels(self, deterministic: bool) -> tuple[int, ...]:
        """Group sizes (in blocks per axis, coarsest first) of the coarse-to-fine screen; ``()``: none.

        Only ``mode="fast"`` screens coarsely (an approximation, see :meth:`_coarse_screen`).
        A random intervention screens groups of ``coarse_factor`` blocks per axis with
        ``n_screen`` joint draws (none when ``n_screen`` is 0). A deterministic one (zero,
        constant, mean, blur) needs one joint pass per group and screens hierarchically:
        :attr:`coarse_depth_deterministic` levels, e.g. groups of 4 blocks per axis, then
        of 2 inside the groups that were not pruned, then the single blocks.
        """
        factor = MODES[self.mode]["coarse_factor"]
        if factor <= 1:
            return ()
        if deterministic:
            return tuple(factor**k for k in range(self.coarse_depth_deterministic, 0, -1))
        return (factor,) if self.settings.n_screen else ()

    #: Levels of the coarse screen for a deterministic intervention in ``mode="fast"``
    #: (2: groups of ``coarse_factor**2`` then ``coarse_factor`` blocks per axis; 1: one level).
    coarse_depth_deterministic: int = 2

    def _coarse_screen(self, nodes: InputBlocks, grid: BlockGrid, blocks: np.ndarray, runner: BatchRunner,
                       levels: tuple[int, ...]):
        """Approximate: screen coarser groups of ``blocks`` jointly first, level by level (``levels``).

        Every block of a group is intervened on at once (one joint draw per block): a
        deterministic intervention takes one pass per group, a random one ``n_screen``
        joint draws. A group whose every joint draw changes the outcome by less than tau
        has its blocks pruned (reported 0, status PRUNED_COARSE) without a fine screen;
        the blocks of the other groups go on to the next, finer level, then to the
        ordinary estimate. This is an approximation: the effects of the blocks of a group
        can cancel (one block helps the region, another hurts it by as much), or the
        joint change can stay below tau while one block alone would not (a model that is
        not additive), and such blocks are reported 0. ``mode="exact"`` never screens
        coarsely. Returns the pruned mask over all blocks and the forward passes used.
        """
        pruned, passes = np.zeros(grid.n_blocks, bool), 0
        alive = np.asarray(blocks, dtype=np.int64)
        draws = 1 if nodes.deterministic else self.settings.n_screen
        for level, groups in enumerate(coarse_groups(grid, alive, levels)):
            groups = [g for g in groups if not pruned[g[0]]]  # inside groups a coarser level kept
            if not groups:
                continue
            settings = EstimatorSettings(n_screen=0, n_estimate=draws, tau=0.0, seed=self.seed + 7919 * (level + 1))
            coarse = yield from estimate_effects(BlockGroups(nodes, groups), range(len(groups)), settings, runner,
                                                 "coarse ")
            changes = np.asarray(coarse.max_abs_change).reshape(len(groups), -1)  # (groups, outcomes)
            for group, change in zip(groups, changes, strict=True):
                pruned[group] = bool((change < self.settings.tau).all())
            passes += coarse.forward_passes
        return pruned, passes

    def _incremental_probe(self, model: SegmentationModel, x: torch.Tensor, grid: BlockGrid, region: np.ndarray):
        """The reach probe's ``forward(batch, changed)`` by incremental inference on the whole image, exact
        inside the bounding box of ``region`` (the probe reads only the region, and NaN propagates through
        the recomputed boxes as through full inference); None (full inference) when incremental inference
        is off or does not support the model. Its check against full inference runs on one noise probe
        first (a NaN probe cannot be compared)."""
        if not (self.incremental and self.precision == "float32" and not model.is_classifier):
            return None
        incremental = IncrementalForward(model, x, tuple(slice(lo, hi) for lo, hi in bounding_box(region)))
        if not incremental.supported:
            return None
        outside = np.flatnonzero(~grid.any_per_block(region).ravel())
        block = int(outside[0]) if len(outside) else 0  # the check compares full and incremental inference anywhere
        noisy = x.clone()
        where = (slice(None), *grid.slices(block))
        noisy[where] = torch.rand(noisy[where].shape, generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        with torch.inference_mode():
            incremental.forward(noisy[None], [grid.slices(block)])
        return incremental.forward if incremental.supported else None

    def _window_probes(self, x: torch.Tensor, grid: BlockGrid, reach: np.ndarray, n: int = 3) -> list[torch.Tensor]:
        """Intervened images for window verification: noise in a few reachable blocks."""
        rng = np.random.default_rng([self.seed, 99])
        blocks = np.flatnonzero(reach.ravel())
        probes = []
        for b in rng.choice(blocks, size=min(n, len(blocks)), replace=False) if len(blocks) else []:
            probe = x.clone()
            where = (slice(None), *grid.slices(int(b)))
            probe[where] = torch.from_numpy(rng.random(tuple(probe[where].shape), dtype=np.float32)).to(x.device)
            probes.append(probe)
        return probes

    def _full_prediction(self, model: SegmentationModel, x: torch.Tensor, nodes: InputBlocks, outcome: Outcome) -> np.ndarray:
        """The unperturbed thresholded prediction of the explained channel on the whole image."""
        with torch.inference_mode():
            scores = model(x[None])
        if model.is_classifier:
            return class_prediction(outcome, scores, model.activation, nodes.channel, x.shape[1:])
        mask = outcome.predicted_mask(scores.flatten(2), model.activation, nodes.channel)[0]
        return mask.reshape(x.shape[1:]).cpu().numpy()


def explain_region(model, image, target_region, reference=None, spacing=None, progress=None, **parameters):
    """One call: ``RegionEffects(model, **parameters).attribute(image, target_region, reference)``."""
    return RegionEffects(model, **parameters).attribute(image, target_region, reference, spacing, progress=progress)
