"""Faithfulness metrics of explanation maps: deletion and insertion curves on the region outcome."""

from napari_pdcr.metrics.faithfulness import (
    Faithfulness,
    FaithfulnessCurves,
    block_ranking,
    support_map,
)

__all__ = ["Faithfulness", "FaithfulnessCurves", "block_ranking", "support_map"]
