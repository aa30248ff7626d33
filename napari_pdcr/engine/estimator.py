"""One estimator for every experiment: sampling, batching, ATE +/- SE, progress, cancel.

A :class:`NodeSet` is anything that can receive an intervention: the blocks of an input
image, or the components of a network. The estimator only asks it for replacement
draws and for outcomes of batches of (node, replacement) pairs, so the published
two-stage estimate (screen, then full estimate, threshold ``tau``), the adaptive
variant, batching with out-of-memory back-off, progress and cancellation are written
once here.

The estimator is a generator: it yields :class:`Progress` after every forward batch and
returns the estimates (``StopIteration.value``). Stopping the iteration (``close()``,
or a napari worker's ``quit()``) cancels the run between batches; nothing partial is
returned.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
import torch

from napari_pdcr.engine.intervals import (
    FEW_CARRYING_DRAWS,
    FEW_DRAWS,
    betting_interval,
    carrying_draws,
)
from napari_pdcr.validation import finite_float, non_negative_int, positive_int

if TYPE_CHECKING:
    from napari_pdcr.interventions.base import Strata


class NodeStatus(IntEnum):
    """Why a node's effect has the value it has."""

    ESTIMATED = 0  #: full estimate with |ATE| >= tau
    BELOW_TAU = 1  #: full estimate with |ATE| < tau, reported as 0
    SCREENED_OUT = 2  #: every screening draw changed the outcome by < tau; reported as 0
    TARGET = 3  #: the block touches the target region; skipped, reported as 0
    UNREACHABLE = 4  #: provably cannot change the target region's output; exactly 0
    PRUNED_COARSE = 5  #: (approximate mode) its coarse parent block screened out; reported as 0


@dataclass
class Progress:
    """Progress of a run: ``done`` of ``total`` forward evaluations in ``stage``."""

    stage: str
    done: int
    total: int
    forward_passes: int
    elapsed_s: float
    #: evaluations the whole estimate is expected to take, later stages included (None: ``total``)
    expected_total: int | None = None

    @property
    def fraction(self) -> float:
        """Share of the whole estimate done (of ``expected_total`` when known)."""
        total = self.expected_total or self.total
        return min(1.0, self.done / total) if total else 1.0

    @property
    def eta_s(self) -> float | None:
        """Estimated seconds left for the whole estimate, from the rate so far (None before any work)."""
        if self.done == 0:
            return None
        return self.elapsed_s * max(0, (self.expected_total or self.total) - self.done) / self.done


@dataclass
class EstimatorSettings:
    """How effects are estimated.

    ``n_screen`` draws screen each node (0 disables screening); nodes that pass get
    ``n_estimate`` fresh draws. ``tau`` is in outcome units (0.02 Dice points by
    default, as published). With ``adaptive=True`` (approximate, opt-in) the estimate
    stage draws in rounds of ``round_size`` from ``min_draws`` up to ``n_estimate`` and
    stops a node once its standard error is at most ``se_target``.

    ``stratify``: where the node set has :class:`~napari_pdcr.interventions.base.Strata`
    (a patch bank's repeated crops), members with a share of at least ``1 / n_estimate``
    (at most ``n_estimate // 2`` of them) are evaluated once each and the other draws
    come from the rest: the same ATE, unbiased, for the same number of forward passes, and
    never a larger variance (each exact member replaces at least its expected share of
    draws). ``sequential`` replaces the two stages: a first look of the heavy members and
    ``n_screen`` draws (all changes below tau: screened out), then rounds of ``round_size``
    draws that go on while the node's ``confidence`` interval still crosses +-tau (or is
    clear of it with a standard error above ``se_target``), up to ``n_estimate``
    evaluations in all, with no draw discarded. Every node gets a
    ``confidence`` betting interval (:mod:`~napari_pdcr.engine.intervals`).
    """

    n_screen: int = 3
    n_estimate: int = 50
    tau: float = 0.02
    seed: int = 0
    adaptive: bool = False
    min_draws: int = 10
    round_size: int = 10
    se_target: float = 0.1
    stratify: bool = False
    sequential: bool = False
    confidence: float = 0.95

    def __post_init__(self):
        self.n_screen = non_negative_int("n_screen", self.n_screen)
        self.n_estimate = positive_int("n_estimate", self.n_estimate)
        self.tau = finite_float("tau", self.tau, minimum=0)
        self.seed = non_negative_int("seed", self.seed)
        self.min_draws = positive_int("min_draws", self.min_draws)
        self.round_size = positive_int("round_size", self.round_size)
        self.se_target = finite_float("se_target", self.se_target, minimum=0)
        self.confidence = finite_float("confidence", self.confidence, minimum=0)
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be a probability between 0 and 1 (e.g. 0.95); got {self.confidence}")
        if self.adaptive and self.sequential:
            raise ValueError("choose adaptive or sequential draws, not both")


class NodeSet(ABC):
    """Things that receive an intervention; see the module docstring."""

    #: all draws of a node are identical (zero, constant, ...): one draw is exact
    deterministic: bool = False
    #: size of one evaluation's input in bytes, for choosing the batch size
    item_bytes: int = 1 << 20
    #: known range ``(low, high)`` of the outcome (one per outcome for ``J`` outcomes); None: the range seen
    outcome_bounds: tuple | None = None

    @property
    @abstractmethod
    def n_nodes(self) -> int: ...

    @abstractmethod
    def base_outcome(self) -> float | np.ndarray:
        """Outcome of the unperturbed input, ``Y(x)`` (``(J,)`` for ``J`` outcomes of the same batches)."""

    @abstractmethod
    def sample(self, node: int, n_draws: int, rng: np.random.Generator) -> torch.Tensor:
        """Replacements ``(n_draws, ...)`` for ``node``."""

    @abstractmethod
    def outcomes(self, nodes: Sequence[int], replacements: Sequence[torch.Tensor]) -> torch.Tensor:
        """Outcomes ``(B,)`` (or ``(B, J)``) float64 of one forward batch: node ``nodes[i]`` set to ``replacements[i]``."""

    def strata(self, node: int, min_weight: float, max_fixed: int) -> Strata | None:
        """The node's heavy replacements and a sampler of the rest (None: plain sampling); see ``stratify``."""
        return None


SHARED_DRAWS_NOT_ADAPTIVE = (
    "adaptive or sequential draws (mode='fast' or 'sequential') cannot be shared by several outcomes, since "
    "each would stop at other draws: use mode='exact'"
)
OUT_OF_MEMORY_AT_ONE = (
    "out of memory even with one image per batch: choose a smaller target region or volume, or another device"
)


def halved_batch_size(error: BaseException, batch_size: int) -> int:
    """The batch size to retry with after ``error``.

    Re-raises ``error`` unless it is an out-of-memory error, and raises a clear
    ``MemoryError`` when the batch size is already 1.
    """
    if not is_out_of_memory(error):
        raise error
    if batch_size <= 1:
        raise MemoryError(OUT_OF_MEMORY_AT_ONE) from error
    return max(1, batch_size // 2)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA / MPS / CPU allocator out-of-memory errors."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class BatchRunner:
    """Runs (node, replacement) items through ``NodeSet.outcomes`` in batches.

    Halves the batch size on out-of-memory and retries the same items, so the results
    do not depend on whether a back-off happened; gives up with a clear ``MemoryError``
    at batch size 1. ``backoffs`` records every back-off for the run's log.
    """

    batch_size: int
    forward_passes: int = 0
    backoffs: list[str] = field(default_factory=list)

    def run(self, node_set: NodeSet, nodes: list[int], replacements: list[torch.Tensor]) -> torch.Tensor:
        out, start = [], 0
        while start < len(nodes):
            stop = min(start + self.batch_size, len(nodes))
            try:
                values = node_set.outcomes(nodes[start:stop], replacements[start:stop])
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM
                self.batch_size = halved_batch_size(error, self.batch_size)
                self.backoffs.append(f"out of memory: batch size reduced to {self.batch_size}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            self.forward_passes += stop - start
            out.append(values.detach().to("cpu", torch.float64))
            start = stop
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class NodeEstimates:
    """Per-node results of one run (arrays of length ``n_nodes``; ``(n_nodes, J)`` for ``J`` outcomes)."""

    ate: np.ndarray  #: effect after the tau rule (float64, outcome units)
    raw_mean: np.ndarray  #: mean change before the tau rule (NaN where never sampled)
    standard_error: np.ndarray  #: standard error of the mean change (0 for one/deterministic draw)
    n_draws: np.ndarray  #: forward evaluations behind the reported estimate (int32)
    status: np.ndarray  #: NodeStatus codes (int8)
    max_abs_change: np.ndarray  #: largest |change| seen in any draw, screen included (float64)
    base_outcome: float | np.ndarray
    forward_passes: int
    elapsed_s: float
    log: list[str]
    #: ``confidence`` interval of the effect (before the tau rule; 0 where UNREACHABLE), float64
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    #: the estimate rests on few draws: fewer than FEW_DRAWS sampled, or carried by one or two
    few_draws: np.ndarray | None = None


class _Draws:
    """Per node: the sampled changes in order, and the exactly evaluated part, ``J`` outcomes each.

    The estimate of a node is ``exact + rest_weight * mean(samples)``: without strata
    ``exact`` is 0 and ``rest_weight`` 1 (plain sampling); with :class:`Strata` the heavy
    members' weighted changes are ``exact`` and the samples come from the rest.
    """

    def __init__(self, n: int, n_outcomes: int):
        self.samples: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.count = np.zeros(n, np.int64)
        self.n_fixed = np.zeros(n, np.int64)
        self.exact = np.zeros((n, n_outcomes))
        self.rest_weight = np.ones(n)
        self.max_abs = np.zeros((n, n_outcomes))
        self.n_outcomes = n_outcomes

    def add(self, nodes: np.ndarray, deltas: np.ndarray):
        for node in np.unique(nodes):
            self.samples[node].append(deltas[nodes == node])
        np.add.at(self.count, nodes, 1)
        np.maximum.at(self.max_abs, nodes, np.abs(deltas))

    def add_fixed(self, node: int, deltas: np.ndarray, weights: np.ndarray):
        self.exact[node] += weights @ deltas
        self.rest_weight[node] = max(0.0, self.rest_weight[node] - float(weights.sum()))
        self.n_fixed[node] += len(weights)
        self.max_abs[node] = np.maximum(self.max_abs[node], np.abs(deltas).max(axis=0))

    def matrix(self, nodes: np.ndarray) -> np.ndarray:
        """Sampled changes ``(len(nodes), T, J)``, NaN after each node's last draw."""
        out = np.full((len(nodes), max([int(self.count[v]) for v in nodes], default=0), self.n_outcomes), np.nan)
        for i, node in enumerate(nodes):
            if self.count[node]:
                out[i, : self.count[node]] = np.concatenate(self.samples[node])
        return out

    def mean_and_error(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Estimate and standard error ``(len(nodes), J)`` (NaN where a sampled part was never drawn)."""
        draws = self.matrix(nodes)
        count = self.count[nodes][:, None].astype(float)
        weight = self.rest_weight[nodes][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            sample_mean = np.nanmean(draws, axis=1) if draws.shape[1] else np.full(count.shape, np.nan)
            sample_sd = np.sqrt(np.nansum((draws - sample_mean[:, None]) ** 2, axis=1) / np.maximum(count - 1, 1))
        mean = self.exact[nodes] + weight * np.where(weight > 0, sample_mean, 0.0)
        error = np.where(count > 1, weight * sample_sd / np.sqrt(np.maximum(count, 1)), 0.0)
        return mean, np.nan_to_num(error)

    def interval(self, nodes: np.ndarray, base: np.ndarray, bounds: np.ndarray, confidence: float,
                 time_uniform: bool) -> tuple[np.ndarray, np.ndarray]:
        """Betting interval of each node's effect, ``(len(nodes), J)`` each, from the outcome ``bounds`` ``(J, 2)``."""
        draws = self.matrix(nodes)
        low, high = bounds[:, 0], bounds[:, 1]
        span = np.where(high > low, high - low, 1.0)
        normalised = (base + draws - low) / span  # (N, T, J) in [0, 1]
        n, t, j = normalised.shape
        lower, upper = betting_interval(normalised.transpose(0, 2, 1).reshape(n * j, t), confidence, time_uniform)
        lower = (low + span * lower.reshape(n, j) - base)
        upper = (low + span * upper.reshape(n, j) - base)
        weight = self.rest_weight[nodes][:, None]
        mean, _ = self.mean_and_error(nodes)
        constant = (high <= low)[None] | (weight == 0)
        lower = np.where(constant, mean, self.exact[nodes] + weight * lower)
        upper = np.where(constant, mean, self.exact[nodes] + weight * upper)
        return lower, upper

    def few(self, nodes: np.ndarray) -> np.ndarray:
        """``(len(nodes), J)``: fewer than FEW_DRAWS sampled draws, or a mean carried by one or two draws."""
        sampled = self.rest_weight[nodes] > 0
        draws = self.matrix(nodes)
        carried = carrying_draws(draws.transpose(0, 2, 1).reshape(-1, draws.shape[1])).reshape(len(nodes), -1)
        return (sampled & (self.count[nodes] < FEW_DRAWS))[:, None] | (sampled[:, None] & (carried < FEW_CARRYING_DRAWS))


def _rng(seed: int, stage: int, node: int, round_: int = 0) -> np.random.Generator:
    # One stream per (seed, stage, node, round): results do not depend on batching.
    return np.random.default_rng([seed, stage, node, round_])


def estimate_effects(
    node_set: NodeSet,
    nodes: Sequence[int],
    settings: EstimatorSettings,
    runner: BatchRunner,
    stage_prefix: str = "",
) -> Generator[Progress, None, NodeEstimates]:
    """Estimate ``ATE(node) = E[Y(node := draw)] - Y(x)`` for ``nodes`` of ``node_set``.

    Nodes not listed keep status UNREACHABLE and effect 0; the caller may overwrite the
    status (e.g. TARGET). Yields :class:`Progress` after every batch.

    A node set with ``J`` outcomes per batch (``base_outcome()`` of shape ``(J,)``) gets
    ``(n_nodes, J)`` results, each column what a run with that outcome alone gives: a node
    is estimated when any outcome passes its screen, and reported screened out for the others.
    """
    t0 = time.perf_counter()
    nodes = np.asarray(nodes, dtype=np.int64)
    n = node_set.n_nodes
    base_value = node_set.base_outcome()
    several = np.ndim(base_value) > 0
    base = np.atleast_1d(np.asarray(base_value, dtype=np.float64))
    deterministic = node_set.deterministic
    s = settings
    if several and (s.adaptive or s.sequential) and not deterministic:
        raise ValueError(SHARED_DRAWS_NOT_ADAPTIVE)
    passes0 = runner.forward_passes
    screen_draws, draws = _Draws(n, len(base)), _Draws(n, len(base))
    max_abs_seen = np.zeros((n, len(base)))
    seen_low, seen_high = np.zeros(len(base)), np.zeros(len(base))  # extreme changes of the run
    status = np.full((n, len(base)), NodeStatus.UNREACHABLE, np.int8)
    stratify = s.stratify and not deterministic
    strata: dict[int, Strata | None] = {}

    def strata_of(node: int) -> Strata | None:
        if node not in strata:
            strata[node] = node_set.strata(node, 1.0 / s.n_estimate, s.n_estimate // 2) if stratify else None
        return strata[node]

    # Stages: (name, stage id, nodes, draws per node, round)
    screen = s.n_screen > 0 and not deterministic and not s.sequential
    draws_estimate = 1 if deterministic else s.n_estimate
    if deterministic:
        first_round = 1
    elif s.sequential:
        first_round = min(max(s.n_screen, 1), draws_estimate)
    else:
        first_round = min(s.min_draws, draws_estimate) if s.adaptive else draws_estimate
    total = len(nodes) * (s.n_screen if screen else first_round)
    done = 0

    def evaluate(batch_nodes: list[int], reps: list) -> np.ndarray:
        deltas = runner.run(node_set, batch_nodes, reps).numpy().reshape(len(batch_nodes), len(base)) - base
        if not np.isfinite(deltas).all():
            raise FloatingPointError("the model returned non-finite outputs for an intervened input")
        np.minimum(seen_low, deltas.min(axis=0), out=seen_low)
        np.maximum(seen_high, deltas.max(axis=0), out=seen_high)
        np.maximum.at(max_abs_seen, np.asarray(batch_nodes), np.abs(deltas))
        return deltas

    def run_stage(stage_nodes: np.ndarray, n_draws: int, stage_id: int, round_: int, name: str, into: _Draws,
                  fixed: bool = False):
        """Draw ``n_draws`` per node (from the rest where it has strata) and, with ``fixed``, its heavy members
        (which then take the place of as many draws, keeping at least two, except in a sequential first look)."""
        nonlocal done
        items_per_batch = max(runner.batch_size, n_draws)
        per_chunk = max(1, items_per_batch // max(n_draws, 1))
        for start in range(0, len(stage_nodes), per_chunk):
            chunk = stage_nodes[start : start + per_chunk]
            batch_nodes, reps, heavy = [], [], []
            for node in chunk:
                node_strata = strata_of(int(node)) if stage_id == 1 else None
                n_sampled = n_draws
                if fixed and node_strata is not None:
                    heavy.append((int(node), len(batch_nodes), node_strata.weights))
                    batch_nodes += [int(node)] * len(node_strata.weights)
                    reps += list(node_strata.fixed)
                    if not s.sequential:
                        n_sampled = max(n_draws - len(node_strata.weights), min(2, n_draws))
                if node_strata is not None and node_strata.rest_weight == 0:
                    continue  # the whole distribution is evaluated exactly
                rng = _rng(s.seed, stage_id, int(node), round_)
                sampled = node_strata.sample_rest(n_sampled, rng) if node_strata is not None else node_set.sample(
                    int(node), n_sampled, rng)
                batch_nodes += [int(node)] * n_sampled
                reps += list(sampled)
            if not batch_nodes:
                continue
            deltas = evaluate(batch_nodes, reps)
            keep = np.ones(len(batch_nodes), bool)
            for node, at, weights in heavy:
                into.add_fixed(node, deltas[at : at + len(weights)], weights)
                keep[at : at + len(weights)] = False
            into.add(np.asarray(batch_nodes)[keep], deltas[keep])
            done += len(batch_nodes)
            expected = total
            if name == "screen":  # the estimate stage will draw for the share of nodes passing so far
                seen = stage_nodes[: start + per_chunk]
                passing = int(np.count_nonzero((into.max_abs[seen] >= s.tau).any(axis=1)))
                expected = total + round(passing * len(stage_nodes) / len(seen)) * first_round
            yield Progress(
                stage_prefix + name, done, max(total, done), runner.forward_passes - passes0,
                time.perf_counter() - t0, max(expected, done),
            )

    passed = np.ones((len(nodes), len(base)), bool)
    if screen:
        yield from run_stage(nodes, s.n_screen, 0, 0, "screen", screen_draws)
        passed = screen_draws.max_abs[nodes] >= s.tau  # (nodes, J)
        estimate_nodes = nodes[passed.any(axis=1)]
        total += len(estimate_nodes) * first_round  # the full estimate uses fresh draws, as published
    else:
        estimate_nodes = nodes

    stage_name = "screen" if s.sequential and not deterministic else "estimate"
    yield from run_stage(estimate_nodes, first_round, 1, 0, stage_name, draws, fixed=True)
    time_uniform = s.adaptive or s.sequential
    def still_open(open_nodes: np.ndarray) -> np.ndarray:
        """Which of ``open_nodes`` draw another round (one outcome: adaptive and sequential draws are not shared)."""
        _, error = draws.mean_and_error(open_nodes)
        below_cap = draws.count[open_nodes] + draws.n_fixed[open_nodes] < draws_estimate
        if s.adaptive:
            return below_cap & (error[:, 0] > s.se_target)
        # sequential: go on while the interval crosses +-tau, or is clear of it but not yet precise
        bounds = _outcome_bounds(node_set, base, seen_low, seen_high)
        lower, upper = (end[:, 0] for end in draws.interval(open_nodes, base, bounds, s.confidence, True))
        clear_of_tau = ((lower > s.tau) | (upper < -s.tau)) & (error[:, 0] <= s.se_target)
        return below_cap & ~(clear_of_tau | ((lower > -s.tau) & (upper < s.tau)))

    if (s.adaptive or s.sequential) and not deterministic:
        open_nodes, round_ = estimate_nodes, 0
        if s.sequential:  # a first look with every change below tau screens the node out
            open_nodes = estimate_nodes[draws.max_abs[estimate_nodes, 0] >= s.tau]
            passed[:, 0] = np.isin(nodes, open_nodes)
        while len(open_nodes):
            open_nodes = open_nodes[still_open(open_nodes)]
            if len(open_nodes) == 0:
                break
            round_ += 1
            extra = min(s.round_size, draws_estimate - int((draws.count + draws.n_fixed)[open_nodes].min()))
            total += len(open_nodes) * extra
            yield from run_stage(open_nodes, extra, 1, round_, "sequential" if s.sequential else "refine", draws)

    # per node and outcome, the figures of the draws that decided it: the screen's where it screened the node out
    bounds = _outcome_bounds(node_set, base, seen_low, seen_high)
    out = ~passed
    figures = {name: np.zeros((n, len(base)), dtype) for name, dtype in
               (("mean", float), ("error", float), ("lower", float), ("upper", float), ("count", np.int32),
                ("few", bool))}
    figures["mean"][:] = np.nan
    out_nodes = nodes[out.any(axis=1)]
    for source, where, use in ((draws, estimate_nodes, np.ones((len(estimate_nodes), len(base)), bool)),
                               (screen_draws if screen else draws, out_nodes, out[np.isin(nodes, out_nodes)])):
        if len(where) == 0:
            continue
        values = dict(zip(("mean", "error"), source.mean_and_error(where), strict=True))
        values.update(zip(("lower", "upper"), source.interval(where, base, bounds, s.confidence, time_uniform),
                          strict=True))
        values["count"] = np.repeat((source.count[where] + source.n_fixed[where])[:, None], len(base), axis=1)
        values["few"] = source.few(where) & (not deterministic)
        for name, value in values.items():
            figures[name][where] = np.where(use, value, figures[name][where])
    raw_mean, se = figures["mean"], figures["error"]
    keep = np.abs(raw_mean[estimate_nodes]) >= s.tau
    status[estimate_nodes] = np.where(keep, NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU)
    status[nodes] = np.where(out, NodeStatus.SCREENED_OUT, status[nodes])
    ate = np.where(status == NodeStatus.ESTIMATED, raw_mean, 0.0)
    standard_error = np.where(status == NodeStatus.SCREENED_OUT, 0.0, np.nan_to_num(se))

    def per_outcome(values: np.ndarray) -> np.ndarray:
        return values if several else values[:, 0]

    return NodeEstimates(
        ate=per_outcome(ate),
        raw_mean=per_outcome(raw_mean),
        standard_error=per_outcome(standard_error),
        n_draws=per_outcome(figures["count"]),
        status=per_outcome(status),
        max_abs_change=per_outcome(max_abs_seen),
        base_outcome=base if several else float(base[0]),
        forward_passes=runner.forward_passes - passes0,
        elapsed_s=time.perf_counter() - t0,
        log=list(runner.backoffs),
        lower=per_outcome(figures["lower"]),
        upper=per_outcome(figures["upper"]),
        few_draws=per_outcome(figures["few"]),
    )


def _outcome_bounds(node_set: NodeSet, base: np.ndarray, seen_low: np.ndarray, seen_high: np.ndarray) -> np.ndarray:
    """``(J, 2)`` range of each outcome: the node set's known range, else the range seen in this run."""
    known = node_set.outcome_bounds
    known = [known] * len(base) if known is None or np.ndim(known[0]) == 0 else list(known)
    if len(known) != len(base):  # e.g. one outcome scored in several regions
        known = known * (len(base) // len(known)) if len(base) % len(known) == 0 else [None] * len(base)
    observed = np.stack([base + np.minimum(seen_low, 0), base + np.maximum(seen_high, 0)], axis=1)
    return np.array([observed[j] if k is None else k for j, k in enumerate(known)], dtype=np.float64)


def drive(generator: Generator, callback=None):
    """Run a progress generator to completion and return its result.

    ``callback(progress)`` is called for every yielded :class:`Progress`; if it returns
    ``False`` the run is cancelled and :class:`Cancelled` is raised.
    """
    try:
        while True:
            try:
                progress = next(generator)
            except StopIteration as stop:
                return stop.value
            if callback is not None and callback(progress) is False:
                raise Cancelled("the run was cancelled; no result was produced")
    finally:
        generator.close()  # also when the callback raises: release the run's resources now


def relay(generator: Generator, transform: Callable):
    """``yield from generator`` with every yielded item passed through ``transform``.

    Returns the generator's result; closing the relay closes the generator (cancel).
    """
    try:
        while True:
            try:
                item = next(generator)
            except StopIteration as stop:
                return stop.value
            yield transform(item)
    finally:
        generator.close()


class Cancelled(Exception):
    """Raised by :func:`drive` when the progress callback asks to stop."""
