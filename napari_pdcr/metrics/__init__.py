"""Metrics of explanation maps: deletion and insertion curves on the region outcome; heatmaps as segmentations."""

from napari_pdcr.metrics.faithfulness import (
    Faithfulness,
    FaithfulnessCurves,
    block_ranking,
    support_map,
)
from napari_pdcr.metrics.segmentation import SegmentationScore, heatmap_mask, score_heatmap

__all__ = ["Faithfulness", "FaithfulnessCurves", "SegmentationScore", "block_ranking", "heatmap_mask", "score_heatmap",
           "support_map"]
