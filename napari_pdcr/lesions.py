"""A reproducible synthetic lesion task on the bundled real T1 MRI slices.

Textured, soft-edged ellipses of varying size, contrast, orientation and position are
inserted into the brain tissue of the real axial slices of both bundled subjects
(``colin27_slices`` and the second subject ``itk_slices``, :mod:`napari_pdcr.samples`).
Each slice appears ``copies`` times (a fresh intensity gamma each time); odd copies carry
one lesion, even copies none, so the labels are balanced per slice and a classifier
cannot tell the classes apart by the slice's anatomy. The image label is "lesion
present"; the lesion masks are the ground truth for scoring heatmaps.

Slices are block-averaged to 2 mm and zero-padded to :data:`SHAPE` (a multiple of 32),
which keeps the demo classifiers CPU-cheap. Every draw comes from a generator seeded by
``(seed, subject, slice position, copy)``: the same seed gives the same set, whatever
subset is asked for. Colin27 is the training subject; the second subject is held out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_pdcr.samples import load_sample

#: subject name -> bundled sample of its 1 mm axial slices
SUBJECTS = {"colin27": "colin27_slices", "itk": "itk_slices"}
TRAIN_SUBJECT = "colin27"
HELDOUT_SUBJECT = "itk"
#: in-plane pixel size of the lesion images, mm
SPACING_MM = 2.0
#: ``(H, W)`` of the lesion images (2 mm pixels; a multiple of 32)
SHAPE = (128, 96)
#: slices with less brain than this (pixels at 2 mm, i.e. 4 mm^2 each) are left out
MIN_BRAIN_PIXELS = 750
#: lesion semi-axes, pixels at 2 mm (6-16 mm)
SEMI_AXIS_RANGE = (3.0, 8.0)
#: added intensity at the lesion centre (images are in [0, 1])
CONTRAST_RANGE = (0.25, 0.6)


@dataclass(frozen=True)
class LesionSet:
    """Images with and without one inserted lesion.

    ``images``: float32 ``(N, H, W)`` in [0, 1]; ``labels``: int64 ``(N,)``, 1 = lesion
    present; ``lesion_masks`` and ``brain_masks``: uint8 0/1 ``(N, H, W)``;
    ``slice_index``: ``(N,)`` axial index on the subject's 1 mm grid; ``copy``: ``(N,)``
    which copy of that slice; ``subject``, ``seed``; ``spacing``: mm per pixel ``(H, W)``.
    """

    images: np.ndarray
    labels: np.ndarray
    lesion_masks: np.ndarray
    brain_masks: np.ndarray
    slice_index: np.ndarray
    copy: np.ndarray
    subject: str
    seed: int
    spacing: tuple[float, float] = (SPACING_MM, SPACING_MM)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions) -> LesionSet:
        """The images at ``positions`` (indices or a boolean mask), as a new set."""
        pick = np.asarray(positions)
        return LesionSet(
            self.images[pick], self.labels[pick], self.lesion_masks[pick], self.brain_masks[pick],
            self.slice_index[pick], self.copy[pick], self.subject, self.seed, self.spacing,
        )


def _to_grid(slices: np.ndarray) -> np.ndarray:
    """``(N, 217, 181)`` 1 mm slices -> ``(N, *SHAPE)`` by 2x2 block means, zero-padded evenly."""
    n, h, w = slices.shape
    blocks = slices[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    pad_h, pad_w = SHAPE[0] - blocks.shape[1], SHAPE[1] - blocks.shape[2]
    return np.pad(blocks, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))


def _insert_lesion(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One textured ellipse inside ``brain``: returns the new image and the lesion mask ``(H, W)``."""
    a, b = rng.uniform(*SEMI_AXIS_RANGE, size=2)
    angle = rng.uniform(0.0, np.pi)
    contrast = rng.uniform(*CONTRAST_RANGE)
    depth = ndimage.distance_transform_edt(brain)
    inside = np.argwhere(depth > max(a, b) + 1.0)
    if len(inside) == 0:  # a thin slice: the deepest pixels
        inside = np.argwhere(depth >= depth.max())
    cy, cx = inside[rng.integers(len(inside))]
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    profile = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.12))  # soft edge, 0.5 on the ellipse
    texture = ndimage.gaussian_filter(rng.standard_normal(image.shape), 1.0)
    texture = 1.0 + 0.35 * texture / (texture.std() + 1e-12)
    lesioned = np.clip(image + contrast * profile * texture * brain, 0.0, 1.0)
    return lesioned.astype(np.float32), ((profile >= 0.5) & (brain > 0)).astype(np.uint8)


def make_lesion_set(subject: str, *, copies: int = 4, seed: int = 0) -> LesionSet:
    """The lesion set of ``subject`` (``"colin27"`` or ``"itk"``), deterministic from ``seed``.

    Every slice with at least :data:`MIN_BRAIN_PIXELS` of brain appears ``copies`` times
    (even copies without, odd copies with a lesion). ``copies`` must be a positive even
    number so that the classes are balanced.
    """
    if subject not in SUBJECTS:
        raise ValueError(f"unknown lesion subject {subject!r}; choose one of {', '.join(SUBJECTS)}")
    if not isinstance(copies, int | np.integer) or copies < 2 or copies % 2:
        raise ValueError(f"copies must be a positive even integer (half with a lesion), got {copies!r}")
    sample = load_sample(SUBJECTS[subject])
    images = _to_grid(sample["image"])
    brains = (_to_grid(sample["mask"].astype(np.float32)) >= 0.5).astype(np.uint8)
    keep = np.flatnonzero(brains.sum(axis=(1, 2)) >= MIN_BRAIN_PIXELS)
    subject_number = list(SUBJECTS).index(subject)
    out_images, out_labels, out_lesions, out_brains, out_slices, out_copies = [], [], [], [], [], []
    for position in keep:
        for copy in range(copies):
            rng = np.random.default_rng([seed, subject_number, int(position), copy])
            image = images[position] ** rng.uniform(0.8, 1.25)
            lesion = np.zeros(SHAPE, np.uint8)
            if copy % 2:
                image, lesion = _insert_lesion(image, brains[position], rng)
            out_images.append(image.astype(np.float32))
            out_labels.append(copy % 2)
            out_lesions.append(lesion)
            out_brains.append(brains[position])
            out_slices.append(int(sample["slice_index"][position]))
            out_copies.append(copy)
    return LesionSet(
        np.stack(out_images), np.asarray(out_labels, np.int64), np.stack(out_lesions), np.stack(out_brains),
        np.asarray(out_slices), np.asarray(out_copies), subject, seed,
    )


def lesion_split(*, train_copies: int = 16, heldout_copies: int = 4, seed: int = 0) -> tuple[LesionSet, LesionSet]:
    """``(train, heldout)``: the Colin27 lesion set for training, the second subject's held out."""
    return (
        make_lesion_set(TRAIN_SUBJECT, copies=train_copies, seed=seed),
        make_lesion_set(HELDOUT_SUBJECT, copies=heldout_copies, seed=seed),
    )
