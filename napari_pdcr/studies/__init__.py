"""Studies: several models, images or methods explained and compared."""

from napari_pdcr.studies.comparison import ModelComparison, StrategyProfile, compare_models
from napari_pdcr.studies.methods import MethodComparison, compare_methods

__all__ = ["MethodComparison", "ModelComparison", "StrategyProfile", "compare_methods", "compare_models"]
