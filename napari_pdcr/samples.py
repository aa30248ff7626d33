"""Bundled sample data: real T1 brain MRI with brain masks, small enough to ship.

Arrays are derived from Colin27 (Debian ``mricron-data``) and a second subject from
ITK's examples by ``sample_data/make_sample_data.py`` (notices in
``sample_data/NOTICE.md``). Every array uses one layout: volumes are ``(D, H, W)`` =
(inferior->superior, anterior->posterior, patient left->right), so axial slices show
anterior at the top and the patient's right on the right; 2D slices are ``(H, W)`` of
that layout and stacks ``(N, H, W)``. Spacing is in millimetres, in the same axis order.

No napari import here: the ``sample_layers_*`` functions return plain LayerData tuples.
"""

from __future__ import annotations

import numpy as np

from napari_pdcr._resources import sample_data_dir

_SAMPLES: dict[str, tuple[str, str]] = {
    "colin27_slice": (
        "colin27_slice_1mm.npz",
        "Colin27 T1, one axial slice through the middle of the brain at 1 mm (217x181), "
        "with its brain mask (ch2bet > 0); held out from the 2D demo models' training.",
    ),
    "colin27_slices": (
        "colin27_slices_1mm.npz",
        "Colin27 T1, every 4th axial slice containing brain at 1 mm (N x 217 x 181), with "
        "brain masks; training/held-out set of the 2D demo models and an image bank.",
    ),
    "colin27_volume": (
        "colin27_2mm.npz",
        "Colin27 T1 head at 2 mm (91x109x91), with its brain mask (ch2bet > 0).",
    ),
    "itk_slices": (
        "itk_t1_slices_1mm.npz",
        "Second subject (ITK KmeansTest T1, resampled from 2x2x3 mm), every 4th axial slice "
        "containing brain at 1 mm (N x 217 x 181), with its skull-strip brain mask.",
    ),
    "itk_volume": (
        "itk_t1_2mm.npz",
        "Second subject (ITK KmeansTest T1) head at 2 mm (91x109x91), with its skull-strip "
        "brain mask; never used for training the demo models.",
    ),
}


#: generated, not stored: :mod:`napari_pdcr.lesions` on the held-out subject
LESION_SAMPLE = "lesion_slices"
_LESION_DESCRIPTION = (
    "Second subject (ITK) at 2 mm (N x 112 x 96), each slice without and with one synthetic "
    "textured lesion (napari_pdcr.lesions, seed 0); mask = lesion mask; held out from the "
    "lesion classifiers' training."
)


def sample_names() -> list[str]:
    """Names accepted by :func:`load_sample`."""
    return [*_SAMPLES, LESION_SAMPLE]


def load_sample(name: str) -> dict:
    """Load a bundled sample.

    Returns a dict with ``image`` (float32 in [0, 1]; ``(H, W)``, ``(N, H, W)`` or
    ``(D, H, W)``), ``mask`` (uint8 0/1 brain mask, same shape), ``spacing`` (tuple of
    floats, mm per spatial axis of one image), ``name`` and ``description``. Slices and
    stacks also carry ``slice_index`` (int or ``(N,)``: axial index ``d`` on the 1 mm
    volume grid); the Colin27 stack carries ``heldout`` (``(N,)`` bool, see :func:`colin27_split`).

    ``lesion_slices`` is generated (:func:`napari_pdcr.lesions.make_lesion_set`): its
    ``mask`` is the lesion mask, and it also carries ``labels`` (``(N,)``, 1 = lesion) and
    ``brain_mask``.

    Raises ``KeyError`` naming the available samples for an unknown name.
    """
    if name == LESION_SAMPLE:
        return _lesion_sample()
    if name not in _SAMPLES:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(sample_names())}")
    filename, description = _SAMPLES[name]
    with np.load(sample_data_dir() / filename, allow_pickle=False) as data:
        sample = {
            "image": data["image"].astype(np.float32) / np.float32(255.0),
            "mask": data["mask"].astype(np.uint8),
            "spacing": tuple(float(s) for s in data["spacing"]),
            "name": name,
            "description": description,
        }
        for key in ("slice_index", "heldout"):
            if key in data.files:
                value = data[key]
                sample[key] = int(value) if value.ndim == 0 else value.copy()
    return sample


def _lesion_sample() -> dict:
    from napari_pdcr.lesions import (  # lesions builds on this module
        HELDOUT_SUBJECT,
        make_lesion_set,
    )

    lesions = make_lesion_set(HELDOUT_SUBJECT, copies=2, seed=0)
    return {
        "image": lesions.images, "mask": lesions.lesion_masks, "spacing": lesions.spacing, "name": LESION_SAMPLE,
        "description": _LESION_DESCRIPTION, "slice_index": lesions.slice_index, "labels": lesions.labels,
        "brain_mask": lesions.brain_masks,
    }


def colin27_split() -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out positions ``(N_train,)``, ``(N_heldout,)`` in ``colin27_slices``.

    The split is stored with the data (``heldout``: stack positions 2, 6, 10, ..., i.e.
    every 4th slice of the stack, so every held-out slice is 4 mm from the nearest
    training slice). The ``colin27_slice`` sample is one of the held-out slices.
    """
    heldout = load_sample("colin27_slices")["heldout"]
    return np.flatnonzero(~heldout), np.flatnonzero(heldout)


def _layers(name: str) -> list[tuple]:
    sample = load_sample(name)
    return [
        (
            sample["image"],
            {"name": f"{name} image", "scale": sample["spacing"], "colormap": "gray"},
            "image",
        ),
        (
            sample["mask"],
            {"name": f"{name} brain mask", "scale": sample["spacing"], "opacity": 0.4},
            "labels",
        ),
    ]


def sample_layers_2d() -> list[tuple]:
    """napari LayerData tuples ``[(image, kwargs, "image"), (mask, kwargs, "labels")]`` of
    the 2D Colin27 slice (1 mm)."""
    return _layers("colin27_slice")


def sample_layers_lesions() -> list[tuple]:
    """napari LayerData tuples ``[(image, kwargs, "image"), (lesion mask, kwargs, "labels")]``
    of the lesion stack (2 mm; even positions without, odd with a lesion)."""
    sample = load_sample(LESION_SAMPLE)
    return [
        (sample["image"], {"name": "lesion slices", "scale": sample["spacing"], "colormap": "gray"}, "image"),
        (sample["mask"], {"name": "lesion mask", "scale": sample["spacing"], "opacity": 0.5}, "labels"),
    ]


def sample_layers_3d() -> list[tuple]:
    """napari LayerData tuples ``[(image, kwargs, "image"), (mask, kwargs, "labels")]`` of
    the 3D Colin27 head (2 mm)."""
    return _layers("colin27_volume")
