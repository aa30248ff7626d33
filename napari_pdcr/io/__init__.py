"""Saving and loading results."""

from napari_pdcr.io.results import load_explanation, save_explanation

__all__ = ["load_explanation", "save_explanation"]
