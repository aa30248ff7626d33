"""napari layers -> the arrays a job takes (no Qt).

The same functions as the array inputs of :mod:`napari_pdcr.jobs` (``image_array``,
``region_mask``, ``region_name``, ``layer_geometry``), extended to Image, Labels and
Shapes layers; anything else is handed to the array version.
"""

from __future__ import annotations

import napari.layers
import numpy as np

from napari_pdcr import jobs
from napari_pdcr.jobs import component_at


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
    return jobs.image_array(image)


def image_spatial_shape(image) -> tuple[int, ...]:
    """Shape a mask drawn over ``image`` (layer or array) has: its shape without an RGB axis."""
    if _is_layer(image, "Image"):
        return tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
    return tuple(np.shape(image))


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
        return component_at(mask, point) if point is not None else mask
    array = layer_array(region) if _is_layer(region, "Labels") else region
    return jobs.region_mask(array, label=label, point=point)


def reference_mask(reference, label: int | None = None) -> np.ndarray:
    """A reference mask from a Labels layer or an array (see :func:`napari_pdcr.jobs.reference_mask`)."""
    return jobs.reference_mask(layer_array(reference) if _is_layer(reference, "Labels") else reference, label)


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
        return jobs.layer_geometry(image)
    n = len(image_spatial_shape(image))
    return {
        "name": image.name,
        "scale": [float(s) for s in image.scale[-n:]],
        "translate": [float(t) for t in image.translate[-n:]],
    }


def slice_geometry(geometry: dict, index: int) -> dict:
    """The geometry of slice ``index`` (first axis) of a stack layer's ``geometry`` (:func:`layer_geometry`):
    the last two axes, with ``slice`` recording the index and the first axis' scale and translate, so that
    results are shown on that slice (:func:`~napari_pdcr._napari.layers.explanation_layer_data`)."""
    return {
        **geometry,
        "scale": list(geometry["scale"][1:]),
        "translate": list(geometry["translate"][1:]),
        "slice": {"index": int(index), "scale": geometry["scale"][0], "translate": geometry["translate"][0]},
    }
