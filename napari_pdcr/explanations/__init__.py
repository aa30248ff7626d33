"""Results: every kind is an :class:`Explanation`, saved and loaded through one store format."""

from napari_pdcr.explanations.attribution import AttributionMap
from napari_pdcr.explanations.base import Explanation
from napari_pdcr.explanations.components import ComponentExplanation
from napari_pdcr.explanations.region import RegionExplanation

__all__ = ["AttributionMap", "ComponentExplanation", "Explanation", "RegionExplanation"]
