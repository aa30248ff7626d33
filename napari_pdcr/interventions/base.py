"""The intervention protocol: "give me k replacement blocks shaped like this one"."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Strata:
    """An intervention's distribution split into heavy members, evaluated once each, and the rest, sampled.

    ``ATE = sum_h weights[h] * change(fixed[h]) + rest_weight * E[change(rest draw)]`` is the
    same effect as plain sampling (a stratified estimate): the heavy part is exact.
    """

    fixed: torch.Tensor  #: ``(H, C, *b)`` replacements, each evaluated once
    weights: np.ndarray  #: ``(H,)`` float64 probabilities of ``fixed`` under the intervention
    sample_rest: Callable[[int, np.random.Generator], torch.Tensor]  #: ``(n, rng) -> (n, C, *b)`` from the rest

    @property
    def rest_weight(self) -> float:
        """Probability of the sampled remainder (0: the whole distribution is evaluated exactly)."""
        return max(0.0, 1.0 - float(self.weights.sum()))


class Intervention(ABC):
    """A distribution over replacement contents for a block of the input.

    Subclasses implement :meth:`sample`; image-dependent statistics are computed once in
    :meth:`prepare`. ``deterministic`` interventions (zero, constant, mean, blur) return
    the same replacement on every draw, so one draw gives the exact effect.
    """

    name: str = "intervention"
    deterministic: bool = False

    def check(self, image: torch.Tensor, block_shape: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if blocks of ``block_shape`` of ``image`` ``(C, *S)`` cannot be replaced.

        Called before any forward pass, so that a misfit fails at once, not minutes in.
        """

    def prepare(self, image: torch.Tensor) -> None:  # noqa: B027 - optional hook, empty by default
        """Called once with the image ``(C, *S)`` (model input space) before sampling."""

    @abstractmethod
    def sample(
        self, original: torch.Tensor, n_draws: int, rng: np.random.Generator, location: tuple[slice, ...]
    ) -> torch.Tensor:
        """Replacements ``(n_draws, C, *b)`` for a block whose content is ``original`` ``(C, *b)``.

        ``location`` is the block's spatial slices in the image; ``rng`` is seeded per
        block and stage by the engine, so draws are reproducible whatever the batching.
        """

    def strata(self, original: torch.Tensor, min_weight: float, max_fixed: int) -> Strata | None:
        """Members of probability at least ``min_weight`` (at most ``max_fixed``) and a sampler of the rest.

        None (the default) where the intervention has no such members; see :class:`Strata`.
        """
        return None

    def describe(self) -> dict:
        """Parameters for provenance (JSON-serialisable)."""
        return {"name": self.name}


class CallableIntervention(Intervention):
    """Wrap a function ``fn(original (C,*b), n_draws, rng) -> (n_draws, C, *b)`` as an intervention."""

    def __init__(self, fn, name: str = "custom", deterministic: bool = False):
        self.fn, self.name, self.deterministic = fn, name, deterministic

    def sample(self, original, n_draws, rng, location):
        out = torch.as_tensor(self.fn(original, n_draws, rng), dtype=original.dtype)
        expected = (n_draws, *original.shape)
        if tuple(out.shape) != expected:
            raise ValueError(f"intervention {self.name!r} returned shape {tuple(out.shape)}, expected {expected}")
        return out
