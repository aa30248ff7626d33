"""The natural-patch bank: block-sized crops of *other* images, drawn with replacement."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_pdcr.interventions.base import Intervention, Strata
from napari_pdcr.validation import non_negative_int, positive_int


class PatchBank(Intervention):
    """Replacement blocks cropped at random positions from other images.

    This is the published "natural" intervention: a bank of up to ``size`` crops of the
    block's shape, taken at uniformly random positions of uniformly chosen source images,
    then drawn uniformly with replacement (not matched by position). The bank for each
    block shape is extracted once, reproducibly from ``seed``.

    Parameters
    ----------
    sources
        Other images in the model's input space: a sequence of ``(C, *S)`` arrays (sizes
        may differ) or one stacked array ``(N, C, *S)``. For a 2D model, other slices;
        for a 3D model, other volumes (or the same volume's other regions, if nothing
        else exists — say so in the results).
    size
        Number of crops in the bank (the published method uses up to 10,000).
    seed
        Seed of the crop positions.
    """

    name, deterministic = "patch_bank", False

    def __init__(self, sources: Sequence[np.ndarray] | np.ndarray, size: int = 10_000, seed: int = 0):
        self.size = positive_int("patch bank size", size)
        self.seed = non_negative_int("patch bank seed", seed)
        if isinstance(sources, np.ndarray) and sources.ndim < 3:
            raise ValueError(
                f"the patch-bank sources are one array of shape {sources.shape}: pass a list of (C, H, W) "
                "or (C, D, H, W) arrays (e.g. [source[None]]) or a stack (N, C, *S)"
            )
        self.sources = [torch.as_tensor(np.asarray(s, dtype=np.float32)) for s in sources]
        if not self.sources:
            raise ValueError("a patch bank needs at least one source image")
        for i, source in enumerate(self.sources):
            shape = tuple(source.shape)
            if source.ndim == 2:
                fix = "sources[:, None] for a stack of slices" if isinstance(sources, np.ndarray) else "source[None]"
                raise ValueError(
                    f"patch-bank source {i} has shape {shape} but a 2D model needs (C, H, W) arrays: "
                    f"add a channel axis ({fix})"
                )
            if source.ndim not in (3, 4):
                raise ValueError(
                    f"patch-bank source {i} has shape {shape}: sources are (C, H, W) or (C, D, H, W) arrays"
                )
        ndims = {s.ndim for s in self.sources}
        channels = {s.shape[0] for s in self.sources}
        if len(ndims) != 1 or len(channels) != 1:
            raise ValueError("all patch-bank sources must be (C, *S) arrays with the same C and dimensionality")
        if any(not torch.isfinite(s).all() for s in self.sources):
            raise ValueError("a patch-bank source contains NaN or infinite values")
        self._banks: dict[tuple[int, ...], torch.Tensor] = {}
        self._unique: dict[tuple[int, ...], tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}

    @property
    def spatial_dims(self) -> int:
        return self.sources[0].ndim - 1

    def check(self, image, block_shape):
        self.prepare(image)
        self._fitting(tuple(int(b) for b in block_shape))

    def prepare(self, image):
        if image.ndim != self.sources[0].ndim or image.shape[0] != self.sources[0].shape[0]:
            raise ValueError(
                f"patch-bank sources are {self.spatial_dims}D with C={self.sources[0].shape[0]} "
                f"(source 0 has shape {tuple(self.sources[0].shape)}) but the image is {image.ndim - 1}D with "
                f"C={image.shape[0]} (shape {tuple(image.shape)}): build the bank in the model's input space"
            )

    def _fitting(self, block_shape: tuple[int, ...]) -> list[torch.Tensor]:
        """The sources at least as large as ``block_shape``; ``ValueError`` when there is none."""
        fits = [s for s in self.sources if all(n >= b for n, b in zip(s.shape[1:], block_shape, strict=True))]
        if not fits:
            largest = max((tuple(s.shape[1:]) for s in self.sources), key=lambda shape: np.prod(shape))
            raise ValueError(
                f"no patch-bank source is large enough for blocks of shape {block_shape} (the largest is "
                f"{largest}): choose smaller blocks or larger images"
            )
        return fits

    def bank(self, block_shape: tuple[int, ...]) -> torch.Tensor:
        """The crops for ``block_shape``: ``(size, C, *block_shape)``, extracted on first use."""
        block_shape = tuple(int(b) for b in block_shape)
        if block_shape not in self._banks:
            fits = self._fitting(block_shape)
            rng = np.random.default_rng([self.seed, *block_shape])
            which = rng.integers(len(fits), size=self.size)
            crops = torch.empty((self.size, fits[0].shape[0], *block_shape), dtype=torch.float32)
            for i, src in enumerate(fits):  # one vectorised gather per source image
                rows = np.flatnonzero(which == i)
                if len(rows):
                    crops[torch.from_numpy(rows)] = _gather_crops(src, block_shape, len(rows), rng)
            self._banks[block_shape] = crops
        return self._banks[block_shape]

    def sample(self, original, n_draws, rng, location):
        crops = self.bank(tuple(original.shape[1:]))
        return crops[torch.from_numpy(rng.integers(len(crops), size=n_draws))].to(original.dtype)

    def unique_members(self, block_shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The bank's distinct crops: ``(patches (U, C, *b), counts (U,), member_patch (size,))``.

        Identical crops (e.g. all-zero background) collapse into one patch; ``counts`` are
        how many bank members each stands for, ``member_patch[i]`` is member ``i``'s patch.
        """
        block_shape = tuple(int(b) for b in block_shape)
        if block_shape not in self._unique:
            crops = self.bank(block_shape)
            patches, inverse, counts = torch.unique(crops.flatten(1), dim=0, return_inverse=True, return_counts=True)
            self._unique[block_shape] = (patches.reshape(-1, *crops.shape[1:]), counts.numpy(), inverse.numpy())
        return self._unique[block_shape]

    def strata(self, original, min_weight, max_fixed):
        """The distinct crops with a share of the bank of at least ``min_weight`` (the ``max_fixed`` largest)
        and a uniform sampler of the other members; None when no crop is that frequent."""
        patches, counts, member_patch = self.unique_members(tuple(original.shape[1:]))
        weights = counts / self.size
        heavy = np.flatnonzero(weights >= min_weight)
        heavy = heavy[np.argsort(-weights[heavy], kind="stable")][:max_fixed]
        if len(heavy) == 0:
            return None
        crops = self.bank(tuple(original.shape[1:]))
        rest = torch.from_numpy(np.flatnonzero(~np.isin(member_patch, heavy)))

        def sample_rest(n_draws: int, rng: np.random.Generator) -> torch.Tensor:
            return crops[rest[torch.from_numpy(rng.integers(len(rest), size=n_draws))]].to(original.dtype)

        return Strata(patches[torch.from_numpy(heavy)].to(original.dtype), weights[heavy], sample_rest)

    def describe(self):
        return {
            "name": self.name,
            "size": self.size,
            "seed": self.seed,
            "n_sources": len(self.sources),
            "source_shapes": [list(s.shape) for s in self.sources[:8]],
        }


def _gather_crops(source: torch.Tensor, block_shape: tuple[int, ...], n: int, rng) -> torch.Tensor:
    """``n`` crops ``(n, C, *block_shape)`` of ``source`` ``(C, *S)`` at uniform random positions."""
    index = []
    for axis, (size, b) in enumerate(zip(source.shape[1:], block_shape, strict=True)):
        start = torch.from_numpy(rng.integers(size - b + 1, size=n))
        shape = [n] + [1] * len(block_shape)
        shape[axis + 1] = b
        index.append((start[:, None] + torch.arange(b)).reshape(shape))
    # advanced indexing broadcasts the per-axis index grids to (n, *block_shape), C last
    return source[(slice(None), *index)].movedim(0, 1)
