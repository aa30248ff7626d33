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
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from napari_pdcr.engine.blocks import BlockGroups, InputBlocks
from napari_pdcr.engine.estimator import (
    SHARED_DRAWS_NOT_ADAPTIVE,
    BatchRunner,
    EstimatorSettings,
    NodeStatus,
    Progress,
    estimate_effects,
    relay,
)
from napari_pdcr.engine.reach import (
    aligned_window,
    iter_reachable_blocks,
    verify_unreachable,
    window_is_exact,
)
from napari_pdcr.engine.scoring import PRECISIONS
from napari_pdcr.engine.windowed import WindowedInputBlocks
from napari_pdcr.explanations.region import RegionExplanation
from napari_pdcr.interventions import Intervention, make_intervention
from napari_pdcr.methods.base import Method
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome, outcome_for
from napari_pdcr.regions import (
    BlockGrid,
    block_shape_for,
    voxel_spacing,
)
from napari_pdcr.validation import shown

#: Presets of the ``mode`` argument: which accelerations are on.
MODES = {
    # the published estimator, no acceleration but batching (the reference implementation)
    "published": dict(skip_unreachable=False, crop_to_reach=False, adaptive=False, coarse_factor=1),
    # the same estimand, with the exact accelerations
    "exact": dict(skip_unreachable=True, crop_to_reach=True, adaptive=False, coarse_factor=1),
    # exact accelerations + adaptive numbers of draws + coarse-to-fine screening
    # (approximate, opt-in)
    "fast": dict(skip_unreachable=True, crop_to_reach=True, adaptive=True, coarse_factor=2),
}


@dataclass(frozen=True)
class CostEstimate:
    """Upper bound of a region-effects run (:meth:`RegionEffects.estimate_cost`).

    ``n_blocks``: candidate blocks; ``passes``: forward passes (images) at most;
    ``seconds_per_pass``: one timed whole-image pass; ``mode``: the run's mode.
    """

    n_blocks: int
    passes: int
    seconds_per_pass: float
    mode: str

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
        if minutes >= 2:
            text += ": choose " + ("larger blocks" if self.mode == "fast" else "fast mode or larger blocks") + " to make it shorter"
        return text


class RegionEffects(Method):
    """Causal effects of input blocks on a segmentation model's output in a target region.

    Parameters
    ----------
    model
        A :class:`~napari_pdcr.models.SegmentationModel`.
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
        block once its standard error is below ``se_target``). ``"published"``: no
        accelerations besides batching.
    seed
        Seed of every random draw; a run is reproducible on CPU whatever the batch size.
    device
        ``"auto"`` (cuda, mps, cpu), or a device. The model is moved there.
    batch_size, memory_budget_mb
        Images per forward pass; by default chosen from the memory budget. Halved
        automatically on out-of-memory.
    precision
        ``"float32"``, or ``"bfloat16"`` / ``"float16"`` autocast on CUDA.
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
    ):
        super().__init__(model, seed=seed, device=device, batch_size=batch_size, memory_budget_mb=memory_budget_mb)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {shown(mode)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {shown(precision)}")
        self.settings = EstimatorSettings(
            n_screen=n_screen, n_estimate=n_estimate, tau=tau, seed=self.seed,
            adaptive=MODES[mode]["adaptive"], se_target=se_target,
        )
        block_shape_for(block_shape, model.spatial_dims)
        self.intervention = make_intervention(intervention) if isinstance(intervention, str) else intervention
        self.outcome = outcome_for(outcome, model)
        self.block_shape = block_shape
        self.mode, self.precision = mode, precision

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
            "se_target": s.se_target if s.adaptive else None,
            "precision": self.precision,
        }

    def iter_attribute(
        self, image, target_region, reference=None, spacing=None
    ) -> Generator[Progress, None, RegionExplanation]:
        """Region effects as a generator of progress.

        ``image``, ``target_region``, ``reference``: see :meth:`Method.check_inputs`.

        spacing
            Voxel size per axis (e.g. mm), used for distances in the summaries.
        """
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
        if len(outcomes) > 1 and self.settings.adaptive:
            raise ValueError(SHARED_DRAWS_NOT_ADAPTIVE)
        scored = outcomes[0] if len(outcomes) == 1 else outcomes
        t_start = time.perf_counter()
        # every input is checked here, before the model moves or runs
        x, region, ref = self.check_inputs(image, target_region, reference)
        spatial = tuple(x.shape[1:])
        spacing = voxel_spacing(spacing, len(spatial))
        grid = BlockGrid.create(spatial, self.block_shape)
        if any(b > n for b, n in zip(grid.block_shape, spatial, strict=True)):
            raise ValueError(
                f"block_shape {grid.block_shape} is larger than the image {spatial}: "
                "choose blocks smaller than the image"
            )
        target_blocks = grid.any_per_block(region)
        if target_blocks.all():
            raise ValueError(
                "the target region covers every block of the image: nothing is left to intervene on; "
                "choose a smaller region or smaller blocks"
            )
        self.intervention.check(x, grid.block_shape)
        model, x = self.to_device(x)
        options = MODES[self.mode]
        candidates = ~target_blocks
        timings, log = {}, []

        # A model applied by sliding windows: outside "published" mode, only the windows over
        # the region run (engine/windowed.py), which replaces accelerations 1 and 2 (a crop
        # would change the window grid; reach follows from the windows, with no probe).
        windowed = model.sliding_window is not None and options["crop_to_reach"]

        # Exact acceleration 1: skip blocks that provably cannot reach the region.
        reach, probe_passes = candidates, 0
        if options["skip_unreachable"] and candidates.any() and not windowed:
            t0 = time.perf_counter()
            reach, probe_passes = yield from relay(
                iter_reachable_blocks(model, x, grid, region, candidates),
                lambda step: Progress("reach", *step, time.perf_counter() - t_start),
            )
            verified, passes = verify_unreachable(model, x, grid, region, reach, candidates, self.seed)
            probe_passes += passes
            if not verified:
                log.append("NaN propagation does not hold for this model (does it remove NaN?); no block is skipped")
                reach = candidates
            timings["reach_s"] = time.perf_counter() - t0
            yield Progress("reach", 1, 1, probe_passes, time.perf_counter() - t_start)

        # Exact acceleration 2: run the model on the smallest window that is verified exact.
        window = None
        if options["crop_to_reach"] and not windowed:
            t0 = time.perf_counter()
            window = aligned_window(grid, reach | target_blocks, model._divisors())
            if window != tuple(slice(0, n) for n in spatial):
                probes = self._window_probes(x, grid, reach)
                try:
                    exact = window_is_exact(model, x, window, region, probes)
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

        if windowed:
            nodes = WindowedInputBlocks(model, x, grid, region, scored, self.intervention, ref, self.precision)
            if options["skip_unreachable"]:
                reach = candidates & nodes.reachable_blocks()
        else:
            nodes = InputBlocks(model, x, grid, region, scored, self.intervention, ref, window, self.precision)
        batch_size = self.choose_batch_size(nodes.item_bytes)
        runner = BatchRunner(batch_size)
        to_estimate = np.flatnonzero(reach.ravel())
        pruned, coarse_passes = np.zeros(grid.n_blocks, bool), 0
        if options["coarse_factor"] > 1 and not nodes.deterministic and self.settings.n_screen:
            pruned, coarse_passes = yield from self._coarse_screen(nodes, grid, to_estimate, runner, options["coarse_factor"])
            to_estimate = to_estimate[~pruned[to_estimate]]
        estimates = yield from estimate_effects(nodes, to_estimate, self.settings, runner)

        # one column per outcome
        ate, standard_error, n_draws, status = (
            np.asarray(values).reshape(grid.n_blocks, -1)
            for values in (estimates.ate, estimates.standard_error, estimates.n_draws, estimates.status)
        )
        status[pruned] = NodeStatus.PRUNED_COARSE
        n_draws[pruned] = self.settings.n_screen
        status[target_blocks.ravel()] = NodeStatus.TARGET
        base_outcomes = np.atleast_1d(estimates.base_outcome)
        timings["estimate_s"] = estimates.elapsed_s
        timings["total_s"] = time.perf_counter() - t_start
        parameters = self.parameters()
        parameters.update(
            batch_size=batch_size,
            batch_size_after_backoff=runner.batch_size,
            window=[[w.start, w.stop] for w in window] if window else None,
            n_candidate_blocks=int(candidates.sum()),
            n_reachable_blocks=int(reach.sum()),
            reference="given" if ref is not None else "model prediction",
        )
        if windowed:
            parameters["sliding_window"] = {**model.sliding_window.describe(), **nodes.summary()}
            log += nodes.log
        return [
            RegionExplanation(
                block_effects=ate[:, j].reshape(grid.shape).astype(np.float32),
                block_standard_error=standard_error[:, j].reshape(grid.shape).astype(np.float32),
                block_draws=n_draws[:, j].reshape(grid.shape),
                block_status=status[:, j].reshape(grid.shape),
                block_shape=grid.block_shape,
                target_region=region,
                prediction=self._full_prediction(model, x, nodes, outcome),
                reference=ref,
                base_outcome=float(base_outcomes[j]),
                parameters={**parameters, "outcome": outcome.describe()},
                model_identity=model.identity(),
                provenance=self.provenance(),
                timings=timings,
                forward_passes=estimates.forward_passes + probe_passes + coarse_passes,
                spacing=None if spacing is None else tuple(float(s) for s in spacing),
                log=log + estimates.log,
            )
            for j, outcome in enumerate(outcomes)
        ]

    def estimate_cost(self, image, target_region, reference=None) -> CostEstimate:
        """An upper bound on the forward passes and time of :meth:`attribute`, before running it.

        Counts the candidate blocks (every block outside the region), the passes of the
        reach probe (one per group of 4^d and 2^d blocks) and of the estimate if every
        block were reachable and passed the screen (``n_screen + n_estimate`` draws; one for
        a deterministic intervention), and times one forward pass of the whole image at
        batch size 1. The windowed and cropped passes of a real run are cheaper, so the
        time is a bound, not a forecast. Inputs are checked as in :meth:`attribute`.
        """
        x, region, _ = self.check_inputs(image, target_region, reference)
        grid = BlockGrid.create(tuple(x.shape[1:]), self.block_shape)
        candidates = np.flatnonzero(~grid.any_per_block(region).ravel())
        coords = np.stack(np.unravel_index(candidates, grid.shape), axis=1)
        reach_passes = sum(len(np.unique(coords // level, axis=0)) for level in (4, 2))
        draws = 1 if self.intervention.deterministic else self.settings.n_screen + self.settings.n_estimate
        model, x = self.to_device(x)
        with torch.inference_mode():
            model(x[None])  # warm-up: first calls allocate
            t0 = time.perf_counter()
            model(x[None])
            seconds = time.perf_counter() - t0
        return CostEstimate(len(candidates), reach_passes + len(candidates) * draws, seconds, self.mode)

    def _coarse_screen(self, nodes: InputBlocks, grid: BlockGrid, blocks: np.ndarray, runner: BatchRunner, factor: int):
        """Approximate: screen ``factor``-times coarser groups of ``blocks`` jointly first.

        A group whose ``n_screen`` joint draws all change the outcome by less than tau
        has its blocks pruned (reported 0, status PRUNED_COARSE) without a fine screen.
        Returns the pruned mask over all blocks and the forward passes used.
        """
        keys = np.stack(np.unravel_index(blocks, grid.shape), axis=1) // factor
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        groups = [blocks[inverse.ravel() == g] for g in range(inverse.max() + 1)] if len(blocks) else []
        groups = [g for g in groups if len(g) > 1]  # a single block is screened as itself
        pruned = np.zeros(grid.n_blocks, bool)
        if not groups:
            return pruned, 0
        settings = EstimatorSettings(n_screen=0, n_estimate=self.settings.n_screen, tau=0.0, seed=self.seed + 7919)
        coarse = yield from estimate_effects(BlockGroups(nodes, groups), range(len(groups)), settings, runner, "coarse ")
        for group, max_change in zip(groups, coarse.max_abs_change, strict=True):
            pruned[group] = max_change < self.settings.tau
        return pruned, coarse.forward_passes

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
            scores = model(x[None]).flatten(2)
        mask = outcome.predicted_mask(scores, model.activation, nodes.channel)[0]
        return mask.reshape(x.shape[1:]).cpu().numpy()


def explain_region(model, image, target_region, reference=None, spacing=None, progress=None, **parameters):
    """One call: ``RegionEffects(model, **parameters).attribute(image, target_region, reference)``."""
    return RegionEffects(model, **parameters).attribute(image, target_region, reference, spacing, progress=progress)
