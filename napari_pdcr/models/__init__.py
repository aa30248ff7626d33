"""Segmentation models: the wrapper the engine uses, demo models and loaders."""

from napari_pdcr.models.base import SegmentationModel, hash_file, hash_module
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.models.loading import ModelLoadError, UntrustedModelError, load_model
from napari_pdcr.models.sliding_window import SlidingWindow

__all__ = [
    "ModelDescription",
    "ModelLoadError",
    "SegmentationModel",
    "SlidingWindow",
    "UntrustedModelError",
    "hash_file",
    "hash_module",
    "load_model",
]
