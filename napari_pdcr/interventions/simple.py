"""Replacements that need no other images: zero, constant, image mean, blur, noise."""

from __future__ import annotations

import numpy as np
import torch

from napari_pdcr.interventions.base import Intervention
from napari_pdcr.validation import finite_float, positive_float


class Zero(Intervention):
    """Replace the block with zeros (the published "zero" ablation)."""

    name, deterministic = "zero", True

    def sample(self, original, n_draws, rng, location):
        return torch.zeros((n_draws, *original.shape), dtype=original.dtype)


class Constant(Intervention):
    """Replace the block with a constant ``value`` (model input units)."""

    name, deterministic = "constant", True

    def __init__(self, value: float = 0.0):
        self.value = finite_float("constant value", value)

    def sample(self, original, n_draws, rng, location):
        return torch.full((n_draws, *original.shape), self.value, dtype=original.dtype)

    def describe(self):
        return {"name": self.name, "value": self.value}


class ImageMean(Intervention):
    """Replace the block with the image's per-channel mean."""

    name, deterministic = "mean", True

    def prepare(self, image):
        self._mean = image.reshape(image.shape[0], -1).mean(dim=1)

    def sample(self, original, n_draws, rng, location):
        shape = (n_draws, original.shape[0]) + (1,) * (original.ndim - 1)
        return self._mean.reshape(shape).expand(n_draws, *original.shape).to(original.dtype).clone()


class Blur(Intervention):
    """Replace the block with the same block of a Gaussian-blurred copy of the image.

    Blurring the whole image once (rather than each block alone) avoids block-edge
    artefacts. ``sigma`` is in voxels.
    """

    name, deterministic = "blur", True

    def __init__(self, sigma: float = 4.0):
        self.sigma = positive_float("blur sigma", sigma)

    def prepare(self, image):
        # MONAI's separable Gaussian filter, rather than a hand-written convolution.
        from monai.networks.layers import GaussianFilter

        spatial_dims = image.ndim - 1
        blur = GaussianFilter(spatial_dims, self.sigma)
        with torch.inference_mode():
            self._blurred = blur(image[None].float())[0].to(image.dtype)

    def sample(self, original, n_draws, rng, location):
        block = self._blurred[(slice(None), *location)]
        return block[None].expand(n_draws, *block.shape).clone()

    def describe(self):
        return {"name": self.name, "sigma": self.sigma}


class Noise(Intervention):
    """Replace the block with Gaussian noise.

    ``mean`` / ``std`` default to the image's per-channel mean and standard deviation,
    so the noise has the image's intensity statistics.
    """

    name, deterministic = "noise", False

    def __init__(self, mean: float | None = None, std: float | None = None):
        self.mean = None if mean is None else finite_float("noise mean", mean)
        self.std = None if std is None else finite_float("noise std", std, minimum=0)

    def prepare(self, image):
        flat = image.reshape(image.shape[0], -1).double().cpu()  # draws are made with numpy
        self._mean = flat.mean(dim=1) if self.mean is None else torch.full((image.shape[0],), float(self.mean))
        self._std = flat.std(dim=1) if self.std is None else torch.full((image.shape[0],), float(self.std))

    def sample(self, original, n_draws, rng, location):
        draws = rng.standard_normal((n_draws, *original.shape))
        shape = (1, original.shape[0]) + (1,) * (original.ndim - 1)
        values = draws * self._std.numpy().reshape(shape) + self._mean.numpy().reshape(shape)
        return torch.from_numpy(values.astype(np.float32)).to(original.dtype)

    def describe(self):
        return {"name": self.name, "mean": self.mean, "std": self.std}
