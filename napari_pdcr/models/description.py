"""What a model file cannot say about itself, and what can be inferred from a test pass.

A :class:`ModelDescription` holds the settings a model needs to be run and explained:
its kind (a segmentation model's scores are ``(N, K, *S)``, a classifier's ``(N, K)``),
spatial dimensionality, input channels, intensity preprocessing, output activation, the
channel (class) to explain, spatial divisibility, temperature and sliding-window inference. It is given as fields, as a dict, or as a small JSON file
next to the model (``<model stem>.pdcr.json``, or ``pdcr.json`` inside a MONAI bundle)::

    {"kind": "segmentation", "spatial_dims": 3, "in_channels": 1, "preprocess": "zscore",
     "activation": "softmax", "channel": 1, "divisible_by": 16,
     "sliding_window": {"roi_size": [96, 96, 96], "overlap": 0.25, "mode": "gaussian"}}

Fields left out are inferred by :func:`complete_description` where that is unambiguous
(a forward pass on random inputs finds the kind and the output channels, and the
dimensionality and input channels among a few candidates), and every inferred value is recorded in
``inferred`` so the user can see what was assumed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from napari_pdcr.models.base import CLASSIFIER, MODEL_KINDS, SEGMENTATION
from napari_pdcr.models.sliding_window import SlidingWindow
from napari_pdcr.outcomes import Outcome
from napari_pdcr.validation import value_range

PREPROCESS_NAMES = ("none", "minmax", "zscore", "bundle")
ACTIVATIONS = ("none", "sigmoid", "softmax")
DESCRIPTION_SUFFIX = ".pdcr.json"
BUNDLE_DESCRIPTION = "pdcr.json"
NO_CLASSIFIER_WINDOWS = (
    "a classifier's scores (N, K) are global, so it cannot be applied by sliding windows: "
    "remove sliding_window from its description (or describe it as kind='segmentation')"
)
#: spatial size of test inputs (a multiple of 32, as networks with five stride-2 levels need)
PROBE_SIZE = 32
#: sizes tried, smallest first, when the image's shape and a window size are not known
#: (transformers need several patches per axis; Swin nets 2 positions at 1/32 res)
SEARCH_SIZES = (32, 64, 96, 128)


@dataclass
class ModelDescription:
    """Settings of a model; ``None`` means "not given" (to be inferred).

    Parameters
    ----------
    kind
        ``"segmentation"`` (scores ``(N, K, *S)``, one per voxel) or ``"classifier"``
        (scores ``(N, K)``, one per class); inferred from a test pass (given: checked).
    spatial_dims
        2 or 3.
    in_channels
        Input channels the network expects.
    out_channels
        Output channels; inferred from a test pass (given: checked).
    preprocess
        ``"none"``, ``"minmax"`` (to [0, 1]), ``"zscore"``, ``"bundle"`` (the intensity
        transforms of a MONAI bundle's ``preprocessing``), or a callable on ``(C, *S)``.
    activation
        ``"sigmoid"``, ``"softmax"`` or ``"none"`` (outputs are probabilities).
    channel
        Output channel (class) to explain; ``None``: the outcome's default (for a
        classifier with more than two classes: the predicted class).
    divisible_by
        Spatial multiple the network needs (one int or one per axis).
    input_range
        ``(low, high)`` of the values the network takes after preprocessing (e.g.
        ``[0, 1]``); images far outside it are rejected. ``None``: not checked.
    temperature
        Temperature of probabilities in soft outcomes (> 0): given, or fitted on labelled
        pixels by :func:`napari_pdcr.calibration.calibrate`.
    sliding_window
        Apply the model window-wise (segmentation models only) (:class:`~napari_pdcr.models.sliding_window.SlidingWindow`,
        or a dict of its fields).
    name
        Display name.
    example_shape
        Spatial size the model ran on in its test pass (found by
        :func:`complete_description`; used to trace it, e.g. for its skip connections).
    calibration
        The record of the temperature fit (:meth:`napari_pdcr.calibration.TemperatureFit.summary`:
        pixels used, NLL / ECE / Brier before and after); ``None``: the temperature was not fitted.
    inferred
        Human-readable notes on every value that was inferred rather than given.
    """

    kind: str | None = None
    spatial_dims: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    preprocess: str | Callable | None = None
    activation: str | None = None
    channel: int | None = None
    divisible_by: int | tuple[int, ...] | None = None
    input_range: tuple[float, float] | None = None
    temperature: float = 1.0
    sliding_window: SlidingWindow | None = None
    name: str | None = None
    example_shape: tuple[int, ...] | None = None
    calibration: dict | None = None
    inferred: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.example_shape, list):
            self.example_shape = tuple(self.example_shape)
        if isinstance(self.sliding_window, dict):
            self.sliding_window = _sliding_window_from_dict(self.sliding_window)
        if isinstance(self.divisible_by, list):
            self.divisible_by = tuple(self.divisible_by)
        if self.kind is not None and self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind == CLASSIFIER and self.sliding_window is not None:
            raise ValueError(NO_CLASSIFIER_WINDOWS)
        if self.spatial_dims is not None and self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.preprocess, str) and self.preprocess not in PREPROCESS_NAMES:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_NAMES)} or a callable, got {self.preprocess!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.channel is not None and (not isinstance(self.channel, int) or self.channel < 0):
            raise ValueError(f"channel must be a non-negative integer, got {self.channel!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.input_range is not None:
            self.input_range = value_range("input_range", self.input_range)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict) -> ModelDescription:
        """A description from a dict of field values; unknown keys are an error (typos)."""
        known = {f.name for f in fields(cls)} - {"inferred"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model description field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> ModelDescription:
        """Read a JSON description file (see the module docstring)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model description file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"model description {path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"model description {path} must hold a JSON object of fields")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model description {path}: {error}") from None

    @classmethod
    def coerce(cls, value) -> ModelDescription:
        """A description from ``None``, a description, a dict or a path to a JSON file."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return replace(value, inferred=list(value.inferred))
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, Path)):
            return cls.from_file(value)
        raise TypeError(f"a model description must be a ModelDescription, dict or JSON path, got {type(value).__name__}")

    def given(self) -> dict:
        """The fields that were set (not ``None``, temperature when not 1)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "inferred"}
        return {k: v for k, v in out.items() if v is not None and not (k == "temperature" and v == 1.0)}

    def updated(self, other: ModelDescription) -> ModelDescription:
        """This description with every field given in ``other`` taking precedence."""
        merged = replace(self, **other.given())
        merged.inferred = [*self.inferred, *other.inferred]
        return merged

    def to_dict(self) -> dict:
        """JSON-serialisable fields (a callable preprocess is written as its repr)."""
        out = asdict(replace(self, sliding_window=None, preprocess=None))
        out["preprocess"] = self.preprocess if self.preprocess is None or isinstance(self.preprocess, str) else repr(self.preprocess)
        out["sliding_window"] = self.sliding_window.describe() if self.sliding_window else None
        if isinstance(self.divisible_by, tuple):
            out["divisible_by"] = list(self.divisible_by)
        return out

    def calibrated(self, temperature: float, calibration: dict) -> ModelDescription:
        """This description with a fitted ``temperature`` and the record of its fit."""
        note = (
            f"temperature={temperature:.4g} (fitted on {calibration['n_pixels']} labelled pixels: NLL "
            f"{calibration['before']['nll']:.4f} -> {calibration['after']['nll']:.4f})"
        )
        return replace(self, temperature=temperature, calibration=calibration, inferred=[*self.inferred, note])

    def outcome(self, kind: str = "dice", **options) -> Outcome:
        """An :class:`~napari_pdcr.outcomes.Outcome` of ``kind`` for this model's channel and temperature."""
        return Outcome(kind, channel=self.channel, temperature=self.temperature, **options)


def description_path_for(model_path) -> Path | None:
    """The description file of a model file or bundle, if there is one.

    ``brain.pt`` -> ``brain.pdcr.json`` beside it; a bundle folder -> ``pdcr.json`` inside.
    """
    model_path = Path(model_path)
    candidate = model_path / BUNDLE_DESCRIPTION if model_path.is_dir() else model_path.with_name(model_path.stem + DESCRIPTION_SUFFIX)
    return candidate if candidate.is_file() else None


def _sliding_window_from_dict(values: dict) -> SlidingWindow:
    try:
        return SlidingWindow(**values)
    except TypeError as error:
        raise ValueError(f"sliding_window: {error} (fields: roi_size, overlap, mode, sigma_scale, batch_size)") from None


# ---------------------------------------------------------------------- inference
def _divisors(divisible_by, dims: int) -> tuple[int, ...]:
    return (int(divisible_by),) * dims if isinstance(divisible_by, int) else tuple(int(d) for d in divisible_by)


def _try_forward(network, shape: Sequence[int]) -> tuple[torch.Tensor | None, str]:
    """Output of ``network`` on a seeded random input of ``shape`` (or None and why not)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(tuple(shape), generator=generator)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # wrong candidate inputs make some layers warn
            out = network(x)
    except Exception as error:  # noqa: BLE001 - any failure means "does not accept this input"
        return None, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return None, f"returned a {type(out).__name__}, not a tensor"
    is_map = out.ndim == len(shape) and tuple(out.shape[2:]) == tuple(shape[2:])
    if out.shape[0] != shape[0] or not (is_map or out.ndim == 2):
        return None, (f"returned shape {tuple(out.shape)} for input {tuple(shape)} (expected (N, K, *spatial) "
                      "of the input's size, or a classifier's (N, K))")
    return out, ""


def output_kind(out: torch.Tensor) -> str:
    """``"classifier"`` for scores ``(N, K)``, ``"segmentation"`` for ``(N, K, *S)``."""
    return CLASSIFIER if out.ndim == 2 else SEGMENTATION


def _check_kind(d: ModelDescription, out: torch.Tensor, shape: tuple[int, ...], notes: list[str]) -> None:
    """Set ``d.kind`` from a test output ``out`` for an input of ``shape``; a contradiction raises ``ValueError``."""
    found = output_kind(out)
    if d.kind is None:
        d.kind = found
        notes.append(f"kind='{found}' (the model returns scores of shape {tuple(out.shape)} for {tuple(shape)})")
    elif d.kind != found:
        what = "class scores (N, K): it is a classifier" if found == CLASSIFIER else "a score per voxel: it segments"
        raise ValueError(
            f"the description says kind='{d.kind}' but the model returns scores of shape {tuple(out.shape)} for an "
            f"input of shape {tuple(shape)}, {what}; set kind='{found}'"
        )
    if d.kind == CLASSIFIER and d.sliding_window is not None:
        raise ValueError(NO_CLASSIFIER_WINDOWS)


def complete_description(
    description: ModelDescription,
    network: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int] | None = None,
    image_shape: Sequence[int] | None = None,
) -> ModelDescription:
    """Fill in what ``description`` leaves open by test passes of ``network`` on random inputs.

    ``input_shape`` ``(N, C, *S)`` is the one input shape a shape-specialised network
    accepts (e.g. a static ``torch.export`` program); its batch entry is ignored.
    ``image_shape`` ``S`` is the spatial shape of the image to be explained, when known.
    Tries spatial dims (3, 2) and input channels 1-4 only where not given; the test
    input's size is, in this order: ``input_shape``, the sliding window's size, the
    image's shape, or the smallest of :data:`SEARCH_SIZES` that runs (rounded up to
    ``divisible_by``). A network that runs on that size only (UNETR's ``img_size``) gets a
    sliding window of that size, with a note (a classifier: a note only). The output's
    shape gives the kind (``(N, K)``: a classifier). Raises ``ValueError`` when no candidate or
    more than one works, when the output contradicts a given kind, ``FloatingPointError`` when the network returns NaN or infinite
    values. Returns a new description with every inferred value noted in ``inferred``.
    """
    d = replace(description, inferred=list(description.inferred))
    notes = d.inferred
    window = d.sliding_window
    if input_shape is not None:
        dims_options, channel_options = [len(input_shape) - 2], [int(input_shape[1])]
    else:
        dims_options = [d.spatial_dims] if d.spatial_dims else [3, 2]
        if d.sliding_window is not None and not isinstance(d.sliding_window.roi_size, int):
            dims_options = [len(d.sliding_window.roi_size)]
        channel_options = [d.in_channels] if d.in_channels else [1, 2, 3, 4]

    def sizes_to_try(dims: int) -> list[tuple[int, ...]]:
        if input_shape is not None:
            return [tuple(int(s) for s in input_shape[2:])]
        if window is not None:
            return [window.window_size(tuple(image_shape) if image_shape and len(image_shape) == dims else (PROBE_SIZE,) * dims)]
        divisors = _divisors(d.divisible_by or 1, dims)
        sizes = [tuple(int(s) for s in image_shape)] if image_shape is not None and len(image_shape) == dims else []
        sizes += [(n,) * dims for n in SEARCH_SIZES]
        return list(dict.fromkeys(tuple(math.ceil(n / q) * q for n, q in zip(size, divisors, strict=True)) for size in sizes))

    working, failures = [], []
    for dims in dims_options:
        for channels in channel_options:
            for size in sizes_to_try(dims):
                out, why = _try_forward(network, (1, channels, *size))
                if out is not None:
                    working.append((dims, channels, out, size))
                    break
            else:
                failures.append(f"{dims}D with {channels} channel(s) {(1, channels, *size)}: {why}")
    if not working:
        given = "the given spatial_dims/in_channels" if (d.spatial_dims or d.in_channels) else "any of the tried inputs"
        raise ValueError(
            f"the model does not run on {given} (sizes up to {SEARCH_SIZES[-1]} tried; give spatial_dims, "
            "in_channels, and divisible_by or a sliding_window for a model that needs other sizes):\n  "
            + "\n  ".join(failures)
        )
    if len(working) > 1:
        options = ", ".join(f"{dims}D with {c} channel(s)" for dims, c, _, _ in working)
        raise ValueError(f"the model runs on several kinds of input ({options}): give spatial_dims and in_channels")
    dims, channels, out, size = working[0]
    _check_kind(d, out, (1, channels, *size), notes)
    if d.spatial_dims is None:
        notes.append(f"spatial_dims={dims} (the only dimensionality the model ran on)")
    if d.in_channels is None:
        notes.append(f"in_channels={channels} (the only channel count the model ran on)")
    d.spatial_dims, d.in_channels, d.example_shape = dims, channels, size

    if not torch.isfinite(out).all():
        raise FloatingPointError("the model returned NaN or infinite values on a random test input")
    k = int(out.shape[1])
    if d.out_channels is not None and d.out_channels != k:
        raise ValueError(f"the description says {d.out_channels} output channel(s) but the model returns {k}")
    if d.out_channels is None:
        notes.append(f"out_channels={k} (from a test pass)")
    d.out_channels = k
    if d.channel is not None and d.channel >= k:
        raise ValueError(f"channel {d.channel} does not exist: the model returns {k} output channel(s)")

    if d.activation is None:
        is_probability = bool(((out >= 0) & (out <= 1)).all())
        if k > 1 and is_probability and torch.allclose(out.sum(dim=1), torch.ones(()), atol=1e-3):
            d.activation = "none"
            notes.append("activation='none' (the outputs already sum to 1 over channels: probabilities)")
        elif k > 1:
            d.activation = "softmax"
            notes.append(f"activation='softmax' (assumed for {k} output channels of logits)")
        else:
            d.activation = "sigmoid"
            notes.append("activation='sigmoid' (assumed for one output channel; set 'none' if it outputs probabilities)")

    if d.divisible_by is None:
        d.divisible_by = 1
        if input_shape is None and window is None:
            divisor = _infer_divisor(network, channels, size, notes)
            if divisor is None and d.kind == CLASSIFIER:
                notes.append(f"the classifier runs on inputs of spatial size {size} only: give images of this size")
            elif divisor is None:
                d.sliding_window = SlidingWindow(size)
                notes.append(
                    f"sliding_window roi_size={size} (the model runs on inputs of this size only, e.g. a "
                    "transformer's fixed img_size: it is applied window by window; overlap 0.25 and constant "
                    "blending are MONAI's defaults: set sliding_window to change them)"
                )
            else:
                d.divisible_by = divisor
    if d.preprocess is None:
        d.preprocess = "none"
    return d


def _infer_divisor(network, channels: int, size: tuple[int, ...], notes: list[str]) -> int | tuple[int, ...] | None:
    """Smallest power of two ``q`` <= 32 such that the network runs on ``size + q``; the size
    itself when it runs on twice the size only; None when it runs on ``size`` only."""
    for q in (1, 2, 4, 8, 16, 32):
        out, _ = _try_forward(network, (1, channels, *(s + q for s in size)))
        if out is not None:
            notes.append(
                f"divisible_by={q} (the model runs on sizes that are multiples of {q}"
                + (f", not on all multiples of {q // 2})" if q > 1 else ")")
            )
            return q
    out, _ = _try_forward(network, (1, channels, *(2 * s for s in size)))
    if out is None:
        return None
    notes.append(f"divisible_by={size} (the model runs on {size} and twice that, not on sizes between)")
    return size[0] if len(set(size)) == 1 else tuple(size)
