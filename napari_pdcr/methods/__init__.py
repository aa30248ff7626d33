"""Explanation methods: one class per method on the shared :class:`Method` base.

Each takes the model and its settings in the constructor and explains one input with
``attribute(...)`` (or ``iter_attribute(...)``, the same as a generator of progress).
"""

from napari_pdcr.methods.attribution import AttributionMethod
from napari_pdcr.methods.base import Method
from napari_pdcr.methods.component_effects import ComponentEffects
from napari_pdcr.methods.gradient_x_input import GradientXInput
from napari_pdcr.methods.integrated_gradients import IntegratedGradients
from napari_pdcr.methods.lrp import Lrp
from napari_pdcr.methods.misure import MiSuRe
from napari_pdcr.methods.occlusion import Occlusion
from napari_pdcr.methods.region_effects import RegionEffects, explain_region
from napari_pdcr.methods.region_score import RegionScore
from napari_pdcr.methods.rise import Rise
from napari_pdcr.methods.seg_grad_cam import SegGradCam

__all__ = [
    "AttributionMethod", "ComponentEffects", "GradientXInput", "IntegratedGradients", "Lrp", "Method", "MiSuRe", "Occlusion",
    "RegionEffects", "RegionScore", "Rise", "SegGradCam", "explain_region",
]
