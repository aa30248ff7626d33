"""The model wrapper every part of napari-pdcr talks to.

A :class:`SegmentationModel` couples a network (any callable from a batch of images to
per-pixel scores, or to class scores for a model of kind ``"classifier"``) with what the engine must know and the file cannot say: spatial
dimensionality, input channels, output activation, the spatial divisibility the network
needs, intensity preprocessing and the model's identity (a hash) for provenance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_pdcr.models.devices import resolve_device
from napari_pdcr.models.sliding_window import SlidingWindow
from napari_pdcr.validation import value_range

if TYPE_CHECKING:
    from napari_pdcr.models.description import ModelDescription

Activation = Literal["none", "sigmoid", "softmax"]
#: model kinds: scores per voxel ``(N, K, *S)``, or per class ``(N, K)``
SEGMENTATION, CLASSIFIER = "segmentation", "classifier"
MODEL_KINDS = (SEGMENTATION, CLASSIFIER)
Preprocess = Literal["none", "minmax", "zscore"]


def hash_module(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values), hex digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def hash_file(path) -> str:
    """sha256 of a file's bytes, hex digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SegmentationModel:
    """A segmentation network (or a classifier) and what is needed to run and explain it.

    Parameters
    ----------
    network
        Callable mapping a float32 batch ``(N, C, *S)`` to raw scores ``(N, K, *S)``
        (logits, or probabilities when ``activation="none"``). ``len(S) == spatial_dims``.
        A classifier's network maps it to class scores ``(N, K)``.
    spatial_dims
        2 for images ``(C, H, W)``, 3 for volumes ``(C, D, H, W)``.
    in_channels
        Number of input channels ``C`` the network expects.
    activation
        How raw scores become probabilities: ``"sigmoid"`` (per channel), ``"softmax"``
        (over channels) or ``"none"`` (the network already outputs probabilities).
    divisible_by
        Spatial sizes the network needs to be multiples of (per axis, or one int);
        inputs are zero-padded at the high end and outputs cropped back.
    preprocess
        Intensity preprocessing applied by :meth:`prepare_image` to a raw image:
        ``"none"``, ``"minmax"`` (to [0, 1]), ``"zscore"``, or a callable on a
        ``(C, *S)`` float32 array.
    name
        Human-readable name, used in layer names and provenance.
    sha256
        Identity of the weights (file or state-dict hash). Computed from the network's
        state dict when it is an ``nn.Module`` and none is given.
    source
        Where the model came from (file path, demo name, ...), for provenance.
    sliding_window
        When set, the network is applied window-wise (MONAI ``sliding_window_inference``
        semantics) by :meth:`forward`; :meth:`forward_network` runs it on one batch as is.
    description
        The :class:`~napari_pdcr.models.description.ModelDescription` the model was
        loaded with (what was given and what was inferred; channel, temperature), if any.
    input_range
        ``(low, high)`` of the values the network takes (after preprocessing), e.g.
        ``(0, 1)``; by default the description's. :meth:`prepare_image` rejects images
        far outside it (beyond half its width), such as 0..255 for ``(0, 1)``.
    kind
        ``"segmentation"`` or ``"classifier"`` (class scores ``(N, K)``; no sliding window;
        padding to ``divisible_by`` is kept, there is no map to crop). ``None``: the
        description's kind, else ``"segmentation"``.
    """

    network: Callable[[torch.Tensor], torch.Tensor]
    spatial_dims: int
    in_channels: int
    activation: Activation = "sigmoid"
    divisible_by: int | tuple[int, ...] = 1
    preprocess: Preprocess | Callable[[np.ndarray], np.ndarray] = "none"
    name: str = "model"
    sha256: str | None = None
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sliding_window: SlidingWindow | None = None
    description: ModelDescription | None = None
    input_range: tuple[float, float] | None = None
    kind: str | None = None

    def __post_init__(self):
        described = getattr(self.description, "kind", None)
        if self.kind is None:
            self.kind = described or SEGMENTATION
        elif described is not None and described != self.kind:
            raise ValueError(f"kind={self.kind!r} contradicts the model's description (kind={described!r})")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind == CLASSIFIER and self.sliding_window is not None:
            raise ValueError("a classifier's scores (N, K) are global: it cannot be applied by sliding windows")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.activation not in ("none", "sigmoid", "softmax"):
            raise ValueError(f"activation must be none, sigmoid or softmax, got {self.activation!r}")
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
            if self.sha256 is None:
                self.sha256 = hash_module(self.network)
        self.device = torch.device(self.device)
        if self.input_range is None and self.description is not None:
            self.input_range = getattr(self.description, "input_range", None)
        if self.input_range is not None:
            self.input_range = value_range("input_range", self.input_range)

    # ------------------------------------------------------------------ identity
    @property
    def is_classifier(self) -> bool:
        """True for a classifier (scores ``(N, K)``)."""
        return self.kind == CLASSIFIER

    @property
    def is_module(self) -> bool:
        """True when the network is an ``nn.Module`` whose submodules can be hooked."""
        return isinstance(self.network, torch.nn.Module) and not isinstance(
            self.network, torch.jit.ScriptModule
        )

    def identity(self) -> dict:
        """Provenance record: name, source, hash and the settings that shape outputs."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": str(self.source),
            "sha256": self.sha256,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "activation": self.activation,
            "divisible_by": list(self._divisors()),
            "preprocess": self.preprocess if isinstance(self.preprocess, str) else repr(self.preprocess),
            "sliding_window": self.sliding_window.describe() if self.sliding_window else None,
        }

    # ------------------------------------------------------------------ devices
    def to(self, device) -> SegmentationModel:
        """Move the network to ``device`` (in place) and return self.

        ``device`` as for :func:`~napari_pdcr.models.devices.resolve_device` (``"auto"``
        too); an unavailable one raises ``RuntimeError`` saying why.
        """
        device = resolve_device(device)
        if hasattr(self.network, "to"):
            self.network.to(device)
        self.device = device
        return self

    # ------------------------------------------------------------------ inputs
    def check_image(self, image, what: str = "the image") -> None:
        """Raise ``ValueError`` unless ``image`` is ``(C, *S)`` with this model's C and dims.

        The message says what the array looks like: an image of another dimensionality,
        one without a channel axis, or one with other channels.
        """
        shape, dims, channels = tuple(image.shape), self.spatial_dims, self.in_channels
        if len(shape) == dims + 1 and shape[0] == channels:
            if 0 in shape:
                raise ValueError(f"{what} has shape {shape}: it holds no voxels")
            return
        # a leading axis longer than any channel count is a spatial axis
        has_channels = len(shape) > 2 and shape[0] <= max(4, channels)
        image_dims = len(shape) - has_channels
        expected = (
            f"model {self.name!r} expects a {dims}D image shaped (C, {', '.join('DHW'[-dims:])}) with C={channels}"
        )
        if image_dims != dims:
            other = f", or choose a {image_dims}D model" if image_dims in (2, 3) else ""
            raise ValueError(f"{expected}, but {what} is {image_dims}D (shape {shape}): give a {dims}D image{other}")
        if not has_channels:
            fix = "add one (image[None])" if channels == 1 else f"give its {channels} channels first"
            raise ValueError(f"{expected}, but {what} has no channel axis (shape {shape}): {fix}")
        raise ValueError(
            f"model {self.name!r} expects {channels} input channel(s); {what} has {shape[0]} (shape {shape}): "
            f"give it {channels} channel(s) first"
        )

    def prepare_image(self, image, what: str = "the image") -> torch.Tensor:
        """Validate a raw ``(C, *S)`` image and return it float32 in model input space.

        Raises ``ValueError`` for a wrong shape, non-finite values, or values far outside
        :attr:`input_range` after preprocessing. ``what`` names the image in messages.
        """
        array = np.asarray(image, dtype=np.float32)
        self.check_image(array, what)
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contains NaN or infinite values; clean it before explaining")
        if callable(self.preprocess):
            array = np.asarray(self.preprocess(array), dtype=np.float32)
        elif self.preprocess == "minmax":
            lo, hi = float(array.min()), float(array.max())
            array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
        elif self.preprocess == "zscore":
            std = float(array.std())
            array = (array - float(array.mean())) / (std if std > 0 else 1.0)
        elif self.preprocess != "none":
            raise ValueError(f"unknown preprocess {self.preprocess!r}")
        if self.input_range is not None:
            self._check_input_range(array, what)
        return torch.from_numpy(np.ascontiguousarray(array))

    def _check_input_range(self, array: np.ndarray, what: str) -> None:
        """Raise ``ValueError`` when ``array`` leaves :attr:`input_range` by more than half its width."""
        low, high = self.input_range
        slack = 0.5 * (high - low)
        vmin, vmax = float(array.min()), float(array.max())
        if low - slack <= vmin and vmax <= high + slack:
            return
        if self.preprocess != "none":
            after = " after the model's preprocessing"
            fix = "check the model's preprocess and input_range"
        else:
            after = ""
            fix = f"rescale it into [{low:g}, {high:g}]"
            if (low, high) == (0, 1) and vmin >= 0:
                eight_bit = vmax <= 255 and np.array_equal(array, np.round(array))
                fix = f"scale it (image / {255 if eight_bit else f'{vmax:g}'})"
        raise ValueError(
            f"{what}'s values run from {vmin:g} to {vmax:g}{after} but model {self.name!r} takes inputs in "
            f"[{low:g}, {high:g}]: {fix}"
        )

    # ------------------------------------------------------------------ forward
    def _divisors(self) -> tuple[int, ...]:
        d = self.divisible_by
        return (int(d),) * self.spatial_dims if isinstance(d, int) else tuple(int(v) for v in d)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw scores ``(N, K, *S)`` for a batch ``(N, C, *S)`` on this model's device.

        Window-wise when :attr:`sliding_window` is set, else :meth:`forward_network`.
        """
        if self.sliding_window is not None:
            return self.sliding_window.infer(self.forward_network, batch.to(self.device, non_blocking=True))
        return self.forward_network(batch)

    def forward_network(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw scores ``(N, K, *S)`` of the network on ``batch`` ``(N, C, *S)`` as it is (one window);
        a classifier's ``(N, K)``.

        Pads each spatial axis up to a multiple of ``divisible_by`` and crops back.
        Raises ``ValueError`` when the network's output is not ``(N, K, *S)`` of its input's size
        (a classifier's: not ``(N, K)``).
        """
        spatial = batch.shape[2:]
        pads = [(-s) % d for s, d in zip(spatial, self._divisors(), strict=True)]
        x = batch.to(self.device, non_blocking=True)
        if any(pads):
            # F.pad takes (last axis low, high, ..., first axis low, high)
            x = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)])
        out = self.network(x)
        if isinstance(out, (tuple, list)):  # deep supervision / auxiliary heads: first is the map
            out = out[0]
        if self.is_classifier:
            if out.ndim != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(
                    f"classifier {self.name!r} returned scores of shape {tuple(out.shape)} for an input of shape "
                    f"{tuple(x.shape)}: a classifier must return (N, K) class scores (else describe it as "
                    "kind='segmentation')"
                )
            return out
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model {self.name!r} returned scores of shape {tuple(out.shape)} for an input of shape "
                f"{tuple(x.shape)}: a segmentation model must return (N, K, *S) with the input's spatial size"
            )
        if any(pads):
            out = out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return out

    __call__ = forward
