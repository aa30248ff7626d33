"""Network-component effects: interventions on the output activations of a model's modules.

``ComponentEffects(model).attribute(image, target_region, bank_images=...)`` gives the ATE
of every component (stage, block, skip connection, or channel of one layer) on the same
outcomes as region effects, through the same estimator. See ``docs/components.md``.
"""

from napari_pdcr.components.effects import ComponentEffects
from napari_pdcr.components.enumerate import (
    GRANULARITIES,
    Component,
    NotAModuleError,
    enumerate_components,
    format_components,
)
from napari_pdcr.components.explanation import ComponentExplanation
from napari_pdcr.components.interventions import (
    ACTIVATION_INTERVENTIONS,
    ActivationIntervention,
    MeanActivation,
    NoiseActivation,
    ResampleActivation,
    ZeroActivation,
    make_activation_intervention,
)
from napari_pdcr.components.nodes import ComponentNodes

__all__ = [
    "ACTIVATION_INTERVENTIONS",
    "GRANULARITIES",
    "ActivationIntervention",
    "Component",
    "ComponentEffects",
    "ComponentExplanation",
    "ComponentNodes",
    "MeanActivation",
    "NoiseActivation",
    "NotAModuleError",
    "ResampleActivation",
    "ZeroActivation",
    "enumerate_components",
    "format_components",
    "make_activation_intervention",
]
