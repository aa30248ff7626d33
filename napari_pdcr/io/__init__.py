"""Saving and loading results."""

from napari_pdcr.io.results import DamagedStoreError, load_explanation, save_explanation

__all__ = ["DamagedStoreError", "load_explanation", "save_explanation"]
