"""Temperature calibration of a segmentation model on labelled pixels.

Usage (console or script)::

    from napari_pdcr import load_demo_model, load_sample
    from napari_pdcr.calibration import calibrate
    model = load_demo_model("unet2d")
    sample = load_sample("colin27_slice")
    fit = calibrate(model, sample["image"][None], sample["mask"])
    fit.temperature, fit.before.ece, fit.after.ece
    model.description.temperature      # the fitted T, used by soft outcomes from now on

:func:`fit_temperature` finds the one ``T > 0`` that minimises the mean per-pixel
negative log-likelihood of the labels under ``sigmoid(z / T)`` (one output channel) or
``softmax(z / T)`` (several classes), ``z`` the model's logits. The calibration measures
(per-pixel expected calibration error with 15 equal-width or equal-mass bins, NLL,
Brier score) come with it, before and after, and the data of a reliability diagram.
The equal-width ECE is torchmetrics' ``binary_calibration_error`` /
``multiclass_calibration_error``; the equal-mass variant and the diagram use
torchmetrics' binning with other bin edges. Binary calibration follows torchmetrics: the
confidence of a pixel is its foreground probability and its "accuracy" is its label;
multi-class calibration uses the top-class probability and whether the top class is right.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from napari_pdcr.engine.estimator import Progress, drive
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.outcomes import Outcome
from napari_pdcr.validation import positive_float, positive_int

#: bins of the expected calibration error (as in Guo et al. 2017)
N_BINS = 15
#: search interval of log T; fits at its edge are reported as not converged
LOG_T_BOUNDS = (float(np.log(1e-3)), float(np.log(1e3)))


@dataclass(frozen=True)
class PixelLogits:
    """Logits and labels of labelled pixels.

    ``logits``: ``(P,)`` logits of the explained channel (sigmoid models) or ``(P, K)``
    logits of every class (softmax models), float32; ``labels``: ``(P,)`` int64, 0/1 or
    the class index.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    activation: str
    n_images: int

    @property
    def n_pixels(self) -> int:
        return int(self.labels.numel())

    def tempered(self, temperature: float) -> torch.Tensor:
        """Probabilities at ``temperature``: ``(P,)`` foreground or ``(P, K)`` class probabilities."""
        z = self.logits / temperature
        return torch.sigmoid(z) if self.activation == "sigmoid" else torch.softmax(z, dim=1)

    def nll(self, temperature: float | torch.Tensor) -> torch.Tensor:
        """Mean per-pixel negative log-likelihood (nats) at ``temperature``."""
        z = self.logits / temperature
        if self.activation == "sigmoid":
            return F.binary_cross_entropy_with_logits(z, self.labels.float())
        return F.cross_entropy(z, self.labels)

    def confidences(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel confidence and "accuracy" ``(P,)`` in the torchmetrics convention."""
        probability = self.tempered(temperature)
        if self.activation == "sigmoid":
            return probability, self.labels.float()
        confidence, predicted = probability.max(dim=1)
        return confidence, (predicted == self.labels).float()


@dataclass(frozen=True)
class CalibrationMeasures:
    """Per-pixel calibration at one temperature.

    ``ece``: expected calibration error, 15 equal-width bins (probability units, 0-1);
    ``adaptive_ece``: the same with 15 equal-mass bins; ``nll``: mean negative
    log-likelihood (nats); ``brier``: mean squared error of the probabilities (summed
    over classes for softmax models).
    """

    temperature: float
    ece: float
    adaptive_ece: float
    nll: float
    brier: float


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Reliability diagram data, ``(n_bins,)`` arrays over equal-width confidence bins.

    ``confidence``: mean predicted probability in the bin; ``frequency``: observed
    frequency (foreground share, or top-class accuracy); ``proportion``: share of pixels
    in the bin; ``edges``: ``(n_bins + 1,)`` bin edges. Empty bins hold 0 and proportion 0.
    """

    temperature: float
    confidence: np.ndarray
    frequency: np.ndarray
    proportion: np.ndarray
    edges: np.ndarray


@dataclass(frozen=True)
class TemperatureFit:
    """The fitted temperature and the calibration before (model's current T) and after."""

    temperature: float
    before: CalibrationMeasures
    after: CalibrationMeasures
    reliability_before: ReliabilityDiagram
    reliability_after: ReliabilityDiagram
    n_pixels: int
    n_images: int
    converged: bool

    def summary(self) -> dict:
        """JSON-serialisable record of the fit (for model descriptions and provenance)."""
        return {
            "temperature": self.temperature,
            "n_pixels": self.n_pixels,
            "n_images": self.n_images,
            "converged": self.converged,
            "before": asdict(self.before),
            "after": asdict(self.after),
        }


def calibration_measures(pixels: PixelLogits, temperature: float, n_bins: int = N_BINS) -> CalibrationMeasures:
    """:class:`CalibrationMeasures` of ``pixels`` at ``temperature``."""
    # torchmetrics takes ~2 s to import: only when a calibration is measured
    from torchmetrics.functional.classification import (
        binary_calibration_error,
        multiclass_calibration_error,
    )
    from torchmetrics.functional.classification.calibration_error import (
        _ce_compute,
    )
    temperature = positive_float("temperature", temperature)
    n_bins = positive_int("n_bins", n_bins)
    probability = pixels.tempered(temperature)
    if pixels.activation == "sigmoid":
        ece = binary_calibration_error(probability, pixels.labels, n_bins=n_bins)
        brier = torch.mean((probability - pixels.labels.float()) ** 2)
    else:
        n_classes = probability.shape[1]
        ece = multiclass_calibration_error(probability, pixels.labels, num_classes=n_classes, n_bins=n_bins)
        brier = torch.mean(torch.sum((probability - F.one_hot(pixels.labels, n_classes).float()) ** 2, dim=1))
    confidence, accuracy = pixels.confidences(temperature)
    equal_mass_edges = torch.quantile(confidence.double(), torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    equal_mass_edges[0], equal_mass_edges[-1] = 0.0, 1.0
    adaptive = _ce_compute(confidence.double(), accuracy.double(), torch.unique(equal_mass_edges))
    return CalibrationMeasures(
        temperature=temperature,
        ece=float(ece),
        adaptive_ece=float(adaptive),
        nll=float(pixels.nll(temperature)),
        brier=float(brier),
    )


def reliability_diagram(pixels: PixelLogits, temperature: float, n_bins: int = N_BINS) -> ReliabilityDiagram:
    """:class:`ReliabilityDiagram` of ``pixels`` at ``temperature`` over ``n_bins`` equal-width bins."""
    from torchmetrics.functional.classification.calibration_error import _binning_bucketize

    confidence, accuracy = pixels.confidences(positive_float("temperature", temperature))
    edges = torch.linspace(0, 1, positive_int("n_bins", n_bins) + 1, dtype=torch.float64)
    # torchmetrics bins by the lower edges; a confidence of exactly 1 lands in an extra last bin
    frequency, mean_confidence, proportion = _binning_bucketize(confidence.double(), accuracy.double(), edges)
    frequency, mean_confidence, proportion = frequency[:n_bins], mean_confidence[:n_bins], proportion.clone()
    proportion[n_bins - 1] += proportion[n_bins]
    return ReliabilityDiagram(
        temperature=float(temperature),
        confidence=mean_confidence.numpy(),
        frequency=frequency.numpy(),
        proportion=proportion[:n_bins].numpy(),
        edges=edges.numpy(),
    )


def _as_list(values, what: str) -> list:
    if values is None:
        return []
    if isinstance(values, np.ndarray) or torch.is_tensor(values):
        return [values]
    if isinstance(values, Sequence) and not isinstance(values, str):
        return list(values)
    raise TypeError(f"{what} must be an array or a list of arrays; got {type(values).__name__}")


def iter_pixel_logits(
    model: SegmentationModel, images, masks, regions=None, channel: int | None = None
) -> Generator[Progress, None, PixelLogits]:
    """Logits and labels of the labelled pixels of ``images``, one forward pass per image.

    ``images``: one raw image ``(C, *S)`` or a list; ``masks``: the label mask ``S`` of
    each (bool / 0-1 for sigmoid models, class indices for softmax models); ``regions``:
    optional bool ``S`` per image, the pixels to use (default: all). Yields
    :class:`Progress` per image.
    """
    if model.activation not in ("sigmoid", "softmax"):
        raise ValueError(
            f"model {model.name!r} outputs probabilities (activation={model.activation!r}); "
            "temperature scaling needs logits: give the network without its final sigmoid/softmax"
        )
    images, masks = _as_list(images, "images"), _as_list(masks, "masks")
    regions = _as_list(regions, "regions") or [None] * len(images)
    if not images or len(masks) != len(images) or len(regions) != len(images):
        raise ValueError(
            f"give one mask (and at most one region) per image; got {len(images)} image(s), {len(masks)} mask(s) "
            f"and {len(regions)} region(s)"
        )
    if channel is None:
        channel = getattr(model.description, "channel", None)
    t0 = time.perf_counter()
    all_logits, all_labels = [], []
    for i, (image, mask, region) in enumerate(zip(images, masks, regions, strict=True)):
        x = model.prepare_image(image, f"image {i}")
        spatial = tuple(x.shape[1:])
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(f"mask {i} has shape {mask.shape} but image {i} is {spatial}: give a mask of the image's shape")
        use = np.ones(spatial, bool) if region is None else np.asarray(region, dtype=bool)
        if use.shape != spatial:
            raise ValueError(f"region {i} has shape {use.shape} but image {i} is {spatial}: give a region of the image's shape")
        with torch.inference_mode():
            scores = model(x[None].to(model.device))[0].float().cpu()
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"model {model.name!r} returned NaN or infinite scores on image {i}")
        flat = scores.flatten(1)[:, torch.from_numpy(np.flatnonzero(use))]
        if model.activation == "sigmoid":
            k = Outcome(channel=channel).resolve_channel(scores.shape[0], "sigmoid")
            all_logits.append(flat[k])
        else:
            all_logits.append(flat.T)
        all_labels.append(torch.from_numpy(mask[use].astype(np.int64)))
        yield Progress("forward", i + 1, len(images), i + 1, time.perf_counter() - t0)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    _check_labels(model, logits, labels)
    return PixelLogits(logits=logits, labels=labels, activation=model.activation, n_images=len(images))


def _check_labels(model: SegmentationModel, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Clear errors for empty or one-class labels and for scores that look like probabilities."""
    if labels.numel() == 0:
        raise ValueError("the regions hold no pixels: give regions that cover labelled pixels")
    n_classes = 2 if model.activation == "sigmoid" else logits.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"the masks hold labels {int(labels.min())}..{int(labels.max())} but the model has {n_classes} classes: "
            "give masks of class indices 0.." + str(n_classes - 1)
        )
    if model.activation == "sigmoid" and not labels.any():
        raise ValueError("the masks are empty (no foreground pixel): give masks with the structure labelled")
    if torch.unique(labels).numel() < 2:
        raise ValueError(
            "the labelled pixels hold only one class: give masks (or regions) with both the structure and its surroundings"
        )
    in_unit_interval = bool(((logits >= 0) & (logits <= 1)).all())
    sums_to_one = model.activation == "softmax" and torch.allclose(logits.sum(dim=1), torch.ones(()), atol=1e-3)
    if in_unit_interval and (model.activation == "sigmoid" or sums_to_one):
        raise ValueError(
            f"model {model.name!r} returns scores in [0, 1]{' that sum to 1' if sums_to_one else ''}: these look like "
            "probabilities, not logits; temperature scaling needs logits (give the network without its final "
            "activation, or set activation='none' if it outputs probabilities)"
        )


def _fit_log_temperature(pixels: PixelLogits, start: float) -> tuple[float, bool]:
    """``(T, converged)`` minimising the NLL; L-BFGS on log T (the NLL is smooth in log T)."""
    log_t = torch.tensor(float(np.log(start)), dtype=torch.float64, requires_grad=True)
    logits = replace(pixels, logits=pixels.logits.double())
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = logits.nll(torch.exp(log_t.clamp(*LOG_T_BOUNDS)))
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach())
    converged = LOG_T_BOUNDS[0] < value < LOG_T_BOUNDS[1]
    return float(np.exp(np.clip(value, *LOG_T_BOUNDS))), converged


def iter_fit_temperature(
    model: SegmentationModel, images, masks, regions=None, channel: int | None = None, n_bins: int = N_BINS
) -> Generator[Progress, None, TemperatureFit]:
    """:func:`fit_temperature` as a generator of :class:`Progress` (for workers)."""
    t0 = time.perf_counter()
    pixels = yield from iter_pixel_logits(model, images, masks, regions, channel)
    current = getattr(model.description, "temperature", 1.0)
    temperature, converged = _fit_log_temperature(pixels, current)
    yield Progress("fit", 1, 1, pixels.n_images, time.perf_counter() - t0)
    return TemperatureFit(
        temperature=temperature,
        before=calibration_measures(pixels, current, n_bins),
        after=calibration_measures(pixels, temperature, n_bins),
        reliability_before=reliability_diagram(pixels, current, n_bins),
        reliability_after=reliability_diagram(pixels, temperature, n_bins),
        n_pixels=pixels.n_pixels,
        n_images=pixels.n_images,
        converged=converged,
    )


def fit_temperature(
    model: SegmentationModel, images, masks, regions=None, channel: int | None = None, n_bins: int = N_BINS, progress=None
) -> TemperatureFit:
    """Fit the temperature ``T > 0`` of ``model`` on labelled pixels (see the module docstring).

    ``images``: one raw image ``(C, *S)`` or a list; ``masks``: label masks ``S``
    (foreground for sigmoid models, class indices for softmax models); ``regions``:
    optional bool masks ``S`` of the pixels to use (e.g. a labelled region of one image);
    ``channel``: the sigmoid channel to calibrate (default: the only one). ``before`` is
    measured at the model description's temperature (1 without one). The model is not
    changed; :func:`calibrate` stores the result.
    """
    return drive(iter_fit_temperature(model, images, masks, regions, channel, n_bins), progress)


def store_temperature(model: SegmentationModel, fit: TemperatureFit) -> SegmentationModel:
    """Record ``fit`` in ``model.description`` (its temperature and calibration); returns ``model``."""
    description = model.description or ModelDescription(
        spatial_dims=model.spatial_dims, in_channels=model.in_channels, activation=model.activation
    )
    model.description = description.calibrated(fit.temperature, fit.summary())
    return model


def calibrate(model: SegmentationModel, images, masks, regions=None, channel: int | None = None, progress=None) -> TemperatureFit:
    """:func:`fit_temperature`, then store the fitted T in the model's description."""
    fit = fit_temperature(model, images, masks, regions, channel, progress=progress)
    store_temperature(model, fit)
    return fit
