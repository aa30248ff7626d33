"""One explanation run, prepared from napari layers or arrays (Qt-free).

The dock widget and :func:`napari_pdcr.console.explain` both build an
:class:`ExplainJob` on the GUI thread (reading layer data there) and run
:meth:`ExplainJob.iter_run`, a generator of
:class:`~napari_pdcr.engine.estimator.Progress` that returns the
:class:`~napari_pdcr.explanation.RegionExplanation`: the widget in a napari worker, the
console with :func:`~napari_pdcr.engine.estimator.drive`. Loading the model and cutting
the patch bank happen inside the generator, off the GUI thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import napari.layers
import numpy as np
from scipy import ndimage

from napari_pdcr.interventions import make_intervention
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.outcomes import Outcome
from napari_pdcr.region_effects import RegionEffects
from napari_pdcr.samples import load_sample

#: Bytes the crops of one patch bank may take (the published 10,000 crops when they fit).
BANK_BUDGET_BYTES = 256 * 2**20
#: Bundled images a patch bank is cut from by default, per model dimensionality.
DEFAULT_BANKS = {2: ("colin27_slices", "itk_slices"), 3: ("itk_volume", "colin27_volume")}


# ---------------------------------------------------------------------- layers -> arrays
def _is_layer(obj, kind: str) -> bool:
    """``isinstance`` for napari layers (also through the viewer proxies plugins receive)."""
    return isinstance(obj, getattr(napari.layers, kind))


def layer_array(layer) -> np.ndarray:
    """An image or labels layer's data as a numpy array (the finest level if multiscale)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.asarray(data)


def image_array(image) -> np.ndarray:
    """Image data with any RGB(A) axis moved first: ``(*S)`` or ``(C, *S)``."""
    if _is_layer(image, "Image"):
        data = layer_array(image)
        return np.moveaxis(data, -1, 0) if image.rgb else data
    return np.asarray(image)


def image_spatial_shape(image) -> tuple[int, ...]:
    """Shape a mask drawn over ``image`` (layer or array) has: its shape without an RGB axis."""
    if _is_layer(image, "Image"):
        return tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
    return tuple(np.shape(image))


def labels_mask(layer, label: int | None = None) -> np.ndarray:
    """Bool mask of a Labels layer: voxels equal to ``label``, or all non-zero ones for None/0."""
    data = layer_array(layer)
    return data == label if label else data != 0


def shapes_mask(shapes_layer, image_layer) -> np.ndarray:
    """Bool mask over ``image_layer``'s grid: the bounding boxes of the rectangles of a Shapes layer.

    Uses the selected rectangles, or all of them when none is selected. Vertices are
    mapped through world coordinates, so the two layers may have different scales.
    """
    shape = image_spatial_shape(image_layer)
    n = len(shape)
    chosen = shapes_layer.selected_data or range(len(shapes_layer.data))
    rectangles = [i for i in chosen if shapes_layer.shape_type[i] == "rectangle"]
    if not rectangles:
        raise ValueError(f"the shapes layer {shapes_layer.name!r} has no rectangle: draw one first")
    scale_s, trans_s = np.asarray(shapes_layer.scale), np.asarray(shapes_layer.translate)
    scale_i, trans_i = np.asarray(image_layer.scale)[-n:], np.asarray(image_layer.translate)[-n:]
    mask = np.zeros(shape, dtype=bool)
    for i in rectangles:
        world = np.asarray(shapes_layer.data[i]) * scale_s + trans_s
        index = (world[:, -n:] - trans_i) / scale_i
        lo = np.clip(np.floor(index.min(axis=0) + 0.5).astype(int), 0, shape)
        hi = np.clip(np.floor(index.max(axis=0) + 0.5).astype(int) + 1, 0, shape)
        mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def component_at(mask: np.ndarray, index) -> np.ndarray:
    """The connected component of ``mask`` containing voxel ``index`` (face connectivity)."""
    index = tuple(int(round(float(i))) for i in index)
    if len(index) != mask.ndim or any(not 0 <= i < n for i, n in zip(index, mask.shape, strict=True)):
        raise ValueError(f"the picked point {index} lies outside the labels layer (shape {mask.shape})")
    if not mask[index]:
        raise ValueError(f"the picked point {index} is not inside the chosen label: click inside the region")
    components, _ = ndimage.label(mask)
    return components == components[index]


def region_mask(region, image=None, label: int | None = None, point=None) -> np.ndarray:
    """A target region or reference mask from a Labels layer, a Shapes layer or an array.

    ``label`` picks one value of a Labels layer (None / 0: every non-zero voxel);
    ``point`` (data coordinates) keeps only the connected component containing it; a
    Shapes layer needs the ``image`` layer whose grid the rectangles are drawn on.
    """
    if _is_layer(region, "Shapes"):
        if not _is_layer(image, "Image"):
            raise ValueError("a rectangle from a Shapes layer needs the image layer it is drawn over")
        mask = shapes_mask(region, image)
    elif _is_layer(region, "Labels"):
        mask = labels_mask(region, label)
    else:
        array = np.asarray(region)
        mask = array == label if label else array != 0
    return component_at(mask, point) if point is not None else mask


def region_name(region, label: int | None = None) -> str:
    """How a run names its target region: the layer's name, plus ``#label`` if it holds other labels too."""
    name = getattr(region, "name", "")
    if not name or not label or not _is_layer(region, "Labels"):
        return name
    data = layer_array(region)
    return f"{name} #{label}" if np.any((data != 0) & (data != label)) else name


def layer_geometry(image) -> dict:
    """``name``, ``scale`` and ``translate`` of an image layer's spatial axes (empty for arrays)."""
    if not _is_layer(image, "Image"):
        return {}
    n = len(image_spatial_shape(image))
    return {
        "name": image.name,
        "scale": [float(s) for s in image.scale[-n:]],
        "translate": [float(t) for t in image.translate[-n:]],
    }


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


# ---------------------------------------------------------------------- the job
@dataclass
class ExplainJob:
    """Everything one run needs, as plain arrays and settings.

    ``image`` is ``S`` or ``(C, *S)`` raw intensities; ``target_region`` and
    ``reference`` are bool ``S`` (``reference=None``: the model's own prediction);
    ``model`` a demo name, a file path or a :class:`SegmentationModel`. ``bank`` holds
    the other images of a patch bank (None: the bundled default). ``parameters`` go to
    :class:`~napari_pdcr.region_effects.RegionEffects` (``block_shape``, ``n_screen``,
    ``n_estimate``, ``tau``, ``mode``, ``seed``, ``device``, ``batch_size``).
    """

    image: np.ndarray
    target_region: np.ndarray
    model: str | SegmentationModel = "unet2d"
    reference: np.ndarray | None = None
    intervention: str = "patch_bank"
    outcome: str = "dice"
    temperature: float = 1.0
    bank: np.ndarray | None = None
    bank_description: str = ""
    trusted: bool = False
    spacing: tuple[float, ...] | None = None
    source_layer: dict = field(default_factory=dict)
    target_name: str = ""
    parameters: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``ValueError`` with a user-facing sentence for problems visible before a run."""
        if not np.any(self.target_region):
            raise ValueError("the target region is empty: paint it (or choose a label value that exists) first")
        dims = self.model.spatial_dims if isinstance(self.model, SegmentationModel) else demo_model_dims(str(self.model))
        ndim = np.ndim(self.target_region)
        if dims is not None and ndim != dims:
            name = getattr(self.model, "name", self.model)
            raise ValueError(f"model {name!r} explains {dims}D images, but the image is {ndim}D: choose a {ndim}D model")

    def iter_run(self):
        """Generator: load the model, build the intervention, yield progress, return the explanation."""
        self.check()
        model = resolve_model(self.model, trusted=self.trusted)
        image = model_input(np.asarray(self.image, dtype=np.float32), model, self.source_layer.get("name", "the image"))
        intervention, bank_note = self._intervention(model, image)
        method = RegionEffects(
            model,
            intervention=intervention,
            outcome=Outcome(self.outcome, temperature=float(self.temperature)),
            **self.parameters,
        )
        explanation = yield from method.iter_attribute(image, self.target_region, self.reference, self.spacing)
        explanation.provenance.update(
            source_layer=self.source_layer or None,
            target_layer=self.target_name or None,
            patch_bank=bank_note,
        )
        return explanation

    def _intervention(self, model: SegmentationModel, image: np.ndarray):
        """The intervention and, for a patch bank, a note on its images (else None)."""
        if self.intervention != "patch_bank":
            return make_intervention(self.intervention), None
        if self.bank is None:
            if model.in_channels != 1:
                raise ValueError(
                    f"the bundled images have 1 channel but model {model.name!r} takes {model.in_channels}: "
                    "choose an image layer for the patch bank"
                )
            bank, where = default_bank(image, model.spatial_dims)
        else:
            bank, where = self.bank, self.bank_description or "given images"
        candidates = split_sources(bank, model.spatial_dims, model.in_channels)
        others = [s for s in candidates if not same_image(s, image)]
        if not others:
            raise ValueError("the patch bank has no image other than the explained one: choose other images")
        block = self.parameters.get("block_shape", 8)
        block = (block,) * model.spatial_dims if np.isscalar(block) else block
        size = bank_size(model.in_channels, block)
        left_out = " (the explained image left out)" if len(others) < len(candidates) else ""
        note = f"{where}: {size} crops from {len(others)} images{left_out}"
        sources = [model.prepare_image(s).numpy() for s in others]
        seed = self.parameters.get("seed", 0)
        return make_intervention("patch_bank", bank_sources=sources, size=size, seed=seed), note
