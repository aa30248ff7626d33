"""Target regions and the block grid the input is cut into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from napari_pdcr.validation import positive_float, positive_int, shown


def box_region(shape: Sequence[int], start: Sequence[int], size: Sequence[int] | int) -> np.ndarray:
    """Boolean mask of ``shape`` that is True in the box ``[start, start + size)``.

    ``size`` may be one int for a cube/square. Raises ``ValueError`` when the box is
    empty or leaves the image.
    """
    shape = tuple(int(s) for s in shape)
    size = (int(size),) * len(shape) if np.isscalar(size) else tuple(int(s) for s in size)
    start = tuple(int(s) for s in start)
    if not len(start) == len(size) == len(shape):
        raise ValueError(f"box start {start} and size {size} must have one entry per axis of {shape}")
    if any(s <= 0 for s in size) or any(a < 0 or a + s > n for a, s, n in zip(start, size, shape, strict=True)):
        raise ValueError(f"box start={start} size={size} does not lie inside an image of shape {shape}")
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))] = True
    return mask


def centered_box(shape: Sequence[int], center: Sequence[int], size: Sequence[int] | int) -> np.ndarray:
    """Box mask of ``size`` centred on ``center`` (clipped to stay inside the image)."""
    size = (int(size),) * len(shape) if np.isscalar(size) else tuple(int(s) for s in size)
    start = [min(max(int(c) - s // 2, 0), n - s) for c, s, n in zip(center, size, shape, strict=True)]
    return box_region(shape, start, size)


def validate_region(
    region, spatial_shape: Sequence[int], what: str = "target region", allow_empty: bool = False
) -> np.ndarray:
    """Return ``region`` as a bool array of ``spatial_shape``; raise a clear ``ValueError`` otherwise."""
    region = np.asarray(region)
    if region.shape != tuple(spatial_shape):
        raise ValueError(
            f"the {what} has shape {region.shape} but the image's spatial shape is {tuple(spatial_shape)}"
        )
    if region.dtype != bool:
        if not np.isfinite(region.astype(np.float64, copy=False)).all():
            raise ValueError(f"the {what} contains NaN or infinite values")
        region = region != 0
    if not allow_empty and not region.any():
        raise ValueError(f"the {what} is empty: paint or choose at least one pixel")
    return region


def validate_reference(reference, spatial_shape: Sequence[int]) -> np.ndarray:
    """A reference (ground-truth) mask as bool ``spatial_shape``; it must be binary.

    Bool, or numbers with one value besides 0 (0/1, 0/255). Several labels or
    probabilities raise a ``ValueError`` that says how to make one mask of them.
    """
    mask = validate_region(reference, spatial_shape, "reference mask", allow_empty=True)
    values = np.asarray(reference)[mask]
    if values.dtype == bool or not values.size:
        return mask
    if not np.array_equal(values, np.round(values)):
        if values.min() >= 0 and values.max() <= 1:
            raise ValueError(
                "the reference mask holds probabilities (values between 0 and 1): threshold it first "
                "(e.g. reference > 0.5)"
            )
        raise ValueError(
            "the reference mask holds fractional values: pass a binary mask, or threshold it (reference > t)"
        )
    if (values != values.flat[0]).any():
        distinct = np.unique(np.asarray(reference))
        listed = ", ".join(f"{v:g}" for v in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
        raise ValueError(
            f"the reference mask has {len(distinct)} distinct values ({listed}): pass a binary mask, "
            "or choose a label (reference == label)"
        )
    return mask


def block_shape_for(block_shape, spatial_dims: int) -> tuple[int, ...]:
    """``block_shape`` (one int, or one per spatial axis) as a tuple of ``spatial_dims`` positive ints."""
    message = (
        f"block_shape must be a positive integer or {spatial_dims} of them (one per spatial axis); "
        f"got {shown(block_shape)}"
    )
    entries = (block_shape,) * spatial_dims if np.isscalar(block_shape) else block_shape
    return _per_axis(entries, spatial_dims, lambda b: positive_int("block_shape", b), message)


def voxel_spacing(spacing, spatial_dims: int) -> tuple[float, ...] | None:
    """``spacing`` (``None``, or one voxel size per spatial axis) as a tuple of positive floats."""
    if spacing is None:
        return None
    message = f"spacing must be {spatial_dims} finite numbers > 0 (one per spatial axis); got {shown(spacing)}"
    return _per_axis(spacing, spatial_dims, lambda s: positive_float("spacing", s), message)


def _per_axis(values, spatial_dims: int, check, message: str) -> tuple:
    """``check`` applied to each of ``values``; ``ValueError(message)`` unless all pass and there
    are ``spatial_dims`` of them."""
    try:
        checked = tuple(check(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if len(checked) != spatial_dims:
        raise ValueError(message)
    return checked


#: A box: ``(start, stop)`` per axis, in voxels.
Box = tuple[tuple[int, int], ...]


def bounding_box(mask: np.ndarray) -> Box:
    """The bounding box of a non-empty bool mask."""
    return tuple((int(axis.min()), int(axis.max()) + 1) for axis in np.nonzero(mask))


def union_box(boxes: Sequence[Box | None]) -> Box | None:
    """The smallest box holding every box of ``boxes`` (None entries ignored; None if there are none)."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple((min(axis[0] for axis in per), max(axis[1] for axis in per)) for per in zip(*boxes, strict=True))


def _box_volume(box: Box) -> int:
    return int(np.prod([stop - start for start, stop in box]))


#: Two groups of regions merge while their joint box is at most this many times their own boxes together.
JOINT_BOX_FACTOR = 2.0


def cluster_by_box(masks: dict, factor: float = JOINT_BOX_FACTOR) -> list[list]:
    """Groups of the keys of ``masks`` (non-empty bool masks) whose joint bounding box costs little more than their own.

    Agglomerative: two groups merge while the bounding box of their union is at most
    ``factor`` times (in voxels) their own boxes together, the pair that wastes least
    first. Regions that overlap or nearly touch share a group; regions far apart (whose
    joint box would be mostly empty) stay apart. Groups keep the order of ``masks``.
    (The factor allows for what an incremental pass recomputes around each box: the
    receptive field grows every box on every side, so a small gap between two regions
    costs little.)
    """
    groups = [([key], bounding_box(mask)) for key, mask in masks.items()]
    while len(groups) > 1:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                joint = union_box([groups[i][1], groups[j][1]])
                own = _box_volume(groups[i][1]) + _box_volume(groups[j][1])
                waste = _box_volume(joint) - own
                if _box_volume(joint) <= factor * own and (best is None or waste < best[0]):
                    best = (waste, i, j, joint)
        if best is None:
            break
        _, i, j, joint = best
        groups[i] = (groups[i][0] + groups[j][0], joint)
        del groups[j]
    order = {key: n for n, key in enumerate(masks)}
    return sorted((sorted(keys, key=order.get) for keys, _ in groups), key=lambda keys: order[keys[0]])


@dataclass(frozen=True)
class BlockGrid:
    """A grid of blocks of ``block_shape`` covering ``spatial_shape`` (edge blocks are smaller).

    Blocks are numbered in C order over the grid shape ``ceil(spatial_shape / block_shape)``.
    """

    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]

    @classmethod
    def create(cls, spatial_shape: Sequence[int], block_shape: Sequence[int] | int) -> BlockGrid:
        spatial_shape = tuple(int(s) for s in spatial_shape)
        return cls(spatial_shape, block_shape_for(block_shape, len(spatial_shape)))

    @cached_property
    def shape(self) -> tuple[int, ...]:
        """Grid shape: number of blocks per axis."""
        return tuple(-(-n // b) for n, b in zip(self.spatial_shape, self.block_shape, strict=True))

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.shape))

    def slices(self, index: int) -> tuple[slice, ...]:
        """Spatial slices of block ``index``."""
        coords = np.unravel_index(index, self.shape)
        return tuple(
            slice(c * b, min((c + 1) * b, n))
            for c, b, n in zip(coords, self.block_shape, self.spatial_shape, strict=True)
        )

    def bounding_slices(self, blocks: Sequence[int]) -> tuple[slice, ...]:
        """Slices of the bounding box of the blocks ``blocks`` (flat indices, at least one)."""
        per_block = [self.slices(int(b)) for b in blocks]
        return tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*per_block, strict=True))

    def to_voxels(self, block_values: np.ndarray) -> np.ndarray:
        """Broadcast per-block values ``grid.shape`` to a voxel map ``spatial_shape``."""
        out = np.asarray(block_values)
        for axis, b in enumerate(self.block_shape):
            out = np.repeat(out, b, axis=axis)
        return out[tuple(slice(0, n) for n in self.spatial_shape)]

    def any_per_block(self, mask: np.ndarray) -> np.ndarray:
        """Bool ``grid.shape``: which blocks contain at least one True voxel of ``mask``."""
        return self._reduce(mask.astype(bool), np.logical_or.reduce)

    def mean_per_block(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values.astype(np.float64), np.add.reduce) / self._reduce(
            np.ones(self.spatial_shape), np.add.reduce
        )

    def _reduce(self, array: np.ndarray, ufunc_reduce) -> np.ndarray:
        pads = [(0, g * b - n) for g, b, n in zip(self.shape, self.block_shape, self.spatial_shape, strict=True)]
        padded = np.pad(array, pads)
        split = []
        for g, b in zip(self.shape, self.block_shape, strict=True):
            split += [g, b]
        reshaped = padded.reshape(split)
        return ufunc_reduce(reshaped, axis=tuple(range(1, 2 * len(self.shape), 2)))

    def block_distances(self, region: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """Distance from each block's centre to the nearest region voxel, ``grid.shape`` (in ``spacing`` units).

        The centre of a block of even size lies between voxels (3.5 for voxels 0-7), so
        blocks on either side of a region at the same gap get the same distance. Blocks
        that touch the region get 0.
        """
        from scipy.ndimage import binary_erosion
        from scipy.spatial import cKDTree

        region = np.asarray(region, dtype=bool)
        spacing = np.ones(len(self.spatial_shape)) if spacing is None else np.array([float(s) for s in spacing])
        axes = []
        for g, b, n in zip(self.shape, self.block_shape, self.spatial_shape, strict=True):
            start = np.arange(g) * b
            axes.append((start + np.minimum(start + b, n) - 1) / 2.0)
        centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        dist = np.full(len(centres), np.inf)
        # For a centre of a block that does not touch the region, the nearest region voxel is
        # on the region's surface: a k-d tree over the surface voxels gives exact distances.
        surface = region & ~binary_erosion(region)
        if surface.any():
            dist, _ = cKDTree(np.argwhere(surface) * spacing).query(centres * spacing)
        dist = dist.reshape(self.shape)
        dist[self.any_per_block(region)] = 0.0
        return dist
