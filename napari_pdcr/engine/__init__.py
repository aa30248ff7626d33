"""The effect engine: one estimator over nodes (input blocks, network components)."""

from napari_pdcr.engine.estimator import (
    BatchRunner,
    Cancelled,
    EstimatorSettings,
    NodeEstimates,
    NodeSet,
    NodeStatus,
    Progress,
    drive,
    estimate_effects,
)

__all__ = [
    "BatchRunner",
    "Cancelled",
    "EstimatorSettings",
    "NodeEstimates",
    "NodeSet",
    "NodeStatus",
    "Progress",
    "drive",
    "estimate_effects",
]
