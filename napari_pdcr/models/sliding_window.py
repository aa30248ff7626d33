"""Sliding-window application of a model (MONAI ``sliding_window_inference`` semantics).

A :class:`SlidingWindow` says that a model is applied window by window: the image is
zero-padded up to the window size where it is smaller, cut into windows of
``roi_size`` that overlap by ``overlap``, each window is run through the network, and
the window outputs are blended with an importance map (constant or Gaussian) and
divided by the summed weights. Full inference is delegated to MONAI; the window
geometry is exposed (:meth:`SlidingWindow.layout`) so the effect engine can run only
the windows that matter (:mod:`napari_pdcr.engine.windowed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.utils import fall_back_tuple

BlendMode = Literal["constant", "gaussian"]


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of a sliding-window pass lie for one image size.

    ``starts`` ``(n_windows, d)`` are window origins in *padded* coordinates, in
    MONAI's order; ``image_shape`` is the unpadded size, ``pad_low`` the zero padding
    added before each axis (the image origin in padded coordinates) and
    ``padded_shape`` the padded spatial size.
    """

    image_shape: tuple[int, ...]
    roi_size: tuple[int, ...]
    pad_low: tuple[int, ...]
    padded_shape: tuple[int, ...]
    starts: np.ndarray

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def slices(self, index: int) -> tuple[slice, ...]:
        """Spatial slices of window ``index`` in padded coordinates."""
        return tuple(slice(int(s), int(s) + r) for s, r in zip(self.starts[index], self.roi_size, strict=True))

    def bounds_in_image(self) -> tuple[np.ndarray, np.ndarray]:
        """Window bounds ``(lo, hi)``, each ``(n_windows, d)``, in image coordinates, clipped to the image."""
        pad_low, shape = np.array(self.pad_low), np.array(self.image_shape)
        lo = np.clip(self.starts - pad_low, 0, shape)
        hi = np.clip(self.starts + np.array(self.roi_size) - pad_low, 0, shape)
        return lo, hi


@dataclass(frozen=True)
class SlidingWindow:
    """How a model is applied window-wise, as MONAI's ``sliding_window_inference``.

    Parameters
    ----------
    roi_size
        Window size per spatial axis (one int for all); a non-positive entry means the
        whole axis, as in MONAI.
    overlap
        Fraction of overlap between neighbouring windows, in [0, 1) (one for all axes, or
        one per axis).
    mode
        Blending of overlapping windows: ``"constant"`` (equal weights) or
        ``"gaussian"`` (less weight near window edges; width ``sigma_scale * roi``).
    batch_size
        Windows per forward pass in full inference (MONAI's ``sw_batch_size``); does
        not change results.
    """

    roi_size: int | tuple[int, ...]
    overlap: float | tuple[float, ...] = 0.25
    mode: BlendMode = "constant"
    sigma_scale: float | tuple[float, ...] = 0.125
    batch_size: int = 4

    def __post_init__(self):
        for name in ("roi_size", "overlap", "sigma_scale"):  # lists from JSON -> hashable tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not all(0 <= o < 1 for o in np.atleast_1d(self.overlap)):
            raise ValueError(f"sliding-window overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("constant", "gaussian"):
            raise ValueError(f"sliding-window mode must be 'constant' or 'gaussian', got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError("sliding-window batch_size must be >= 1")

    def describe(self) -> dict:
        """JSON-serialisable settings, for provenance."""
        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {
            "roi_size": plain(self.roi_size),
            "overlap": plain(self.overlap),
            "mode": self.mode,
            "sigma_scale": plain(self.sigma_scale),
        }

    def window_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The window size for an image of ``spatial_shape`` (non-positive entries filled in)."""
        roi = (self.roi_size,) * len(spatial_shape) if isinstance(self.roi_size, int) else tuple(self.roi_size)
        if len(roi) != len(spatial_shape):
            raise ValueError(f"sliding-window roi_size {roi} does not match a {len(spatial_shape)}D image")
        return tuple(int(r) for r in fall_back_tuple(roi, tuple(spatial_shape)))

    def layout(self, spatial_shape: Sequence[int]) -> WindowLayout:
        """The windows MONAI uses for an image of ``spatial_shape``.

        Re-derived here (MONAI computes them inside ``sliding_window_inference``) with
        MONAI's own rules: symmetric zero padding up to the window, scan interval
        ``int(roi * (1 - overlap))`` (at least 1; the whole axis when roi equals it),
        and ``dense_patch_slices`` for the origins. A test checks the result against
        ``sliding_window_inference`` itself.
        """
        roi = self.window_size(spatial_shape)
        pad_low = tuple(max(r - n, 0) // 2 for r, n in zip(roi, spatial_shape, strict=True))
        padded = tuple(max(n, r) for n, r in zip(spatial_shape, roi, strict=True))
        overlap = np.broadcast_to(np.asarray(self.overlap, dtype=float), (len(roi),))
        interval = tuple(
            r if r == n else max(int(r * (1 - o)), 1) for r, n, o in zip(roi, padded, overlap, strict=True)
        )
        starts = np.array([[s.start for s in w] for w in dense_patch_slices(padded, roi, interval)], dtype=np.int64)
        return WindowLayout(tuple(int(n) for n in spatial_shape), roi, pad_low, padded, starts)

    def importance_map(self, spatial_shape: Sequence[int], device="cpu") -> torch.Tensor:
        """Blending weights of one window, float32 ``roi`` (MONAI's ``compute_importance_map``)."""
        return compute_importance_map(
            self.window_size(spatial_shape), mode=self.mode, sigma_scale=self.sigma_scale, device=device
        ).float()

    def infer(self, network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """Scores ``(N, K, *S)`` of ``network`` applied window-wise to ``batch`` ``(N, C, *S)``."""
        return sliding_window_inference(
            batch,
            roi_size=self.window_size(batch.shape[2:]),
            sw_batch_size=self.batch_size,
            predictor=network,
            overlap=self.overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
        )
