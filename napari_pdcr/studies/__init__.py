"""Studies: several models, images or methods explained and compared.

``run(spec)`` runs a batch study (datasets x models x methods) on Dask and ``load(store)``
returns its table; ``compare_models`` / ``compare_methods`` compare on one image.
"""

from napari_pdcr.studies.comparison import ModelComparison, StrategyProfile, compare_models
from napari_pdcr.studies.methods import MethodComparison, compare_methods
from napari_pdcr.studies.runner import StudyReport, run
from napari_pdcr.studies.spec import SpecError, load_spec
from napari_pdcr.studies.store import load, open_task

__all__ = ["MethodComparison", "ModelComparison", "SpecError", "StrategyProfile", "StudyReport", "compare_methods",
           "compare_models", "load", "load_spec", "open_task", "run"]
