"""Small classifiers for the tests: one whose class score depends on a known patch, and a plain CNN.

:class:`PatchClassifier` (2D, 32 x 32, one channel) detects bright content (``x > 0.5``)
with a 1x1 convolution and a ReLU and counts it **inside a known patch only** (a linear
head over the flattened map whose weights are zero elsewhere): class 1's logit is
``GAIN * sum over the patch of relu(x - 0.5)``, class 0's its negative. On
:func:`patch_image` (a bright patch on a dark background, optionally a bright distractor
elsewhere) the patch is the one region the score depends on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.description import ModelDescription

SHAPE = (32, 32)
#: the patch the score depends on (one 8 x 8 block of the default grid)
PATCH = (slice(8, 16), slice(16, 24))
#: a bright square the score ignores
DISTRACTOR = (slice(20, 28), slice(2, 10))
GAIN = 1 / 8


def patch_mask(where=PATCH, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[where] = True
    return mask


def patch_image(distractor: bool = False, seed: int = 0) -> np.ndarray:
    """``(1, 32, 32)`` float32: dark noise in [0, 0.3], the patch at 1.0 (and the distractor at 1.0)."""
    image = np.random.default_rng(seed).uniform(0.0, 0.3, SHAPE).astype(np.float32)
    image[PATCH] = 1.0
    if distractor:
        image[DISTRACTOR] = 1.0
    return image[None]


class PatchClassifier(nn.Module):
    """Two classes; class 1's logit counts bright pixels inside ``patch`` (see the module docstring),
    on images of spatial ``shape`` only."""

    def __init__(self, shape=SHAPE, patch=PATCH):
        super().__init__()
        self.detect = nn.Conv2d(1, 1, 1)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.head = nn.Linear(shape[0] * shape[1], 2, bias=False)
        with torch.no_grad():
            self.detect.weight.fill_(1.0)
            self.detect.bias.fill_(-0.5)
            weights = torch.from_numpy(patch_mask(patch, shape).ravel().astype(np.float32)) * GAIN
            self.head.weight.copy_(torch.stack([-weights, weights]))

    def forward(self, x):
        return self.head(self.flatten(self.relu(self.detect(x))))


def patch_classifier(shape=SHAPE, patch=PATCH) -> SegmentationModel:
    """:class:`PatchClassifier` wrapped as a 2D softmax classifier."""
    network = PatchClassifier(shape, patch).eval()
    description = ModelDescription(kind="classifier", spatial_dims=2, in_channels=1, out_channels=2, activation="softmax")
    return SegmentationModel(network, spatial_dims=2, in_channels=1, activation="softmax", name="patch classifier",
                             description=description)


class SmallCnn(nn.Module):
    """A plain CNN classifier (conv, batch norm, ReLU, max pool, global average pool, linear), 2D or 3D.

    ``bias=False`` leaves out every bias and the batch norms, so that LRP's epsilon rule conserves relevance.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, n_classes: int = 3, bias: bool = True):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        average = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        layers = []
        for c_in, c_out in ((in_channels, 8), (8, 16)):
            layers += [conv(c_in, c_out, 3, padding=1, bias=bias)]
            layers += [norm(c_out)] if bias else []
            layers += [nn.ReLU(inplace=True), pool(2)]
        self.features = nn.Sequential(*layers)
        self.pool = average(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(16, n_classes, bias=bias)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def small_cnn(spatial_dims: int = 2, n_classes: int = 3, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    network = SmallCnn(spatial_dims, 1, n_classes, bias).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for module in network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return network
