"""Network components as nodes: what a component is, what replaces its activation, the node set.

The method is :class:`~napari_pdcr.methods.ComponentEffects` and its result
:class:`~napari_pdcr.explanations.ComponentExplanation`; this package holds what they
intervene on: the enumeration of stages, blocks, skip connections and channels
(:mod:`.enumerate`), activation interventions (:mod:`.interventions`) and the nodes the
estimator runs (:mod:`.nodes`). See ``docs/components.md``.
"""

from napari_pdcr.components.enumerate import (
    GRANULARITIES,
    Component,
    NotAModuleError,
    enumerate_components,
    format_components,
)
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
