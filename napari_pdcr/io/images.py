"""Reading image files safely: NumPy (never unpickled), NIfTI (nibabel) and TIFF (tifffile).

Used by the command line, batch studies and scripts; every problem is an
:class:`ImageFileError` (a ``ValueError``) whose message names the file and the fix.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from napari_pdcr.validation import first_line

IMAGE_FORMATS = ".npy, .npz (array 'image'), .nii/.nii.gz (needs nibabel) or .tif/.tiff (needs tifffile)"
_NUMPY_HEADERS = (b"\x93NUMPY", b"PK\x03\x04")  # .npy magic, zip (.npz) magic


class ImageFileError(ValueError):
    """An image file that is missing, of an unsupported kind, damaged or not numeric."""


def file_stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` counts as one)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def read_image(path: Path, what: str = "image") -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A float32 array and its voxel spacing (None when the file has none) from an image file."""
    if not path.exists():
        raise ImageFileError(f"{what} {path} does not exist: check the path")
    if path.is_dir():
        raise ImageFileError(f"{what} {path} is a folder, not an image file: give a {IMAGE_FORMATS} file")
    name = path.name.lower()
    if name.endswith((".npy", ".npz")):
        array, spacing = _read_numpy(path, what)
    elif name.endswith((".nii", ".nii.gz")):
        array, spacing = _read_nifti(path, what)
    elif name.endswith((".tif", ".tiff")):
        array, spacing = _read_tiff(path, what), None
    else:
        raise ImageFileError(f"{what} {path} is not a supported image file: give a {IMAGE_FORMATS} file")
    if array.dtype.kind not in "biuf":
        raise ImageFileError(f"{what} {path} holds {array.dtype} values, not numbers: save a numeric array")
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ImageFileError(
            f"{what} {path} contains NaN or infinite values: replace them (numpy.nan_to_num)"
        )
    return array, spacing


def _read_numpy(path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    with path.open("rb") as file:
        head = file.read(6)
    if not head.startswith(_NUMPY_HEADERS):
        looks = "it looks like text" if _is_text(head) else "it has no NumPy header"
        raise ImageFileError(
            f"{what} {path} is not a NumPy .npy/.npz file ({looks}): "
            "save the array with numpy.save or numpy.savez"
        )
    try:
        if head.startswith(_NUMPY_HEADERS[0]):
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as data:
            key = "image" if "image" in data.files else (data.files[0] if len(data.files) == 1 else None)
            if key is None:
                raise ImageFileError(
                    f"{what} {path} has no array named 'image' (it has {', '.join(data.files) or 'none'}): "
                    "save it with numpy.savez(path, image=array)"
                )
            spacing = tuple(float(s) for s in data["spacing"]) if "spacing" in data.files else None
            return data[key], spacing
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ImageFileError(
                f"{what} {path} holds Python objects, not a numeric array, and napari-pdcr never "
                "unpickles image files: save it as a numeric array"
            ) from None
        raise ImageFileError(f"{what} {path} is damaged ({first_line(error)}): save it again") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ImageFileError(
            f"{what} {path} is damaged or truncated ({first_line(error)}): save it again"
        ) from None


def _read_nifti(path: Path, what: str) -> tuple[np.ndarray, tuple[float, ...]]:
    try:
        import nibabel
    except ImportError:
        raise ImageFileError(
            f"reading the NIfTI {what} {path} needs nibabel, which is not installed: "
            "pip install nibabel, or save the image as .npy"
        ) from None
    try:
        image = nibabel.load(path)
        array = np.asarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds for damaged files
        raise ImageFileError(f"{what} {path} is not a readable NIfTI file ({first_line(error)})") from None
    return array, tuple(round(float(z), 6) for z in image.header.get_zooms()[: array.ndim])


def _read_tiff(path: Path, what: str) -> np.ndarray:
    try:
        import tifffile
    except ImportError:
        raise ImageFileError(
            f"reading the TIFF {what} {path} needs tifffile, which is not installed: "
            "pip install tifffile, or save the image as .npy"
        ) from None
    try:
        return tifffile.imread(path)
    except Exception as error:  # noqa: BLE001 - tifffile raises many kinds for damaged files
        raise ImageFileError(f"{what} {path} is not a readable TIFF file ({first_line(error)})") from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in head.decode("utf-8"))
