"""Small image classifiers for the lesion task (:mod:`napari_pdcr.lesions`).

:class:`LesionCNN` is a plain CNN made only of layers Captum's LRP has rules for
(``Conv2d``, ``BatchNorm2d``, ``ReLU``, ``MaxPool2d``, ``AdaptiveAvgPool2d``, ``Linear``).

:class:`TWClassifier` is a TW-style classifier ("Model Guidance via Explanations Turns
Image Classifiers into Segmentation Models", arXiv 2407.03009): a :class:`LesionCNN`
encoder whose decoder is the unrolled LRP-epsilon pass back through the encoder's own
layers, with the encoder's weights (it has no weights of its own). The decoder's
relevance maps, one per class, are differentiable functions of the weights and serve as
segmentation logits (softmax over the classes, as in the paper), so a few pixel labels
can train them beside the image labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: stabiliser of the LRP-epsilon rule, ``z + epsilon * sign(z)`` (sign(0) = +1, as Captum)
LRP_EPSILON = 1e-3
#: segmentation logits = HEATMAP_SCALE * relevance maps (a map sums to about its logit, so
#: its per-pixel values are small; the paper's scale factor, fixed, not learned)
HEATMAP_SCALE = 1e4


class LesionCNN(nn.Module):
    """Five conv-batchnorm-ReLU-maxpool stages, global average pool, linear (~245k parameters).

    ``(N, 1, H, W)`` -> ``(N, n_classes)`` logits; ``H`` and ``W`` multiples of 32. The
    max-pools carry a small lesion to the 1/32-resolution features, which the average
    pool would otherwise dilute; without batch norm the net did not leave chance level
    in 250 training steps on the lesion task.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 128), n_classes: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def layer_sequence(self) -> list[nn.Module]:
        """The layers in forward order (the flatten before ``classifier`` is implicit)."""
        return [*self.features, self.pool, self.classifier]


def _stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0)


def _relevance_back(layer: nn.Module, a: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor, epsilon: float) -> torch.Tensor:
    """LRP-epsilon through one layer: ``R_in = a * W^T (R_out / (z + eps sign z))``, ``W`` the layer's own weights.

    ``a``, ``z``: the layer's input and output ``(B, ...)``; ``relevance``: ``(B, ...)``
    shaped as ``z``. ReLU passes relevance unchanged; batch norm is the per-channel affine
    map it applies (running statistics in eval mode, the batch's in training mode).
    """
    if isinstance(layer, nn.ReLU):
        return relevance
    s = relevance / _stabilised(z, epsilon)
    if isinstance(layer, nn.Conv2d):
        expected = [
            (z.shape[d] - 1) * layer.stride[i] - 2 * layer.padding[i] + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1
            for i, d in enumerate((2, 3))
        ]
        output_padding = tuple(a.shape[d] - e for d, e in zip((2, 3), expected, strict=True))
        return a * F.conv_transpose2d(s, layer.weight, stride=layer.stride, padding=layer.padding,
                                      output_padding=output_padding, groups=layer.groups, dilation=layer.dilation)
    if isinstance(layer, nn.MaxPool2d):
        _, indices = F.max_pool2d(a, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                  ceil_mode=layer.ceil_mode, return_indices=True)
        return a * F.max_unpool2d(s, indices, layer.kernel_size, layer.stride, layer.padding, output_size=a.shape[-2:])
    if isinstance(layer, nn.AdaptiveAvgPool2d) and z.shape[2:] == (1, 1):
        return a * s / (a.shape[2] * a.shape[3])
    if isinstance(layer, nn.BatchNorm2d):
        variance = a.var(dim=(0, 2, 3), unbiased=False) if layer.training else layer.running_var
        return a * s * (layer.weight / torch.sqrt(variance + layer.eps))[None, :, None, None]
    if isinstance(layer, nn.Linear):
        return a * (s @ layer.weight)
    raise TypeError(f"no LRP-epsilon rule for layer {type(layer).__name__}")


class TWClassifier(nn.Module):
    """A :class:`LesionCNN` encoder with the unrolled LRP-epsilon decoder through its own weights.

    ``forward``: ``(N, 1, H, W)`` -> ``(N, K)`` class logits (the classifier).
    :meth:`heatmaps`: the logits and ``(N, K, H, W)`` relevance maps, one per class, each
    the LRP-epsilon relevance of that class's logit at the input pixels (relevance
    units: logit, a map sums to about its logit). :meth:`segment`: the maps times
    :data:`HEATMAP_SCALE` as segmentation logits, ``softmax`` over ``K``.
    """

    def __init__(self, epsilon: float = LRP_EPSILON, **encoder_options):
        super().__init__()
        self.encoder = LesionCNN(**encoder_options)
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def heatmaps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (N, K), relevance (N, K, H, W))``; differentiable in the encoder's weights."""
        layers = self.encoder.layer_sequence()
        activations = []  # (input, output) of every layer
        a = x
        for layer in layers:
            if isinstance(layer, nn.Linear):
                a = torch.flatten(a, 1)
            z = layer(a)
            activations.append((a, z))
            a = z
        logits = a
        n, k = logits.shape
        # all classes in one backward pass: row n * K + c starts from logit c of image n
        relevance = torch.diag_embed(logits).reshape(n * k, k)
        for layer, (a, z) in zip(reversed(layers), reversed(activations), strict=True):
            relevance = relevance.reshape(n * k, *z.shape[1:])
            relevance = _relevance_back(
                layer, a.repeat_interleave(k, dim=0), z.repeat_interleave(k, dim=0), relevance, self.epsilon
            )
        maps = relevance.sum(dim=1).reshape(n, k, *x.shape[2:])  # summed over input channels
        return logits, maps

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(N, K, H, W)``: the scaled class relevance maps (softmax over ``K``)."""
        return HEATMAP_SCALE * self.heatmaps(x)[1]
