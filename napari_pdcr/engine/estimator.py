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

import numpy as np
import torch

from napari_pdcr.validation import finite_float, non_negative_int, positive_int


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
    """

    n_screen: int = 3
    n_estimate: int = 50
    tau: float = 0.02
    seed: int = 0
    adaptive: bool = False
    min_draws: int = 10
    round_size: int = 10
    se_target: float = 0.1

    def __post_init__(self):
        self.n_screen = non_negative_int("n_screen", self.n_screen)
        self.n_estimate = positive_int("n_estimate", self.n_estimate)
        self.tau = finite_float("tau", self.tau, minimum=0)
        self.seed = non_negative_int("seed", self.seed)
        self.min_draws = positive_int("min_draws", self.min_draws)
        self.round_size = positive_int("round_size", self.round_size)
        self.se_target = finite_float("se_target", self.se_target, minimum=0)


class NodeSet(ABC):
    """Things that receive an intervention; see the module docstring."""

    #: all draws of a node are identical (zero, constant, ...): one draw is exact
    deterministic: bool = False
    #: size of one evaluation's input in bytes, for choosing the batch size
    item_bytes: int = 1 << 20

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


SHARED_DRAWS_NOT_ADAPTIVE = (
    "adaptive draws (mode='fast') cannot be shared by several outcomes, since each would stop at other "
    "draws: use mode='exact'"
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
    n_draws: np.ndarray  #: draws used for the reported estimate (int32)
    status: np.ndarray  #: NodeStatus codes (int8)
    max_abs_change: np.ndarray  #: largest |change| seen in any draw, screen included (float64)
    base_outcome: float | np.ndarray
    forward_passes: int
    elapsed_s: float
    log: list[str]


class _Accumulator:
    """Running sums of outcome changes per node, ``(n, J)`` for ``J`` outcomes of the same draws."""

    def __init__(self, n: int, n_outcomes: int):
        self.count = np.zeros((n, 1), np.int64)
        self.total = np.zeros((n, n_outcomes))
        self.total_sq = np.zeros((n, n_outcomes))
        self.max_abs = np.zeros((n, n_outcomes))

    def reset(self, nodes: np.ndarray):
        for arr in (self.count, self.total, self.total_sq, self.max_abs):
            arr[nodes] = 0

    def add(self, nodes: np.ndarray, deltas: np.ndarray):
        np.add.at(self.count, nodes, 1)
        np.add.at(self.total, nodes, deltas)
        np.add.at(self.total_sq, nodes, deltas**2)
        np.maximum.at(self.max_abs, nodes, np.abs(deltas))

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)

    def standard_error(self) -> np.ndarray:
        n = self.count.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.total_sq - self.total**2 / np.maximum(n, 1)) / np.maximum(n - 1, 1)
            se = np.sqrt(np.clip(var, 0, None) / np.maximum(n, 1))
        return np.where(n > 1, se, 0.0)


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
    if several and s.adaptive and not deterministic:
        raise ValueError(SHARED_DRAWS_NOT_ADAPTIVE)
    passes0 = runner.forward_passes
    acc = _Accumulator(n, len(base))
    max_abs_seen = np.zeros((n, len(base)))
    status = np.full((n, len(base)), NodeStatus.UNREACHABLE, np.int8)

    # Stages: (name, stage id, nodes, draws per node, round)
    screen = s.n_screen > 0 and not deterministic
    draws_estimate = 1 if deterministic else s.n_estimate
    first_round = min(s.min_draws, draws_estimate) if s.adaptive and not deterministic else draws_estimate
    total = len(nodes) * (s.n_screen if screen else first_round)
    done = 0

    def run_stage(stage_nodes: np.ndarray, n_draws: int, stage_id: int, round_: int, name: str):
        nonlocal done
        items_per_batch = max(runner.batch_size, n_draws)
        per_chunk = max(1, items_per_batch // n_draws)
        for start in range(0, len(stage_nodes), per_chunk):
            chunk = stage_nodes[start : start + per_chunk]
            batch_nodes, reps = [], []
            for node in chunk:
                draws = node_set.sample(int(node), n_draws, _rng(s.seed, stage_id, int(node), round_))
                batch_nodes += [int(node)] * n_draws
                reps += list(draws)
            deltas = runner.run(node_set, batch_nodes, reps).numpy().reshape(len(batch_nodes), len(base)) - base
            if not np.isfinite(deltas).all():
                raise FloatingPointError("the model returned non-finite outputs for an intervened input")
            acc.add(np.asarray(batch_nodes), deltas)
            np.maximum.at(max_abs_seen, np.asarray(batch_nodes), np.abs(deltas))
            done += len(batch_nodes)
            expected = total
            if name == "screen":  # the estimate stage will draw for the share of nodes passing so far
                seen = stage_nodes[: start + per_chunk]
                passing = int(np.count_nonzero((acc.max_abs[seen] >= s.tau).any(axis=1)))
                expected = total + round(passing * len(stage_nodes) / len(seen)) * first_round
            yield Progress(
                stage_prefix + name, done, total, runner.forward_passes - passes0, time.perf_counter() - t0, expected
            )

    if screen:
        yield from run_stage(nodes, s.n_screen, 0, 0, "screen")
        passed = acc.max_abs[nodes] >= s.tau  # (nodes, J)
        status[nodes] = np.where(passed, NodeStatus.UNREACHABLE, NodeStatus.SCREENED_OUT)
        estimate_nodes = nodes[passed.any(axis=1)]
        screen_mean, screen_count, screen_max = acc.mean()[nodes], acc.count[nodes].copy(), max_abs_seen[nodes].copy()
        acc.reset(nodes)  # the full estimate uses fresh draws, as published
        total += len(estimate_nodes) * first_round
    else:
        estimate_nodes = nodes

    yield from run_stage(estimate_nodes, first_round, 1, 0, "estimate")
    if s.adaptive and not deterministic:
        open_nodes, round_ = estimate_nodes, 0
        while True:
            counts = acc.count[open_nodes, 0]  # one outcome: adaptive draws are not shared
            open_nodes = open_nodes[(acc.standard_error()[open_nodes, 0] > s.se_target) & (counts < draws_estimate)]
            if len(open_nodes) == 0:
                break
            round_ += 1
            extra = min(s.round_size, draws_estimate - int(acc.count[open_nodes].min()))
            total += len(open_nodes) * extra
            yield from run_stage(open_nodes, extra, 1, round_, "refine")

    raw_mean = acc.mean()
    se = acc.standard_error()
    n_draws = np.repeat(acc.count, len(base), axis=1).astype(np.int32)
    if screen:  # the screen's figures where an outcome screened the node out
        out = ~passed
        raw_mean[nodes] = np.where(out, screen_mean, raw_mean[nodes])
        n_draws[nodes] = np.where(out, screen_count, n_draws[nodes])
        max_abs_seen[nodes] = np.where(out, screen_max, max_abs_seen[nodes])
    keep = np.abs(raw_mean[estimate_nodes]) >= s.tau
    estimated = np.where(keep, NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU)
    status[estimate_nodes] = np.where(status[estimate_nodes] == NodeStatus.SCREENED_OUT, NodeStatus.SCREENED_OUT, estimated)
    ate = np.where(status == NodeStatus.ESTIMATED, raw_mean, 0.0)
    standard_error = np.where(status == NodeStatus.SCREENED_OUT, 0.0, np.nan_to_num(se))

    def per_outcome(values: np.ndarray) -> np.ndarray:
        return values if several else values[:, 0]

    return NodeEstimates(
        ate=per_outcome(ate),
        raw_mean=per_outcome(raw_mean),
        standard_error=per_outcome(standard_error),
        n_draws=per_outcome(n_draws),
        status=per_outcome(status),
        max_abs_change=per_outcome(max_abs_seen),
        base_outcome=base if several else float(base[0]),
        forward_passes=runner.forward_passes - passes0,
        elapsed_s=time.perf_counter() - t0,
        log=list(runner.backoffs),
    )


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
