"""Derive napari-pdcr's small sample arrays from real MRI files shipped by Debian.

Sources (install with ``apt-get install mricron-data insighttoolkit5-examples``):

* Colin27 T1 (``ch2.nii.gz``, 181x217x181 uint8, 1 mm, MNI space) and its brain
  extraction ``ch2bet.nii.gz`` (brain mask = ``ch2bet > 0``), from ``mricron-data``.
* A second subject: ITK's ``KmeansTest_T1UCharRaw.nii.gz`` (128x128x62 coronal slices,
  2x2x3 mm) with ``KmeansTest_T1RawSkullStrip.nii.gz`` (brain mask = label > 0), from
  ``insighttoolkit5-examples``.

Every array is resampled with the files' affines onto one layout: axes ``(D, H, W)`` =
(inferior->superior, anterior->posterior, patient left->right), so axial slices show
anterior at the top and the patient's right on the right (neurological convention).
The ITK head is placed so that the centre of its brain-mask bounding box falls where
Colin27's does, on a grid of the same shape and spacing. Images are stored as uint8,
masks as uint8 0/1, with ``spacing`` in mm, in ``sample_data/arrays/*.npz``.

Run ``python sample_data/make_sample_data.py [--preview preview.png]``; the preview is a
montage of the derived arrays with mask outlines, for checking orientation by eye.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
OUT_DIR = Path(__file__).resolve().parent / "arrays"

SLICE_STRIDE = 4  # keep every 4th axial slice (1 mm grid) that contains brain
HELDOUT_EVERY = 4  # Colin27 stack positions 2, 6, 10, ... are held out from training
HELDOUT_OFFSET = 2


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array (float32, file axis order) and its 4x4 voxel->world (mm) affine."""
    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def layout_affine(shape, spacing: float, center_world) -> np.ndarray:
    """Voxel->world affine of a ``(D, H, W)`` = (S, P, R) grid centred on ``center_world``.

    ``d`` runs inferior->superior (+z), ``h`` anterior->posterior (-y), ``w`` left->right
    (+x), all in RAS world millimetres.
    """
    axes = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], dtype=float).T * spacing
    affine = np.eye(4)
    affine[:3, :3] = axes
    half_extent = axes @ ((np.asarray(shape, dtype=float) - 1) / 2)
    affine[:3, 3] = np.asarray(center_world, dtype=float) - half_extent
    return affine


def resample(volume, src_affine, dst_affine, dst_shape, order: int = 1) -> np.ndarray:
    """Resample ``volume`` (world mapping ``src_affine``) onto a ``dst_affine`` grid.

    Linear interpolation (``order=1``), zero outside the source. Axes that are
    downsampled are first smoothed with a Gaussian of sigma ``(factor - 1) / 2`` source
    voxels (as skimage's anti-aliasing) so that thin structures do not alias.
    """
    vox_to_vox = np.linalg.inv(src_affine) @ dst_affine
    dst_step_in_src = np.linalg.norm(vox_to_vox[:3, :3], axis=1)  # dst spacing / src spacing
    sigma = np.maximum(dst_step_in_src - 1.0, 0.0) / 2.0
    if np.any(sigma > 0):
        volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="constant")
    return ndimage.affine_transform(
        volume,
        vox_to_vox[:3, :3],
        offset=vox_to_vox[:3, 3],
        output_shape=tuple(dst_shape),
        order=order,
        mode="constant",
        cval=0.0,
    )


def mask_bbox_center(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of the centre of the bounding box of ``mask > 0``."""
    index = np.argwhere(mask > 0)
    center_voxel = (index.min(axis=0) + index.max(axis=0)) / 2
    return (affine @ np.append(center_voxel, 1.0))[:3]


def derive_subject(image, image_affine, mask, center_world, shape, spacing):
    """Image (uint8, 0-255 scale kept) and mask (uint8 0/1) on the ``layout_affine`` grid."""
    dst = layout_affine(shape, spacing, center_world)
    resampled = resample(image, image_affine, dst, shape)
    mask_fraction = resample((mask > 0).astype(np.float32), image_affine, dst, shape)
    return (
        np.clip(np.rint(resampled), 0, 255).astype(np.uint8),
        (mask_fraction >= 0.5).astype(np.uint8),
    )


def brain_slice_indices(mask: np.ndarray, stride: int) -> np.ndarray:
    """Axial indices ``d`` with brain, every ``stride``-th counted from the lowest one."""
    with_brain = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return np.arange(with_brain[0], with_brain[-1] + 1, stride)


def save(name: str, **arrays) -> Path:
    """Write ``arrays`` to ``OUT_DIR/name`` (compressed, no pickled objects)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    np.savez_compressed(path, **arrays)
    return path


def render_preview(path: Path) -> None:
    """Montage of every derived array's middle axial slice with the mask outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(OUT_DIR.glob("*.npz"))
    fig, axes = plt.subplots(2, len(files), figsize=(3.2 * len(files), 6.4))
    for column, file in enumerate(files):
        with np.load(file, allow_pickle=False) as data:
            image, mask = data["image"], data["mask"]
        if image.ndim == 3:
            axial = image[len(image) // 2], mask[len(image) // 2]
            mid_w = image.shape[2] // 2
            sagittal = image[::-1, :, mid_w], mask[::-1, :, mid_w]  # superior at the top
        else:
            axial = sagittal = (image, mask)
        for row, (img, msk) in enumerate((axial, sagittal)):
            ax = axes[row, column]
            ax.imshow(img, cmap="gray")
            ax.contour(msk, levels=[0.5], colors="r", linewidths=0.6)
            ax.set_title(
                f"{file.stem}\n{'axial' if row == 0 else 'sagittal'} {img.shape}", fontsize=7
            )
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preview", type=Path, help="also write a PNG montage here")
    args = parser.parse_args()

    colin, colin_affine = load_nifti(MRICRON / "ch2.nii.gz")
    colin_bet, _ = load_nifti(MRICRON / "ch2bet.nii.gz")
    itk, itk_affine = load_nifti(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
    itk_strip, _ = load_nifti(ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz")

    # Colin27's own 1 mm grid, reordered to (S, P, R): shape (181, 217, 181).
    shape_1mm = (colin.shape[2], colin.shape[1], colin.shape[0])
    colin_center = (colin_affine @ np.append((np.array(colin.shape) - 1) / 2, 1.0))[:3]
    # The ITK brain goes where Colin27's brain is within that field of view.
    itk_center = (
        colin_center
        + mask_bbox_center(itk_strip, itk_affine)
        - mask_bbox_center(colin_bet, colin_affine)
    )
    shape_2mm = tuple((np.array(shape_1mm) - 1) // 2 + 1)  # (91, 109, 91), same field of view
    spacing_1mm = np.array([1.0, 1.0, 1.0])
    spacing_2mm = np.array([2.0, 2.0, 2.0])

    subjects = {
        "colin27": (colin, colin_affine, colin_bet, colin_center),
        "itk_t1": (itk, itk_affine, itk_strip, itk_center),
    }
    for prefix, (image, affine, mask, center) in subjects.items():
        image_1mm, mask_1mm = derive_subject(image, affine, mask, center, shape_1mm, 1.0)
        image_2mm, mask_2mm = derive_subject(image, affine, mask, center, shape_2mm, 2.0)
        slice_index = brain_slice_indices(mask_1mm, SLICE_STRIDE)
        save(f"{prefix}_2mm.npz", image=image_2mm, mask=mask_2mm, spacing=spacing_2mm)
        stack = dict(
            image=image_1mm[slice_index],
            mask=mask_1mm[slice_index],
            spacing=spacing_1mm[1:],
            slice_index=slice_index,
        )
        if prefix != "colin27":  # the second subject is for evaluation only
            save(f"{prefix}_slices_1mm.npz", **stack)
        else:
            # The train/held-out split of the 2D demo models travels with the data.
            heldout = np.arange(len(slice_index)) % HELDOUT_EVERY == HELDOUT_OFFSET
            save(f"{prefix}_slices_1mm.npz", **stack, heldout=heldout)
            # The 2D sample: the held-out slice nearest the middle of the brain's extent.
            middle = (slice_index[0] + slice_index[-1]) / 2
            candidates = slice_index[heldout]
            d = int(candidates[np.argmin(np.abs(candidates - middle))])
            save(
                "colin27_slice_1mm.npz",
                image=image_1mm[d],
                mask=mask_1mm[d],
                spacing=spacing_1mm[1:],
                slice_index=np.array(d),
            )
    for file in sorted(OUT_DIR.glob("*.npz")):
        print(f"{file.name}: {file.stat().st_size / 1e6:.2f} MB")
    if args.preview:
        render_preview(args.preview)


if __name__ == "__main__":
    main()
