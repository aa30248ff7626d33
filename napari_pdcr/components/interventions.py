"""Interventions on a component's output activation: what replaces it.

Every intervention draws replacements ``(n_draws, *A)`` for an activation of shape
``A`` (without the batch axis) from the activation on the explained image and, where it
needs one, the activations ``(R, *A)`` the same component produces on ``R`` bank images
(other images of the same kind, e.g. other slices).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch


class ActivationIntervention(ABC):
    """A distribution over replacement activations for one component.

    ``deterministic`` interventions return the same replacement on every draw (one
    draw is exact); ``needs_bank`` ones need the component's activations on bank images.
    """

    name: str = "activation_intervention"
    deterministic: bool = False
    needs_bank: bool = False

    @abstractmethod
    def sample(
        self, activation: torch.Tensor, bank: torch.Tensor | None, n_draws: int, rng: np.random.Generator
    ) -> torch.Tensor:
        """Replacements ``(n_draws, *A)`` for ``activation`` ``(*A)``; ``bank`` is ``(R, *A)`` or None."""

    def describe(self) -> dict:
        """Parameters for provenance (JSON-serialisable)."""
        return {"name": self.name}


class ZeroActivation(ActivationIntervention):
    """Ablation: the component outputs zeros."""

    name, deterministic = "zero", True

    def sample(self, activation, bank, n_draws, rng):
        return torch.zeros((n_draws, *activation.shape), dtype=activation.dtype, device=activation.device)


class MeanActivation(ActivationIntervention):
    """Mean ablation: the component outputs its mean activation over the bank images
    (element-wise, so spatial structure common to all images is kept)."""

    name, deterministic, needs_bank = "mean", True, True

    def sample(self, activation, bank, n_draws, rng):
        return bank.mean(dim=0, keepdim=True).expand(n_draws, *activation.shape).clone()


class ResampleActivation(ActivationIntervention):
    """Natural intervention: the activation the same component produces on a bank image
    drawn uniformly with replacement (the activation-space analogue of natural patches)."""

    name, needs_bank = "resample", True

    def sample(self, activation, bank, n_draws, rng):
        return bank[torch.from_numpy(rng.integers(len(bank), size=n_draws)).to(bank.device)]


class NoiseActivation(ActivationIntervention):
    """Gaussian noise with the per-channel mean and standard deviation of the component's
    activation on the explained image."""

    name = "noise"

    def sample(self, activation, bank, n_draws, rng):
        flat = activation.reshape(activation.shape[0], -1).double()
        shape = (1, activation.shape[0]) + (1,) * (activation.ndim - 1)
        mean = flat.mean(dim=1).cpu().numpy().reshape(shape)
        std = (flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros(len(flat))).cpu().numpy().reshape(shape)
        draws = rng.standard_normal((n_draws, *activation.shape)) * std + mean
        return torch.from_numpy(draws.astype(np.float32)).to(activation.device, activation.dtype)


ACTIVATION_INTERVENTIONS = {
    cls.name: cls for cls in (ResampleActivation, ZeroActivation, MeanActivation, NoiseActivation)
}


def make_activation_intervention(name: str) -> ActivationIntervention:
    """``"resample"``, ``"zero"``, ``"mean"`` or ``"noise"``."""
    if name not in ACTIVATION_INTERVENTIONS:
        raise ValueError(f"unknown activation intervention {name!r}; choose one of {', '.join(ACTIVATION_INTERVENTIONS)}")
    return ACTIVATION_INTERVENTIONS[name]()
