"""Segmentation models: the wrapper the engine uses, demo models and loaders."""

from napari_pdcr.models.base import SegmentationModel, hash_file, hash_module

__all__ = ["SegmentationModel", "hash_file", "hash_module"]
