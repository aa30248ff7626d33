"""Outcomes: the number ``Y`` computed from a model's scores inside the target region.

An outcome receives the raw scores restricted to the target region, ``(N, K, M)`` for a
batch of ``N`` evaluations, ``K`` output channels and ``M`` voxels of the region, and
returns ``(N,)`` values. Dice outcomes are on a 0-100 scale (percentage points) as in
the published method; ``mean_probability`` is in percent too, so that one threshold
``tau`` means the same for both; ``mean_logit`` is in logit units.

A classifier's scores ``(N, K)`` are scored as one voxel ``(N, K, 1)`` whose reference is
the chosen class (:mod:`napari_pdcr.engine.class_scoring`): ``mean_logit`` is the class's
logit, ``mean_probability`` 100 x its probability at temperature ``T``, and ``dice`` the
hard outcome, 100 while the predicted class stays the chosen one and 0 when it changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from napari_pdcr.validation import finite_float, non_negative_int, positive_float, shown

OutcomeKind = Literal["dice", "soft_dice", "mean_probability", "mean_logit"]
OUTCOME_KINDS: tuple[str, ...] = ("dice", "soft_dice", "mean_probability", "mean_logit")


#: Units of each outcome kind's values and effects (Dice and probabilities are in percent).
OUTCOME_UNITS = {"dice": "Dice points", "soft_dice": "soft-Dice points", "mean_probability": "probability points",
                 "mean_logit": "logits"}


def outcome_unit(parameters: dict) -> str:
    """The unit of a result's effects, from its ``parameters["outcome"]["kind"]`` ("outcome units" if unknown)."""
    kind = (parameters.get("outcome") or {}).get("kind", "")
    return OUTCOME_UNITS.get(kind, "outcome units")


@dataclass(frozen=True)
class Outcome:
    """How a model's output in the target region becomes one number.

    Parameters
    ----------
    kind
        ``"dice"``: 100 x Dice of the thresholded prediction against the reference
        (the published outcome); ``"soft_dice"``: 100 x soft Dice of probabilities;
        ``"mean_probability"``: 100 x mean probability of ``channel``;
        ``"mean_logit"``: mean raw score of ``channel``.
    channel
        Output channel (class) to explain. ``None``: channel 0 for sigmoid/none
        outputs with one channel, channel 1 (foreground) for a 2-channel softmax.
    temperature
        Probabilities are ``sigmoid(z / T)`` or ``softmax(z / T)``. Thresholded
        (``dice``) outcomes are blind to T; soft outcomes are not.
    threshold
        Probability above which a voxel counts as predicted (sigmoid / none outputs);
        softmax outputs use the arg-max class.
    """

    kind: OutcomeKind = "dice"
    channel: int | None = None
    temperature: float = 1.0
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"unknown outcome {self.kind!r}; choose one of {', '.join(OUTCOME_KINDS)}")
        if self.channel is not None:
            object.__setattr__(self, "channel", non_negative_int("channel", self.channel))
        object.__setattr__(self, "temperature", positive_float("temperature", self.temperature))
        threshold = finite_float("threshold", self.threshold)
        if not 0 < threshold < 1:
            raise ValueError(
                f"threshold must be a probability between 0 and 1 (exclusive); got {shown(self.threshold)}"
            )
        object.__setattr__(self, "threshold", threshold)

    def describe(self) -> dict:
        return asdict(self)

    def at_temperature(self, temperature: float) -> Outcome:
        """This outcome with probabilities at ``temperature`` (> 0)."""
        return replace(self, temperature=temperature)

    # ---------------------------------------------------------------- helpers
    def resolve_channel(self, n_channels: int, activation: str) -> int:
        """The channel index this outcome explains for a model with ``n_channels`` outputs."""
        if self.channel is not None:
            if not 0 <= self.channel < n_channels:
                raise ValueError(f"channel {self.channel} does not exist: the model outputs {n_channels} channel(s)")
            return self.channel
        if activation == "softmax":
            if n_channels == 2:
                return 1
            raise ValueError(
                f"the model outputs {n_channels} softmax classes: choose the class to explain (channel=...)"
            )
        if n_channels == 1:
            return 0
        raise ValueError(f"the model outputs {n_channels} channels: choose the channel to explain (channel=...)")

    def probabilities(self, scores: torch.Tensor, activation: str, channel: int) -> torch.Tensor:
        """Probability of ``channel``, ``(N, M)``, at this outcome's temperature."""
        if activation == "sigmoid":
            return torch.sigmoid(scores[:, channel].float() / self.temperature)
        if activation == "softmax":
            return torch.softmax(scores.float() / self.temperature, dim=1)[:, channel]
        return scores[:, channel].float()

    def predicted_mask(self, scores: torch.Tensor, activation: str, channel: int) -> torch.Tensor:
        """Thresholded prediction of ``channel``, ``(N, M)`` bool."""
        if activation == "softmax":
            return scores.argmax(dim=1) == channel
        if activation == "sigmoid":
            # sigmoid(z / T) > t  <=>  z > T * logit(t): blind to T only at t = 0.5
            return torch.sigmoid(scores[:, channel].float() / self.temperature) > self.threshold
        return scores[:, channel] > self.threshold

    # ---------------------------------------------------------------- value
    def __call__(self, scores: torch.Tensor, reference: torch.Tensor, activation: str, channel: int) -> torch.Tensor:
        """Outcome values ``(N,)`` float64 for scores ``(N, K, M)`` and a reference ``(M,)`` bool."""
        if self.kind == "mean_logit":
            return scores[:, channel].double().mean(dim=1)
        if self.kind == "mean_probability":
            return 100.0 * self.probabilities(scores, activation, channel).double().mean(dim=1)
        ref = reference.to(scores.device, torch.float64)[None]
        if self.kind == "dice":
            pred = self.predicted_mask(scores, activation, channel).double()
        else:
            pred = self.probabilities(scores, activation, channel).double()
        overlap = (pred * ref).sum(dim=1)
        total = pred.sum(dim=1) + ref.sum(dim=1)
        # Both empty: the prediction agrees perfectly with an empty reference.
        return torch.where(total > 0, 200.0 * overlap / total.clamp_min(1e-12), torch.full_like(total, 100.0))


def outcome_for(outcome: Outcome | str, model) -> Outcome:
    """The outcome a method measures on ``model``, checked before any forward pass.

    A kind (``"dice"``, ...) gets the channel and temperature of the model's
    description; an :class:`Outcome` without a channel gets the description's channel.
    When the description knows the output channels, the channel is checked against them.
    """
    description = getattr(model, "description", None)
    if isinstance(outcome, str):
        outcome = Outcome(outcome) if description is None else description.outcome(outcome)
    elif not isinstance(outcome, Outcome):
        raise TypeError(f"outcome must be an Outcome or one of {', '.join(OUTCOME_KINDS)}; got {shown(outcome)}")
    elif outcome.channel is None and getattr(description, "channel", None) is not None:
        outcome = replace(outcome, channel=description.channel)
    out_channels = getattr(description, "out_channels", None)
    classifier_default = getattr(model, "is_classifier", False) and outcome.channel is None  # the predicted class
    if out_channels is not None and not classifier_default:
        outcome.resolve_channel(out_channels, model.activation)
    return outcome
