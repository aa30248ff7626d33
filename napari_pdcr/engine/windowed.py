"""Input blocks of a model applied by sliding windows: only the windows that matter run.

With sliding-window inference (MONAI semantics, see
:mod:`napari_pdcr.models.sliding_window`) the scores at a voxel are the weighted mean
of the outputs of the windows that contain it, and each window's output depends only on
the input inside that window. So for an intervention at block ``b``, the scores in the
target region ``R`` are the blend of

- the windows that overlap ``R`` and contain part of ``b``: run on the intervened input;
- the windows that overlap ``R`` but not ``b``: unchanged, taken from a cached
  unperturbed pass;

and no other window can change them. This is exact (the same numbers as full
inference, up to floating-point summation in the same order), and a block that lies in
no window overlapping ``R`` provably has an effect of exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_pdcr.engine.blocks import InputBlocks
from napari_pdcr.engine.estimator import is_out_of_memory
from napari_pdcr.engine.scoring import check_finite
from napari_pdcr.interventions.base import Intervention
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome
from napari_pdcr.regions import BlockGrid


class WindowedInputBlocks(InputBlocks):
    """The blocks of ``image`` as intervention nodes of a sliding-window model.

    Same parameters as :class:`~napari_pdcr.engine.blocks.InputBlocks` (without
    ``window``); ``model.sliding_window`` must be set. One item of a batch (a block with
    one replacement) costs as many window passes as there are windows overlapping the
    region that contain the block (``windows_of_block``), usually 1 to ``2 ** d``;
    :attr:`window_evaluations` counts them. All windows of one batch of items go
    through the network together (the estimator's batch size, chosen from
    :attr:`item_bytes`, bounds them); the cached unperturbed pass runs the sliding
    window's ``batch_size`` windows at a time. On out-of-memory the number of windows
    per forward pass (``window_batch_size``) is halved; :attr:`log` records each back-off.
    """

    def __init__(self, model: SegmentationModel, image: torch.Tensor, grid: BlockGrid, target_region: np.ndarray,
                 outcome: Outcome | Sequence[Outcome], intervention: Intervention, reference: np.ndarray | None = None,
                 precision: str = "float32", member_regions: Sequence[np.ndarray] | None = None):
        if model.sliding_window is None:
            raise ValueError(f"model {model.name!r} has no sliding_window: use InputBlocks")
        # The "window" of InputBlocks is the whole image, so the inherited helpers
        # (local_slices, region_reference) stay valid; the unperturbed pass runs only the
        # windows over the region (_unperturbed_region_scores).
        self.window_evaluations = 0
        self.window_batch_size: int | None = None  # no limit until an out-of-memory error
        self.log: list[str] = []
        super().__init__(model, image, grid, target_region, outcome, intervention, reference, None, precision, member_regions)
        most = max(len(w) for w in self._block_windows)
        self.item_bytes = max(1, most) * image.shape[0] * int(np.prod(self.layout.roi_size)) * image.element_size()

    def _unperturbed_region_scores(self, target_region: np.ndarray) -> torch.Tensor:
        """Index the windows over the region, run them once (cached per window), blend."""
        self.layout = layout = self.model.sliding_window.layout(self.grid.spatial_shape)
        # zero padding up to the window size where the image is smaller, as MONAI pads
        # (F.pad takes (last axis low, high, ..., first axis low, high))
        pad = []
        for low, roi, size in reversed(list(zip(layout.pad_low, layout.roi_size, layout.image_shape, strict=True))):
            pad += [low, max(roi - size, 0) - low]
        self.padded = F.pad(self.image, pad) if any(pad) else self.image
        self._index_region_windows(target_region)
        self._block_windows = self._region_windows_per_block()
        crops = [self.padded[(slice(None), *layout.slices(w))] for w in self.region_windows]
        self._base_window_scores = self._run_windows(crops, list(range(len(crops))), self.model.sliding_window.batch_size)
        #: unperturbed sliding-window scores in the region, (1, K, M)
        self.base_region_scores = self._blend([{}])
        return self.base_region_scores

    def _index_region_windows(self, target_region: np.ndarray) -> None:
        """Find the windows over the region and, for each, its region voxels: their flat
        index in the window's output, their position in the region's flat order and their
        blending weight; and the summed weight per region voxel."""
        layout, device = self.layout, self.model.device
        n_region = len(self.region_index)
        position = np.full(layout.padded_shape, -1, dtype=np.int32)  # region order, padded grid
        inside = tuple(slice(p, p + n) for p, n in zip(layout.pad_low, layout.image_shape, strict=True))
        position[inside][target_region] = np.arange(n_region, dtype=np.int32)
        importance = self.model.sliding_window.importance_map(layout.image_shape).reshape(-1)
        #: indices (into the layout) of the windows that overlap the target region, in MONAI's order
        self.region_windows: list[int] = []
        self._local_index, self._region_position, self._weights = [], [], []
        for w in range(layout.n_windows):
            in_window = position[layout.slices(w)].reshape(-1)
            local = np.flatnonzero(in_window >= 0)
            if len(local):
                self.region_windows.append(w)
                self._local_index.append(torch.from_numpy(local).to(device))
                self._region_position.append(torch.from_numpy(in_window[local].astype(np.int64)).to(device))
                self._weights.append(importance[torch.from_numpy(local)].to(device))
        self._count = torch.zeros(n_region, device=device)
        for where, weights in zip(self._region_position, self._weights, strict=True):
            self._count[where] += weights

    def _region_windows_per_block(self) -> list[np.ndarray]:
        """For each block, the indices (into ``region_windows``) of the windows it overlaps."""
        grid = self.grid
        window_lo, window_hi = self.layout.bounds_in_image()
        window_lo, window_hi = window_lo[self.region_windows], window_hi[self.region_windows]
        coords = np.stack(np.unravel_index(np.arange(grid.n_blocks), grid.shape), axis=1)
        block_lo = coords * np.array(grid.block_shape)
        block_hi = np.minimum(block_lo + np.array(grid.block_shape), np.array(grid.spatial_shape))
        touches = ((block_lo[:, None] < window_hi[None]) & (window_lo[None] < block_hi[:, None])).all(axis=2)
        return [np.flatnonzero(row) for row in touches]

    # ------------------------------------------------------------------ geometry
    def windows_of_block(self, node: int) -> list[int]:
        """Layout indices of the region windows that contain part of block ``node``."""
        return [self.region_windows[k] for k in self._block_windows[node]]

    def reachable_blocks(self, member: int | None = None) -> np.ndarray:
        """Bool ``grid.shape``: blocks inside at least one window that overlaps the region
        (``member``: the region of outcome ``member`` of ``member_regions``).

        ``False`` is a proof that the block cannot change the region's scores.
        """
        if member is None:
            return np.array([len(w) > 0 for w in self._block_windows]).reshape(self.grid.shape)
        in_member = np.zeros(len(self.region_index), bool)
        in_member[self.scoring.positions[member].numpy()] = True
        overlaps = np.array([in_member[position.cpu().numpy()].any() for position in self._region_position])
        return np.array([overlaps[w].any() for w in self._block_windows]).reshape(self.grid.shape)

    def summary(self) -> dict:
        """Window counts for provenance: per full pass, over the region, evaluated so far."""
        return {
            "windows_per_pass": self.layout.n_windows,
            "windows_over_region": len(self.region_windows),
            "window_evaluations": self.window_evaluations,
        }

    # ------------------------------------------------------------------ scores
    def _run_windows(
        self, crops: list[torch.Tensor], region_windows: list[int], at_most: int | None = None
    ) -> list[torch.Tensor]:
        """:meth:`_window_region_scores` of crops ``(C, *roi)``, at most ``at_most`` and
        ``window_batch_size`` at a time.

        Halves ``window_batch_size`` on out-of-memory and retries (results do not depend
        on it); at one window the error goes up to the estimator's batch back-off.
        """
        out, start = [], 0
        while start < len(crops):
            limit = min(at_most or len(crops), self.window_batch_size or len(crops))
            stop = min(start + limit, len(crops))
            try:
                out += self._window_region_scores(torch.stack(crops[start:stop]), region_windows[start:stop])
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM
                if not is_out_of_memory(error) or self.window_batch_size == 1:
                    raise
                self.window_batch_size = max(1, (stop - start) // 2)
                self.log.append(f"out of memory: sliding-window batch reduced to {self.window_batch_size} windows")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop
        return out

    def _window_region_scores(self, crops: torch.Tensor, region_windows: Sequence[int]) -> list[torch.Tensor]:
        """Scores ``(K, m_w)`` float32 at the region voxels of each window, for crops ``(n, C, *roi)``."""
        with torch.inference_mode(), self.scoring.autocast():
            scores = self.model.forward_network(crops.to(self.model.device))
        if tuple(scores.shape[2:]) != self.layout.roi_size:
            raise ValueError(
                f"model {self.model.name!r} returns outputs of spatial size {tuple(scores.shape[2:])} "
                f"for windows of {self.layout.roi_size}: sliding windows need outputs of the input's size"
            )
        self.window_evaluations += len(crops)
        flat = check_finite(self.model, scores).flatten(2).float()
        return [flat[i][:, self._local_index[k]] for i, k in enumerate(region_windows)]

    def _blend(self, changed: list[dict[int, torch.Tensor]]) -> torch.Tensor:
        """Region scores ``(N, K, M)``: item ``i`` uses ``changed[i][k]`` for region window ``k``
        and the cached unperturbed scores elsewhere; blended as MONAI does (sum of weighted
        outputs in window order, divided by the summed weights)."""
        n_channels = self._base_window_scores[0].shape[0]
        total = torch.zeros(len(changed), n_channels, len(self.region_index), device=self.model.device)
        for k, (position, weights) in enumerate(zip(self._region_position, self._weights, strict=True)):
            contribution = self._base_window_scores[k].expand(len(changed), -1, -1).clone()
            for i, item in enumerate(changed):
                if k in item:
                    contribution[i] = item[k]
            total[:, :, position] += contribution * weights
        return total / self._count

    def grouped_outcomes(
        self, node_groups: Sequence[Sequence[int]], replacement_groups: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Outcomes ``(B,)``: item ``i`` has every block of ``node_groups[i]`` replaced at once."""
        return self.scoring(self.intervened_region_scores(node_groups, replacement_groups))

    def intervened_region_scores(
        self, node_groups: Sequence[Sequence[int]], replacement_groups: Sequence[Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        """Sliding-window scores in the region ``(B, K, M)`` with each block of
        ``node_groups[i]`` set to its replacement ``(C, *b)`` in ``replacement_groups[i]``;
        only the region's windows that contain one of the blocks are run."""
        layout = self.layout
        crops, owners = [], []
        for i, (group, replacements) in enumerate(zip(node_groups, replacement_groups, strict=True)):
            blocks = [
                [slice(s.start + p, s.stop + p) for s, p in zip(self.grid.slices(int(node)), layout.pad_low, strict=True)]
                for node in group
            ]
            for k in sorted({int(k) for node in group for k in self._block_windows[int(node)]}):
                window = layout.slices(self.region_windows[k])
                crop = self.padded[(slice(None), *window)].clone()
                for block, replacement in zip(blocks, replacements, strict=True):
                    lo = [max(b.start, w.start) for b, w in zip(block, window, strict=True)]
                    hi = [min(b.stop, w.stop) for b, w in zip(block, window, strict=True)]
                    if any(a >= z for a, z in zip(lo, hi, strict=True)):
                        continue  # this block of the group lies outside this window
                    into_crop = tuple(slice(a - w.start, z - w.start) for a, z, w in zip(lo, hi, window, strict=True))
                    from_block = tuple(slice(a - b.start, z - b.start) for a, z, b in zip(lo, hi, block, strict=True))
                    crop[(slice(None), *into_crop)] = replacement[(slice(None), *from_block)].to(crop.device)
                crops.append(crop)
                owners.append((i, k))
        changed: list[dict[int, torch.Tensor]] = [{} for _ in node_groups]
        if crops:
            scores = self._run_windows(crops, [k for _, k in owners])
            for (i, k), window_scores in zip(owners, scores, strict=True):
                changed[i][k] = window_scores
        return self._blend(changed)
