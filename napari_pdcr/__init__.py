"""napari-pdcr: explain segmentation models with causal interventions.

The core (models, interventions, outcomes, the effect engine, results I/O) needs no Qt
and no running napari; the napari plugin is a thin layer over it.
"""

__version__ = "0.1.0"

from napari_pdcr.comparison import compare_models
from napari_pdcr.components import ComponentEffects
from napari_pdcr.engine import Cancelled, NodeStatus, Progress
from napari_pdcr.explanation import RegionExplanation
from napari_pdcr.interventions import (
    Blur,
    CallableIntervention,
    Constant,
    ImageMean,
    Intervention,
    Noise,
    PatchBank,
    Zero,
    make_intervention,
)
from napari_pdcr.models import SegmentationModel
from napari_pdcr.outcomes import Outcome
from napari_pdcr.region_effects import RegionEffects, explain_region
from napari_pdcr.regions import BlockGrid, box_region, centered_box

__all__ = [
    "BlockGrid",
    "Blur",
    "CallableIntervention",
    "Cancelled",
    "ComponentEffects",
    "Constant",
    "ImageMean",
    "Intervention",
    "NodeStatus",
    "Noise",
    "Outcome",
    "PatchBank",
    "Progress",
    "RegionEffects",
    "RegionExplanation",
    "SegmentationModel",
    "Zero",
    "box_region",
    "centered_box",
    "compare_models",
    "explain_region",
    "make_intervention",
]
