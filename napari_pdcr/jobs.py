"""Runs prepared as plain arrays and settings: the job layer (no napari, no Qt).

The dock widgets, :func:`napari_pdcr.console.explain`, the command line and batch
scripts all build an :class:`ExplainJob` (input blocks) or a :class:`ComponentJob`
(network components) and run its ``iter_run`` generator, which yields
:class:`~napari_pdcr.engine.estimator.Progress` and returns the explanation: the widgets
in a napari worker, the others with :func:`~napari_pdcr.engine.estimator.drive`.
Loading the model and cutting the patch bank happen inside the generator, so off the
GUI thread. :mod:`napari_pdcr._napari.inputs` turns napari layers into the arrays a job
takes; the array functions here are the ones it extends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_pdcr.components import enumerate_components
from napari_pdcr.interventions import make_intervention
from napari_pdcr.methods import ComponentEffects, RegionEffects
from napari_pdcr.models.base import CLASSIFIER, SegmentationModel
from napari_pdcr.outcomes import Outcome
from napari_pdcr.regions import validate_reference
from napari_pdcr.samples import load_sample

#: Bytes the crops of one patch bank may take (the published 10,000 crops when they fit).
BANK_BUDGET_BYTES = 256 * 2**20
#: Bundled images a patch bank is cut from by default, per model dimensionality.
DEFAULT_BANKS = {2: ("colin27_slices", "itk_slices"), 3: ("itk_volume", "colin27_volume")}


# ---------------------------------------------------------------------- array inputs
def component_at(mask: np.ndarray, index) -> np.ndarray:
    """The connected component of ``mask`` containing voxel ``index`` (face connectivity)."""
    index = tuple(int(round(float(i))) for i in index)
    if len(index) != mask.ndim or any(not 0 <= i < n for i, n in zip(index, mask.shape, strict=True)):
        raise ValueError(f"the picked point {index} lies outside the labels layer (shape {mask.shape})")
    if not mask[index]:
        raise ValueError(f"the picked point {index} is not inside the chosen label: click inside the region")
    components, _ = ndimage.label(mask)
    return components == components[index]


def image_array(image) -> np.ndarray:
    """An image array ``S`` or ``(C, *S)`` as numpy (napari's version also takes Image layers)."""
    return np.asarray(image)


def region_mask(region, image=None, label: int | None = None, point=None) -> np.ndarray:
    """A target region or reference mask from a label array (``image`` is unused for arrays).

    ``label`` picks one value (None / 0: every non-zero voxel); ``point`` keeps only the
    connected component containing it.
    """
    array = np.asarray(region)
    mask = array == label if label else array != 0
    return component_at(mask, point) if point is not None else mask


def reference_mask(reference, label: int | None = None) -> np.ndarray:
    """A reference mask from a label array: the voxels equal to ``label``; without a label
    the array must be binary (several labels or probabilities raise ``ValueError``)."""
    array = np.asarray(reference)
    return array == label if label else validate_reference(array, array.shape)


def region_name(region, label: int | None = None) -> str:
    """How a run names its target region: arrays have no name (napari's version names layers)."""
    return ""


def layer_geometry(image) -> dict:
    """Name, scale and translate of an image: none for arrays (napari's version reads layers)."""
    return {}


# ---------------------------------------------------------------------- models
@lru_cache(maxsize=4)
def _cached_model(kind: str, spec: str, trusted: bool) -> SegmentationModel:
    if kind == "demo":
        from napari_pdcr.models.demo import load_demo_model

        return load_demo_model(spec)
    try:
        from napari_pdcr.models.loading import load_model
    except ImportError as error:
        raise RuntimeError(
            "loading a model file needs napari_pdcr.models.loading, which this installation lacks; "
            "use a demo model or update napari-pdcr"
        ) from error
    return load_model(spec, trusted=trusted)


def resolve_model(model, trusted: bool = False) -> SegmentationModel:
    """A :class:`SegmentationModel`, a demo model's name, or what ``load_model`` accepts -> the model.

    Loaded models are cached (by name, or by source and the file's modification time).
    """
    if isinstance(model, SegmentationModel):
        return model
    from napari_pdcr.models.demo import demo_model_names

    if str(model) in demo_model_names():
        return _cached_model("demo", str(model), False)
    path = Path(model).expanduser()
    version = f"file@{path.stat().st_mtime_ns}" if path.exists() else "source"
    return _cached_model(version, str(path) if path.exists() else str(model), bool(trusted))


def demo_model_dims(name: str) -> int | None:
    """Spatial dimensionality of a demo model, without loading it (None for other names)."""
    from napari_pdcr.models.demo import DEMO_MODELS

    spec = DEMO_MODELS.get(name)
    return spec.spatial_dims if spec is not None else None


def model_kind(model) -> str | None:
    """``"segmentation"`` or ``"classifier"`` for a :class:`SegmentationModel` or a demo model's name,
    without loading it; None for a model file (known once it is loaded)."""
    if isinstance(model, SegmentationModel):
        return model.kind
    from napari_pdcr.models.demo import DEMO_MODELS

    spec = DEMO_MODELS.get(str(model))
    return getattr(spec, "kind", None) if spec is not None else None


def model_input(image: np.ndarray, model: SegmentationModel, name: str = "the image") -> np.ndarray:
    """``(C, *S)`` from a grayscale ``S`` or channels-first ``(C, *S)`` array, checked against the model."""
    dims, channels = model.spatial_dims, model.in_channels
    if image.ndim == dims and channels == 1:
        return image[None]
    if image.ndim == dims + 1 and image.shape[0] == channels:
        return image
    if image.ndim == dims + 1 and channels > 1:
        raise ValueError(
            f"model {model.name!r} expects {channels} input channels first, but {name} has shape {tuple(image.shape)}"
        )
    ndim = image.ndim - (image.ndim > dims and channels > 1)
    raise ValueError(
        f"model {model.name!r} explains {dims}D images, but {name} is {ndim}D (shape {tuple(image.shape)}): "
        f"choose a model for {ndim}D images"
    )


def channel_layer_names(model, trusted: bool = False) -> list[str]:
    """Names of the layers whose channels can be explained: the stages and skips (loads the model)."""
    model = resolve_model(model, trusted=trusted)
    return [c.name for c in enumerate_components(model, "stages") + enumerate_components(model, "skips")]


# ---------------------------------------------------------------------- patch bank
def bank_size(channels: int, block_shape) -> int:
    """Crops in a patch bank: the published 10,000, fewer when they would exceed the budget."""
    crop_bytes = 4 * channels * int(np.prod(block_shape))
    return int(max(100, min(10_000, BANK_BUDGET_BYTES // crop_bytes)))


def split_sources(array: np.ndarray, spatial_dims: int, channels: int) -> list[np.ndarray]:
    """Other images ``(C, *S)`` from one array: a single image, or a stack along the leading axes."""
    array = np.asarray(array, dtype=np.float32)
    if channels == 1:
        return [a[None] for a in array.reshape(-1, *array.shape[array.ndim - spatial_dims :])]
    return list(array.reshape(-1, channels, *array.shape[array.ndim - spatial_dims :]))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two arrays have the same shape and values."""
    return a.shape == b.shape and np.array_equal(a, b)


def default_bank(image: np.ndarray, spatial_dims: int) -> tuple[np.ndarray, str]:
    """Bundled other images for a patch bank of a 1-channel model, and the sample's name.

    2D: the Colin27 axial slices (the explained slice is left out later); 3D: the second
    subject, or Colin27 when the second subject is the explained volume.
    """
    for name in DEFAULT_BANKS[spatial_dims]:
        stack = load_sample(name)["image"]
        if any(not same_image(s, image) for s in split_sources(stack, spatial_dims, 1)):
            return stack, f"bundled sample {name}"
    raise ValueError("no bundled image differs from the explained one: choose an image layer for the patch bank")


# ---------------------------------------------------------------------- input blocks
@dataclass
class ExplainJob:
    """Everything one region-effects run needs, as plain arrays and settings.

    ``image`` is ``S`` or ``(C, *S)`` raw intensities; ``target_region`` and
    ``reference`` are bool ``S`` (``reference=None``: the model's own prediction;
    ``target_region=None`` for a classifier, whose output is global);
    ``model`` a demo name, a file path or a :class:`SegmentationModel`. ``bank`` holds
    the other images of a patch bank, one array or a list (None: the bundled default).
    ``parameters`` go to :class:`~napari_pdcr.methods.region_effects.RegionEffects`
    (``block_shape``, ``n_screen``, ``n_estimate``, ``tau``, ``mode``, ``seed``,
    ``device``, ``batch_size``). ``each_label=True``: ``target_region`` is a label
    image and every label is explained on one set of forward passes; the run returns
    ``{label: RegionExplanation}``.
    """

    image: np.ndarray
    target_region: np.ndarray | None
    model: str | SegmentationModel = "unet2d"
    reference: np.ndarray | None = None
    intervention: str = "patch_bank"
    outcome: str = "dice"
    temperature: float = 1.0
    bank: np.ndarray | list[np.ndarray] | None = None
    bank_description: str = ""
    trusted: bool = False
    spacing: tuple[float, ...] | None = None
    source_layer: dict = field(default_factory=dict)
    target_name: str = ""
    parameters: dict = field(default_factory=dict)
    each_label: bool = False

    def check(self) -> None:
        """Raise ``ValueError`` with a user-facing sentence for problems visible before a run."""
        classifier = model_kind(self.model) == CLASSIFIER  # its output is global: the region is optional
        if not classifier and (self.target_region is None or not np.any(self.target_region)):
            raise ValueError("the target region is empty: paint it (or choose a label value that exists) first")
        dims = self.model.spatial_dims if isinstance(self.model, SegmentationModel) else demo_model_dims(str(self.model))
        channels = self.model.in_channels if isinstance(self.model, SegmentationModel) else 1
        ndim = np.ndim(self.target_region) if self.target_region is not None else np.ndim(self.image) - (channels > 1)
        if dims is not None and ndim != dims:
            name = getattr(self.model, "name", self.model)
            stack = (" (for a stack of 2D slices, explain one slice, e.g. image[z]; the napari widget "
                     "explains the slice on show)") if dims == 2 and ndim == 3 else ""
            raise ValueError(f"model {name!r} explains {dims}D images, but the image is {ndim}D: "
                             f"choose a {ndim}D model{stack}")

    def iter_run(self):
        """Generator: load the model, build the intervention, yield progress, return the explanation."""
        self.check()
        model = resolve_model(self.model, trusted=self.trusted)
        image = model_input(np.asarray(self.image, dtype=np.float32), model, self.source_layer.get("name", "the image"))
        method, bank_note = self.method(model, image)
        if self.each_label:
            result = yield from method.iter_attribute(image, None, self.reference, self.spacing, regions=self.target_region)
        else:
            result = yield from method.iter_attribute(image, self.target_region, self.reference, self.spacing)
        for explanation in result.values() if self.each_label else [result]:
            explanation.provenance.update(
                source_layer=self.source_layer or None,
                target_layer=self.target_name or None,
                patch_bank=bank_note,
            )
        return result

    def method(self, model: SegmentationModel, image: np.ndarray) -> tuple[RegionEffects, str | None]:
        """The :class:`RegionEffects` these settings describe for the loaded ``model`` and its ``image``
        (``(C, *S)``), and a note on the patch bank's images (None for another intervention)."""
        intervention, bank_note = self._intervention(model, image)
        outcome = Outcome(self.outcome, temperature=float(self.temperature))
        return RegionEffects(model, intervention=intervention, outcome=outcome, **self.parameters), bank_note

    def _intervention(self, model: SegmentationModel, image: np.ndarray):
        """The intervention and, for a patch bank, a note on its images (else None)."""
        if self.intervention != "patch_bank":
            return make_intervention(self.intervention), None
        return patch_bank(model, image, self.bank, self.bank_description, self.parameters.get("block_shape", 8),
                          self.parameters.get("seed", 0))


def patch_bank(model: SegmentationModel, image: np.ndarray, bank=None, bank_description: str = "",
               block_shape=8, seed: int = 0):
    """A patch bank of images other than ``image`` (``(C, *S)``, model layout) and a note on them.

    ``bank``: other images (one array or a list; None: the bundled default). Returns
    ``(PatchBank, note)``; ``ValueError`` when no image other than ``image`` is left.
    """
    if bank is None:
        if model.in_channels != 1:
            raise ValueError(
                f"the bundled images have 1 channel but model {model.name!r} takes {model.in_channels}: "
                "choose an image layer for the patch bank"
            )
        bank, where = default_bank(image, model.spatial_dims)
    else:
        where = bank_description or "given images"
    banks = bank if isinstance(bank, list) else [bank]
    candidates = [s for b in banks for s in split_sources(b, model.spatial_dims, model.in_channels)]
    others = [s for s in candidates if not same_image(s, image)]
    if not others:
        raise ValueError("the patch bank has no image other than the explained one: choose other images")
    block = (block_shape,) * model.spatial_dims if np.isscalar(block_shape) else block_shape
    size = bank_size(model.in_channels, block)
    left_out = " (the explained image left out)" if len(others) < len(candidates) else ""
    note = f"{where}: {size} crops from {len(others)} images{left_out}"
    sources = [model.prepare_image(s).numpy() for s in others]
    return make_intervention("patch_bank", bank_sources=sources, size=size, seed=seed), note


# ---------------------------------------------------------------------- network components
@dataclass
class ComponentJob:
    """One component-effects run as plain arrays and settings.

    ``image`` is ``S`` or ``(C, *S)``; ``target_region`` / ``reference`` bool ``S``;
    ``bank`` other images (a stack; None: the bundled samples), of which at most
    ``n_bank`` evenly spaced ones are used; ``parameters`` go to :class:`ComponentEffects`.
    """

    image: np.ndarray
    target_region: np.ndarray
    model: str | SegmentationModel
    reference: np.ndarray | None = None
    bank: np.ndarray | None = None
    n_bank: int = 16
    trusted: bool = False
    parameters: dict = field(default_factory=dict)

    def _method(self) -> tuple[ComponentEffects, np.ndarray]:
        """The method on the loaded model, and the image in the model's input layout."""
        model = resolve_model(self.model, trusted=self.trusted)
        return ComponentEffects(model, **self.parameters), model_input(np.asarray(self.image, dtype=np.float32), model)

    def components(self):
        """The components the run would explain, probed on the image (loads the model)."""
        method, image = self._method()
        return method.components(image)

    def iter_run(self):
        """Generator: load the model, pick bank images, yield progress, return the ComponentExplanation."""
        method, image = self._method()
        bank = self._bank_images(method.model, image) if method.intervention.needs_bank else None
        result = yield from method.iter_attribute(image, self.target_region, self.reference, bank)
        return result

    def _bank_images(self, model: SegmentationModel, image: np.ndarray) -> np.ndarray:
        stack = self.bank if self.bank is not None else default_bank(image, model.spatial_dims)[0]
        others = [s for s in split_sources(stack, model.spatial_dims, model.in_channels) if not same_image(s, image)]
        others = [s for s in others if s.shape == image.shape]
        if not others:
            raise ValueError(
                f"the bank has no other image of the explained image's shape {image.shape}: "
                "choose an image layer with other images of this size"
            )
        pick = np.unique(np.linspace(0, len(others) - 1, min(self.n_bank, len(others))).round().astype(int))
        return np.stack([others[i] for i in pick])
