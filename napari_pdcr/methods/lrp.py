"""Layer-wise relevance propagation (Bach et al. 2015), epsilon rule, of a classifier's class logit (Captum).

Captum's ``LRP`` has default rules for 2D layers only; the epsilon rule is the same
formula for any layer that is linear in its input (convolutions, linear layers, pooling,
batch norm at inference), so :class:`Lrp` assigns it to those in 1D, 2D and 3D, passes
relevance through reshapes and identities (flatten, channel dropout at inference)
unchanged, and lets Captum pass it through ReLU, Tanh and Dropout. A network with any
other layer (sigmoid, GELU, attention, ...) is refused when the method is built.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache

from torch import nn

from napari_pdcr.components.enumerate import network_of
from napari_pdcr.engine.estimator import Progress
from napari_pdcr.methods.attribution import AttributionMethod, channel_sum
from napari_pdcr.validation import positive_float

#: layers linear in their input at inference: the epsilon rule applies as written
EPSILON_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
#: layers that only reshape or copy their input at inference: relevance passes unchanged
RESHAPE_LAYERS = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
#: layers Captum passes relevance through unchanged (exactly these types)
PASS_THROUGH_LAYERS = (nn.ReLU, nn.Dropout, nn.Tanh)


def leaf_layers(network: nn.Module) -> list[nn.Module]:
    """The modules without children, in order (the layers Captum's LRP visits)."""
    return [module for module in network.modules() if not list(module.children())]


def unsupported_layers(network: nn.Module) -> list[str]:
    """Names of the leaf layer types LRP has no rule for (empty when every layer has one)."""
    return sorted({type(layer).__name__ for layer in leaf_layers(network)
                   if type(layer) not in PASS_THROUGH_LAYERS and not isinstance(layer, EPSILON_LAYERS + RESHAPE_LAYERS)})


@lru_cache(maxsize=1)
def reshape_rule() -> type:
    """A Captum propagation rule that passes relevance through a layer unchanged (Captum imported on first use)."""
    from captum.attr._utils.lrp_rules import PropagationRule

    class ReshapeRule(PropagationRule):
        """Relevance in = relevance out, reshaped by autograd (the epsilon rule would scale it by x / (x + eps))."""

        def _create_backward_hook_input(self, inputs):
            def keep(grad):
                self.relevance_input[grad.device] = grad.data
                grad.replace_out = grad
                return grad

            return keep

        def _create_backward_hook_output(self, outputs):
            def keep(grad):
                self.relevance_output[grad.device] = grad.data
                return grad

            return keep

        def _manipulate_weights(self, module, inputs, outputs) -> None:
            pass

    return ReshapeRule


@contextmanager
def epsilon_rules(network: nn.Module, epsilon: float):
    """The epsilon rule on every linear layer of ``network``, the reshape rule on its reshapes and no in-place
    ReLU (Captum's backward hooks need the ReLU's input), for the time of one LRP pass; everything is
    restored afterwards."""
    from captum.attr._utils.lrp_rules import EpsilonRule

    layers = [layer for layer in leaf_layers(network) if isinstance(layer, EPSILON_LAYERS + RESHAPE_LAYERS)]
    in_place = [layer for layer in leaf_layers(network) if isinstance(layer, nn.ReLU) and layer.inplace]
    for layer in layers:
        layer.rule = EpsilonRule(epsilon) if isinstance(layer, EPSILON_LAYERS) else reshape_rule()()
    for layer in in_place:
        layer.inplace = False
    try:
        yield
    finally:
        for layer in in_place:
            layer.inplace = True
        for layer in layers:
            for attribute in ("rule", "activations"):  # Captum leaves "activations" behind
                if hasattr(layer, attribute):
                    delattr(layer, attribute)


class Lrp(AttributionMethod):
    """LRP with the epsilon rule of the chosen class's logit of a classifier.

    Parameters
    ----------
    epsilon
        The stabiliser added to every layer's pre-activations (``z + epsilon sign(z)``):
        small keeps relevance conserved (the map sums to the logit, less what biases
        absorb); larger keeps only the stronger evidence.
    outcome, seed, device, batch_size, memory_budget_mb
        See :class:`~napari_pdcr.methods.attribution.AttributionMethod` (the outcome's
        channel chooses the class).

    The network must be an ``nn.Module`` whose layers each have a rule (see
    :data:`EPSILON_LAYERS`, :data:`PASS_THROUGH_LAYERS`), each used once in a forward
    pass. Positive supports the class. :attr:`conservation_delta` is the logit minus the
    map's sum of the last run.
    """

    name = "lrp"
    units = "relevance of the class logit (epsilon rule; sums to the logit less what biases absorb)"

    def __init__(self, model, epsilon: float = 1e-6, **options):
        super().__init__(model, **options)
        if not model.is_classifier:
            raise ValueError(
                f"LRP explains a classifier's class score, but model {model.name!r} segments: explain it with "
                "seg_grad_cam, integrated_gradients, gradient_x_input, occlusion, rise or region effects"
            )
        unsupported = unsupported_layers(network_of(model))
        if unsupported:
            raise ValueError(
                f"LRP has no rule for the layer type(s) {', '.join(unsupported)} of model {model.name!r} "
                "(the epsilon rule needs layers linear in their input, with ReLU/Tanh/Dropout between): "
                "explain this model with integrated_gradients or gradient_x_input"
            )
        self.epsilon = positive_float("epsilon", epsilon)
        self.conservation_delta: float | None = None  #: logit minus the map's sum, of the last run

    def method_parameters(self) -> dict:
        return {"epsilon": self.epsilon, "conservation_delta": self.conservation_delta,
                "outcome": self.outcome.describe()}

    def iter_map(self, score, x):
        from captum.attr import LRP

        t0 = time.perf_counter()
        network = network_of(score.model)
        with epsilon_rules(network, self.epsilon):
            try:
                attribution, delta = LRP(_ClassScores(score.model)).attribute(
                    x[None].clone().requires_grad_(True), target=score.channel, return_convergence_delta=True,
                )
            except RuntimeError as error:
                if "more than once" in str(error):
                    raise ValueError(
                        f"LRP needs every layer of model {score.model.name!r} to be used once per forward pass; "
                        "one is used twice (e.g. one ReLU module applied after two layers): give each use its own module"
                    ) from None
                raise
        self.conservation_delta = float(delta.detach().reshape(-1)[0])
        yield Progress("lrp", 1, 1, 1, time.perf_counter() - t0)
        return channel_sum(attribution), 1


class _ClassScores(nn.Module):
    """A classifier's scores ``(N, K)`` with its network as a child module (so that Captum's LRP finds the layers)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.network = model, network_of(model)

    def forward(self, batch):
        return self.model(batch)
