"""napari-pdcr: explain segmentation models with causal interventions.

The core (models, interventions, outcomes, the effect engine, results I/O) needs no Qt
and no running napari; the napari plugin is a thin layer over it.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# Loaded by napari (napari imported, torch not yet): make OpenMP's idle threads sleep
# instead of spinning, so they do not take CPU from napari's event loop. libgomp reads
# this once, when torch is first imported; a value the user set is kept.
if "napari" in _sys.modules and "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from napari_pdcr.calibration import calibrate, fit_temperature
from napari_pdcr.engine import Cancelled, NodeStatus, Progress
from napari_pdcr.explanations import (
    AttributionMap,
    ComponentExplanation,
    Explanation,
    RegionExplanation,
)
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
from napari_pdcr.io import DamagedStoreError
from napari_pdcr.methods import (
    ComponentEffects,
    GradientXInput,
    IntegratedGradients,
    Lrp,
    Method,
    MiSuRe,
    Occlusion,
    RegionEffects,
    Rise,
    SegGradCam,
    explain_region,
)
from napari_pdcr.metrics import Faithfulness, score_heatmap
from napari_pdcr.models import SegmentationModel
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.outcomes import Outcome
from napari_pdcr.regions import BlockGrid, box_region, centered_box
from napari_pdcr.studies import compare_methods, compare_models
from napari_pdcr.studies.temperature_sweep import temperature_sweep

__all__ = [
    "AttributionMap",
    "BlockGrid",
    "Blur",
    "CallableIntervention",
    "Cancelled",
    "ComponentEffects",
    "ComponentExplanation",
    "Constant",
    "DamagedStoreError",
    "Explanation",
    "Faithfulness",
    "GradientXInput",
    "ImageMean",
    "IntegratedGradients",
    "Intervention",
    "Lrp",
    "Method",
    "MiSuRe",
    "NodeStatus",
    "Noise",
    "Occlusion",
    "Outcome",
    "PatchBank",
    "Progress",
    "RegionEffects",
    "RegionExplanation",
    "Rise",
    "SegGradCam",
    "SegmentationModel",
    "Zero",
    "box_region",
    "calibrate",
    "centered_box",
    "compare_methods",
    "compare_models",
    "explain_region",
    "fit_temperature",
    "load_demo_model",
    "make_intervention",
    "score_heatmap",
    "temperature_sweep",
]
