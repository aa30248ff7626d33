"""Where the files bundled with the package live, in a wheel and in a source checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def sample_data_dir() -> Path:
    """Folder holding the derived sample arrays (``*.npz``).

    A wheel carries them inside the package (``napari_pdcr/_sample_data``, see
    ``pyproject.toml``); a source checkout keeps them in ``sample_data/arrays`` next to
    the script that makes them.
    """
    for candidate in (_PACKAGE_DIR / "_sample_data", _PACKAGE_DIR.parent / "sample_data" / "arrays"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "napari-pdcr's sample data is missing: neither napari_pdcr/_sample_data (wheel) nor "
        "sample_data/arrays (source checkout) exists. Reinstall the package."
    )


def demo_weights_dir() -> Path:
    """Folder holding the demo models' state dicts (package data)."""
    return _PACKAGE_DIR / "models" / "weights"
