"""Exact accelerations: which blocks can reach the target region, and the smallest window.

A block whose content cannot change the model's output in the target region has an
effect of exactly zero, whatever the intervention. We find such blocks by **NaN
propagation**: fill a group of blocks with NaN and run the model; if no score in the
target region becomes NaN, no block of the group is read when computing the region
(NaN survives every arithmetic operation a segmentation network uses: convolution,
normalisation in eval mode, pooling, interpolation, attention). Groups are tested
coarse to fine (group testing), so the cost is a few hundred forward passes, not one per
block. A model that mixes the whole image (instance normalisation, global attention)
simply shows that every block reaches, and nothing is skipped.

The reachable blocks then bound a **window** (aligned to the network's divisibility, so
pooling grids line up) on which the model is run instead of the whole image. Because
the window is only a speed-up if it is exact, it is verified against the full image on
the unperturbed input and on intervened inputs; if the region's scores differ, the full
image is used.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np
import torch

from napari_pdcr.engine.estimator import halved_batch_size
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.regions import BlockGrid


def reachable_blocks(*args, **kwargs) -> tuple[np.ndarray, int]:
    """:func:`iter_reachable_blocks` run to completion: ``(mask, forward passes)``."""
    probe = iter_reachable_blocks(*args, **kwargs)
    while True:
        try:
            next(probe)
        except StopIteration as stop:
            return stop.value


def iter_reachable_blocks(
    model: SegmentationModel,
    image: torch.Tensor,
    grid: BlockGrid,
    target_region: np.ndarray,
    candidates: np.ndarray,
    group_levels: tuple[int, ...] = (4, 2),
    batch_size: int = 8,
) -> Generator[tuple[int, int, int], None, tuple[np.ndarray, int]]:
    """Bool ``grid.shape``: candidate blocks that may change the region's scores.

    ``False`` is a proof (by NaN propagation) that the block cannot; ``True`` may be
    conservative (groups at the finest level of ``group_levels`` are not split
    further). A generator: yields ``(groups done, groups at this level, forward passes)``
    after every batch (so a run can report progress and be cancelled here) and returns
    the mask and the number of forward passes used.
    """
    reach, passes = yield from iter_reachable_blocks_of_regions(
        model, image, grid, [target_region], [candidates], group_levels, batch_size
    )
    return reach[0], passes


def iter_reachable_blocks_of_regions(
    model: SegmentationModel,
    image: torch.Tensor,
    grid: BlockGrid,
    target_regions: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    group_levels: tuple[int, ...] = (4, 2),
    batch_size: int = 8,
    stop_when_all_reach: bool = False,
    forward=None,
) -> Generator[tuple[int, int, int], None, tuple[list[np.ndarray], int]]:
    """:func:`iter_reachable_blocks` for several regions (bool ``S`` each, with their own
    candidate blocks, bool ``grid.shape``) on the same forward passes.

    Region ``j``'s groups are exactly those of a run for region ``j`` alone, so its mask
    is the same; a group that several regions test (most groups, away from the regions)
    is run once and read in every region. Returns one mask per region and the passes.

    ``stop_when_all_reach``: after a level at which every group of every region reaches,
    do not test finer levels (the mask stays a conservative bound: it is still exact to
    use). For a model that reads the whole image (deepbet) that saves the finer levels'
    passes, which could not skip a block; a caller that screens the same groups itself
    (the coarse screen for a deterministic intervention) loses nothing by it.

    ``forward(batch, changed)``: how the probes run (default: the model on the whole
    batch); ``changed[i]`` are the slices of the bounding box of probe ``i``'s NaN blocks,
    so incremental inference (:meth:`~napari_pdcr.engine.incremental.IncrementalForward.forward`,
    exact inside the region's box) can run them, with the same NaN propagation.
    """
    if forward is None:
        def forward(batch, changed):
            return model(batch)
    union = np.logical_or.reduce([np.asarray(r, bool) for r in target_regions])
    region_index = torch.from_numpy(np.flatnonzero(union))
    positions = [torch.from_numpy(np.flatnonzero(np.asarray(r, bool)[union])) for r in target_regions]
    coords = np.stack(np.unravel_index(np.arange(grid.n_blocks), grid.shape), axis=1)
    reach = [np.asarray(c, bool).ravel().copy() for c in candidates]
    open_groups = [[np.flatnonzero(r)] for r in reach]  # per region one group: everything; refined level by level
    passes = 0
    for level in group_levels:
        groups_of_region, distinct = [], {}  # distinct: members -> index of the group's probe
        for region_open in open_groups:
            groups = []
            for members in region_open:
                if len(members) == 0:
                    continue
                keys = coords[members] // level
                _, inverse = np.unique(keys, axis=0, return_inverse=True)
                groups += [members[inverse.ravel() == g] for g in range(inverse.max() + 1)]
            groups_of_region.append(groups)
            for members in groups:
                distinct.setdefault(members.tobytes(), members)
        probes = list(distinct.values())
        hits, start = [], 0
        while start < len(probes):
            chunk = probes[start : start + batch_size]
            batch = image.expand(len(chunk), *image.shape).clone()
            for i, members in enumerate(chunk):
                for b in members:
                    batch[(i, slice(None), *grid.slices(int(b)))] = float("nan")
            try:
                with torch.inference_mode():
                    scores = forward(batch, [grid.bounding_slices(members) for members in chunk])
                    scores = scores.flatten(2)[:, :, region_index.to(scores.device)]
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an out-of-memory
                batch_size = halved_batch_size(error, batch_size)  # back off, as BatchRunner does
                continue
            passes += len(chunk)
            nan = torch.isnan(scores).any(dim=1).cpu()  # (n, M)
            hits += [[bool(row[p].any()) for p in positions] for row in nan]
            start += len(chunk)
            yield start, len(probes), passes
        hit_of = {key: row for key, row in zip(distinct, hits, strict=True)}
        every_group_reaches = all(hit_of[m.tobytes()][j] for j, groups in enumerate(groups_of_region) for m in groups)
        for j, groups in enumerate(groups_of_region):
            region_hits = [hit_of[members.tobytes()][j] for members in groups]
            for members, hit in zip(groups, region_hits, strict=True):
                if not hit:
                    reach[j][members] = False
            open_groups[j] = [m for m, h in zip(groups, region_hits, strict=True) if h]
        if stop_when_all_reach and every_group_reaches:
            break
    return [r.reshape(grid.shape) for r in reach], passes


def verify_unreachable(
    model: SegmentationModel,
    image: torch.Tensor,
    grid: BlockGrid,
    target_region: np.ndarray,
    reach: np.ndarray,
    candidates: np.ndarray,
    seed: int = 0,
    rtol: float = 1e-4,
) -> tuple[bool, int]:
    """Check the NaN-propagation proof with ordinary values.

    Fills every candidate block that :func:`reachable_blocks` marked unreachable with
    random values (in the image's range) at once; the target region's scores must not
    change. A model that removes NaN (``nan_to_num``, masking by a comparison, ...)
    defeats NaN propagation, and this catches it. Returns ``(ok, forward passes)``.
    """
    skipped = np.flatnonzero((candidates & ~reach).ravel())
    if len(skipped) == 0:
        return True, 0
    rng = np.random.default_rng([seed, 98])
    lo, hi = float(image.min()), float(image.max())
    hi = hi if hi > lo else lo + 1.0
    probe = image.clone()
    for b in skipped:
        where = (slice(None), *grid.slices(int(b)))
        values = rng.uniform(lo, hi, size=tuple(probe[where].shape)).astype(np.float32)
        probe[where] = torch.from_numpy(values).to(image.device)
    index = torch.from_numpy(np.flatnonzero(target_region)).to(model.device)
    with torch.inference_mode():
        base = model(image[None]).flatten(2)[:, :, index]
        changed = model(probe[None]).flatten(2)[:, :, index]
    scale = float(base.abs().max().clamp_min(1.0))
    return bool(((base - changed).abs().max() <= rtol * scale).item()), 2


def aligned_window(
    grid: BlockGrid, blocks: np.ndarray, divisors: tuple[int, ...]
) -> tuple[slice, ...]:
    """Smallest window covering ``blocks`` (bool grid) whose start is a multiple of ``divisors``
    and whose size is a multiple of them, or that ends at the image border."""
    idx = np.argwhere(blocks)
    window = []
    for axis, (b, n, d) in enumerate(zip(grid.block_shape, grid.spatial_shape, divisors, strict=True)):
        lo = int(idx[:, axis].min()) * b
        hi = min(int(idx[:, axis].max() + 1) * b, n)
        lo = (lo // d) * d
        hi = min(lo + -(-(hi - lo) // d) * d, n)
        window.append(slice(lo, hi))
    return tuple(window)


def window_is_exact(
    model: SegmentationModel,
    image: torch.Tensor,
    window: tuple[slice, ...],
    target_region: np.ndarray,
    probes: list[torch.Tensor],
    rtol: float = 1e-4,
) -> bool:
    """True when the region's scores on ``window`` match those on the whole image.

    ``probes`` are intervened images ``(C, *S)`` to check besides the unperturbed one.
    """
    full_index = torch.from_numpy(np.flatnonzero(target_region))
    crop_index = torch.from_numpy(np.flatnonzero(target_region[window]))
    for probe in [image, *probes]:  # one image at a time: the batch size that always fits
        with torch.inference_mode():
            full = model(probe[None]).flatten(2)[:, :, full_index.to(model.device)]
            crop = model(probe[(None, slice(None), *window)].contiguous()).flatten(2)
            crop = crop[:, :, crop_index.to(model.device)]
        scale = float(full.abs().max().clamp_min(1.0))
        if not bool(((full - crop).abs().max() <= rtol * scale).item()):
            return False
    return True
