"""Small synthetic models whose region effects are known in closed form.

Everything here is a plain ``torch.nn.Module`` (or a thin wrapper around one) plus the
closed-form quantities the tests compare the engine against. Images are tiny (32x32,
16^3) so that a whole engine run takes a fraction of a second on a CPU.

The workhorse is :class:`TapModel`: with blocks of ``block`` voxels, the score of every
voxel in grid cell ``g`` is ``bias_k + gain_k * s(g)`` with

    s(g) = sum over taps (offset, w) of  w * mean(block g + offset)

(``mean`` over channels and voxels, 0 beyond the border). The outcome ``mean_logit``
(activation ``"none"``, one channel, gain ``a``) in a region ``R`` is therefore linear
in the block means ``m(b)``::

    Y = bias + a * sum_b coef(b) * m(b),   coef = tap_coefficients(...)

so replacing block ``b`` by content with mean ``m'`` changes ``Y`` by
``a * coef(b) * (m' - m(b))`` and ``ATE(b) = a * coef(b) * (E[m'] - m(b))`` exactly.
The model is translation-equivariant on the block grid (it is average pooling, a shift
and nearest upsampling), so the engine's window crop is exact for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation
from torch import nn

from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.regions import BlockGrid

# ---------------------------------------------------------------------------- helpers


@contextmanager
def torch_threads(n: int = 1):
    """Run torch on ``n`` threads: the test models are tiny, and on a loaded 2-core machine
    torch's thread pool costs far more than it gains (milliseconds per tiny op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)



def random_image(shape: Sequence[int], seed: int = 0, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Uniform random float32 image of ``shape`` (``(C, *S)``)."""
    return np.random.default_rng(seed).uniform(low, high, size=tuple(shape)).astype(np.float32)


def block_means(image: np.ndarray, block: int) -> np.ndarray:
    """Mean over channels and voxels of every block, ``grid shape`` (float64)."""
    image = np.asarray(image, dtype=np.float64)
    spatial = image.shape[1:]
    assert all(n % block == 0 for n in spatial), "test images are multiples of the block"
    split = [image.shape[0]]
    for n in spatial:
        split += [n // block, block]
    axes = (0, *range(2, 2 * len(spatial) + 1, 2))
    return image.reshape(split).mean(axis=axes)


def region_cell_fractions(region: np.ndarray, block: int) -> np.ndarray:
    """Share of the region's voxels in each grid cell, ``grid shape``."""
    grid = BlockGrid.create(region.shape, block)
    counts = grid.mean_per_block(region.astype(np.float64)) * block ** region.ndim
    return counts / counts.sum()


def receptive_blocks(region: np.ndarray, radius: int, block: int) -> np.ndarray:
    """Blocks that intersect the region dilated by ``radius`` voxels (Chebyshev), ``grid shape``."""
    structure = np.ones((3,) * region.ndim, dtype=bool)
    dilated = binary_dilation(region, structure=structure, iterations=radius) if radius else region
    return BlockGrid.create(region.shape, block).any_per_block(dilated)


def _shift(pooled: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``out[g] = pooled[g + offset]`` over the trailing spatial axes, 0 beyond the border."""
    out = pooled
    n_spatial = len(offset)
    for axis, d in enumerate(offset):
        dim = pooled.ndim - n_spatial + axis
        size = out.shape[dim]
        if d == 0:
            continue
        zeros_shape = list(out.shape)
        zeros_shape[dim] = min(abs(d), size)
        zeros = out.new_zeros(zeros_shape)
        if d > 0:
            kept = out.narrow(dim, min(d, size), size - min(d, size))
            out = torch.cat([kept, zeros], dim=dim)
        else:
            kept = out.narrow(dim, 0, size - min(-d, size))
            out = torch.cat([zeros, kept], dim=dim)
    return out


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return pool(x, block, block).mean(dim=1)  # (N, *G)


def _upsample(s: torch.Tensor, block: int) -> torch.Tensor:
    for dim in range(1, s.ndim):
        s = s.repeat_interleave(block, dim=dim)
    return s


# ---------------------------------------------------------------------------- models


class TapModel(nn.Module):
    """Scores ``bias_k + gain_k * sum_taps w * mean(block g + offset)`` (see the module docstring)."""

    def __init__(
        self,
        spatial_dims: int,
        block: int,
        taps: Sequence[tuple[Sequence[int], float]],
        bias: Sequence[float] = (0.0,),
        gain: Sequence[float] = (1.0,),
    ):
        super().__init__()
        assert len(bias) == len(gain)
        self.spatial_dims, self.block = spatial_dims, block
        self.taps = [(tuple(int(o) for o in off), float(w)) for off, w in taps]
        assert all(len(off) == spatial_dims for off, _ in self.taps)
        shape = (1, len(bias)) + (1,) * spatial_dims
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).reshape(shape))
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float32).reshape(shape))

    def signal(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` per voxel, ``(N, *S)``."""
        pooled = _pool(x, self.block)
        s = torch.zeros_like(pooled)
        for offset, w in self.taps:
            s = s + w * _shift(pooled, offset)
        return _upsample(s, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + self.gain * self.signal(x)[:, None]

    def coefficients(self, region: np.ndarray) -> np.ndarray:
        """``coef(b)``: d mean(s over region) / d m(b), ``grid shape``."""
        frac = region_cell_fractions(region, self.block)
        coef = np.zeros_like(frac)
        for cell in zip(*np.nonzero(frac), strict=True):
            for offset, w in self.taps:
                src = tuple(c + o for c, o in zip(cell, offset, strict=True))
                if all(0 <= s < n for s, n in zip(src, coef.shape, strict=True)):
                    coef[src] += frac[cell] * w
        return coef


class ZeroBlockNaNModel(TapModel):
    """A :class:`TapModel` that returns NaN everywhere for an input with an all-zero block
    (finite on a positive image, NaN under zero ablation)."""

    def forward(self, x):
        bad = (_pool(x, self.block) == 0).flatten(1).any(dim=1)
        out = super().forward(x)
        return torch.where(bad.reshape(-1, *[1] * (out.ndim - 1)), torch.full_like(out, float("nan")), out)


class AbsoluteBlockModel(nn.Module):
    """Scores ``bias + w * mean(x[src])`` everywhere: reads one block at a fixed *absolute*
    position (not translation-equivariant, so cropping the input changes what it reads)."""

    def __init__(self, src: tuple[slice, ...], w: float = 2.0, bias: float = 0.25):
        super().__init__()
        self.src, self.w, self.b = src, float(w), float(bias)

    def forward(self, x):
        part = x[(slice(None), slice(None), *self.src)]
        m = part.flatten(1).mean(dim=1)
        value = self.b + self.w * m
        return value.reshape(-1, 1, *([1] * (x.ndim - 2))).expand(x.shape[0], 1, *x.shape[2:]).contiguous()


class LocalConv(nn.Module):
    """``layers`` 3x3(x3) convolutions with tanh: receptive field radius ``layers`` voxels.

    ``global_weight`` adds ``global_weight * mean(x)`` to every score: then every block
    reaches every region (a model mixing the whole image).
    """

    def __init__(self, spatial_dims: int = 2, layers: int = 2, width: int = 4, seed: int = 0, global_weight: float = 0.0):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        chans = [1] + [width] * (layers - 1) + [1]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(conv(chans[i], chans[i + 1], 3, padding=1))
            if i < layers - 1:
                mods.append(nn.Tanh())
        self.net = nn.Sequential(*mods)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.global_weight = float(global_weight)

    def forward(self, x):
        y = self.net(x)
        if self.global_weight:
            y = y + self.global_weight * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return y


class NaNRemoving(nn.Module):
    """``inner(nan_to_num(x))``: defeats reachability by NaN propagation (NaN becomes 0)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.nan_to_num(x, nan=0.0))


class NaNModel(nn.Module):
    """Returns NaN everywhere."""

    def forward(self, x):
        return torch.full_like(x[:, :1], float("nan"))


class ShrinkingModel(nn.Module):
    """Halves the spatial size (a model that does not return a per-voxel map)."""

    def forward(self, x):
        pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        return pool(x[:, :1], 2)


class OOMModel(nn.Module):
    """Wraps a network; raises a fake CUDA out-of-memory error for batches larger than ``max_batch``."""

    def __init__(self, inner: nn.Module, max_batch: int):
        super().__init__()
        self.inner, self.max_batch = inner, max_batch
        self.batch_sizes: list[int] = []
        self.n_oom = 0

    def forward(self, x):
        if x.shape[0] > self.max_batch:
            self.n_oom += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (fake, from the test suite)")
        self.batch_sizes.append(int(x.shape[0]))
        return self.inner(x)


class FixedSizeModel(nn.Module):
    """Wraps a network that only accepts one spatial size (like fixed positional embeddings)."""

    def __init__(self, inner: nn.Module, size: Sequence[int]):
        super().__init__()
        self.inner, self.size = inner, tuple(size)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.size:
            raise RuntimeError(f"input size {tuple(x.shape[2:])} does not match the model's {self.size}")
        return self.inner(x)


# ---------------------------------------------------------------------------- wrappers


def wrap(network: nn.Module, spatial_dims: int, activation: str = "none", in_channels: int = 1, divisible_by=1, name="synthetic"):
    return SegmentationModel(
        network, spatial_dims=spatial_dims, in_channels=in_channels, activation=activation,
        divisible_by=divisible_by, name=name, device="cpu",
    )


def tap_model(spatial_dims, block, taps, activation="none", bias=(0.0,), gain=(1.0,), in_channels=1, cls=TapModel):
    """A :class:`TapModel` wrapped as a ``SegmentationModel`` (divisible by the block)."""
    net = cls(spatial_dims, block, taps, bias=bias, gain=gain)
    return wrap(net, spatial_dims, activation, in_channels=in_channels, divisible_by=block, name="tap"), net
