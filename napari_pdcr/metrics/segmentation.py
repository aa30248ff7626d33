"""Heatmaps as segmentations: a map's mask, scored against a mask (Dice, IoU, pointing game).

A classifier's heatmap (Grad-CAM, LRP, region effects, ...) says where the model looks;
read as a segmentation, its supporting part is a mask of the object. The map is first
turned to its supporting sign (:func:`~napari_pdcr.metrics.faithfulness.support_map`:
negative ATE supports, positive attribution supports), then thresholded:

- ``threshold="otsu"``: Otsu's threshold (scikit-image) of the supporting values;
- ``threshold=q`` with ``0 < q < 1``: the ``q`` quantile of the supporting values (the
  mask keeps the top ``1 - q`` of them).

Only supporting voxels (value > 0) can be in the mask. The mask is scored against a
reference (ground-truth) mask with Dice and IoU (MONAI's metrics), and the pointing game
(Zhang et al. 2018) asks whether the map's maximum lies inside the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from napari_pdcr.metrics.faithfulness import support_map
from napari_pdcr.validation import shown

#: the automatic threshold
OTSU = "otsu"


@dataclass(frozen=True)
class SegmentationScore:
    """How well a heatmap's mask matches a reference mask.

    ``dice`` and ``iou`` are in [0, 1]; ``pointing_hit``: the map's maximum lies inside
    the reference (dilated by ``tolerance`` voxels); ``threshold`` the supporting value the
    map was cut at and ``threshold_rule`` how it was chosen; ``mask_voxels`` and
    ``reference_voxels`` the masks' sizes.
    """

    dice: float
    iou: float
    pointing_hit: bool
    threshold: float
    threshold_rule: str
    mask_voxels: int
    reference_voxels: int

    def describe(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """One line for a person: ``Dice 0.71, IoU 0.55, pointing hit``."""
        return f"Dice {self.dice:.2f}, IoU {self.iou:.2f}, pointing {'hit' if self.pointing_hit else 'miss'}"


def checked_support(explanation, sign: str | None = None) -> np.ndarray:
    """The map of ``explanation`` (an explanation, or an array with ``sign``) with the supporting sign
    positive, float64; ``ValueError`` for an empty map, NaN or infinite values, or a constant map."""
    support = support_map(explanation, sign)
    if support.size == 0:
        raise ValueError("the map is empty: give a map of the image's spatial shape")
    if not np.isfinite(support).all():
        raise ValueError("the map contains NaN or infinite values: replace them (e.g. np.nan_to_num) before scoring it")
    if np.ptp(support) == 0:
        raise ValueError(f"the map has the same value ({support.flat[0]:g}) everywhere: it marks no region, so it "
                         "gives no mask (was the class score insensitive to every block?)")
    return support


def _reference(reference, shape: tuple[int, ...]) -> np.ndarray:
    """The reference mask as bool ``shape``; ``ValueError`` for another shape or an empty mask."""
    if reference is None:
        raise ValueError("no reference mask: give the ground-truth mask (e.g. the lesion's labels) to score against")
    mask = np.asarray(reference)
    if mask.shape != shape:
        raise ValueError(f"the reference mask has shape {mask.shape}, not the map's {shape}: give a mask of the image's grid")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("the reference mask is empty: Dice, IoU and the pointing game need an object to find "
                         "(score only images that contain one)")
    return mask


def heatmap_threshold(support: np.ndarray, threshold: str | float = OTSU) -> float:
    """The supporting value a map is cut at (see the module docstring), from the supporting values > 0."""
    positive = support[support > 0]
    if positive.size == 0:
        raise ValueError("the map has no supporting value (all are <= 0 in its supporting sign): it gives an empty mask")
    if isinstance(threshold, str):
        if threshold != OTSU:
            raise ValueError(f"threshold must be 'otsu' or a quantile between 0 and 1; got {shown(threshold)}")
        if np.ptp(positive) == 0:
            return float(positive[0])
        from skimage.filters import threshold_otsu

        return float(threshold_otsu(positive))
    q = float(threshold)
    if not 0 < q < 1:
        raise ValueError(f"a quantile threshold must be between 0 and 1 (exclusive); got {shown(threshold)}")
    return float(np.quantile(positive, q))


def heatmap_mask(explanation, threshold: str | float = OTSU, sign: str | None = None) -> tuple[np.ndarray, float]:
    """A heatmap's mask, bool ``S``, and the supporting value it was cut at.

    ``explanation``: a :class:`~napari_pdcr.explanations.RegionExplanation`, an
    :class:`~napari_pdcr.explanations.AttributionMap` or an array with ``sign``. The mask
    holds the supporting voxels at or above the threshold (Otsu's, or a quantile of the
    supporting values). ``ValueError`` for an empty, constant or non-finite map, or one
    without supporting values.
    """
    return _cut(checked_support(explanation, sign), threshold)


def _cut(support: np.ndarray, threshold: str | float) -> tuple[np.ndarray, float]:
    """The supporting voxels at or above the threshold of ``support``, and the threshold."""
    cut = heatmap_threshold(support, threshold)
    return (support >= cut) & (support > 0), cut


def dice_and_iou(mask: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks of one shape (MONAI's ``compute_dice`` / ``compute_iou``), in [0, 1]."""
    import torch
    from monai.metrics import compute_dice, compute_iou

    prediction = torch.as_tensor(np.asarray(mask, bool)[None, None], dtype=torch.float32)
    truth = torch.as_tensor(np.asarray(reference, bool)[None, None], dtype=torch.float32)
    return float(compute_dice(prediction, truth)[0, 0]), float(compute_iou(prediction, truth)[0, 0])


def pointing_hit(support: np.ndarray, reference: np.ndarray, tolerance: int = 0) -> bool:
    """Whether the map's maximum lies inside ``reference`` (grown by ``tolerance`` face-connected steps).

    ``support``: the map with its supporting sign positive. A maximum shared by several
    voxels (a block map) hits when any of them lies inside.
    """
    inside = np.asarray(reference, bool)
    if tolerance:
        from scipy.ndimage import binary_dilation

        inside = binary_dilation(inside, iterations=int(tolerance))
    return bool(inside[support == support.max()].any())


def score_heatmap(explanation, reference=None, threshold: str | float = OTSU, sign: str | None = None,
                  tolerance: int = 0) -> tuple[np.ndarray, SegmentationScore]:
    """The heatmap's mask (bool ``S``) and its :class:`SegmentationScore` against ``reference``.

    ``reference``: a bool mask of the map's shape; ``None``: the explanation's own
    reference (the ground truth given with the run). ``threshold``, ``sign``: see
    :func:`heatmap_mask`; ``tolerance``: of the pointing game (voxels). ``ValueError``
    for an empty reference, and as :func:`heatmap_mask`.
    """
    support = checked_support(explanation, sign)
    truth = _reference(getattr(explanation, "reference", None) if reference is None else reference, support.shape)
    mask, cut = _cut(support, threshold)
    dice, iou = dice_and_iou(mask, truth)
    rule = threshold if isinstance(threshold, str) else f"quantile {float(threshold):g}"
    return mask, SegmentationScore(
        dice=dice, iou=iou, pointing_hit=pointing_hit(support, truth, tolerance), threshold=cut,
        threshold_rule=rule, mask_voxels=int(mask.sum()), reference_voxels=int(truth.sum()),
    )
