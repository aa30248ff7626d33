"""A map-valued explanation: one value per voxel (Seg-Grad-CAM, integrated gradients, RISE, ...)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_pdcr.explanations.base import Explanation
from napari_pdcr.explanations.region import MASKS
from napari_pdcr.io.results import damaged, is_number, require_arrays, require_fields

#: sign conventions: which sign of the map means "this voxel supports the region's outcome"
POSITIVE_SUPPORTS, NEGATIVE_SUPPORTS = "positive_supports", "negative_supports"
SIGNS = (POSITIVE_SUPPORTS, NEGATIVE_SUPPORTS)
_FIELD_RULES = {
    "method": (lambda v: isinstance(v, str) and bool(v), "a method name"),
    "sign": (lambda v: v in SIGNS, f"one of {', '.join(SIGNS)}"),
    "units": (lambda v: isinstance(v, str), "a text"),
    "base_score": (is_number, "a number"),
}


@dataclass
class AttributionMap(Explanation):
    """A map of the image's spatial shape ``S`` explaining a model's output in a target region.

    ``sign`` says which sign supports the region: ``"positive_supports"`` for gradient
    maps and RISE (positive attribution raises the region score),
    ``"negative_supports"`` for ablation effects (removing the voxel's block lowers the
    outcome: a negative change), as published for region effects.
    """

    attribution: np.ndarray  #: float32 ``S``, in :attr:`units`
    target_region: np.ndarray  #: bool ``S``
    prediction: np.ndarray  #: the model's unperturbed thresholded prediction of the explained channel, bool ``S``
    reference: np.ndarray | None  #: the reference mask given by the user, bool ``S`` (None: the prediction)
    method: str  #: the method's name
    sign: str = POSITIVE_SUPPORTS
    units: str = ""  #: what a value means (e.g. "region logit sum per voxel")
    base_score: float = 0.0  #: the explained number on the unperturbed image (region score or outcome)

    kind = "attribution_map"

    def __post_init__(self):
        if self.sign not in SIGNS:
            raise ValueError(f"sign must be one of {', '.join(SIGNS)}; got {self.sign!r}")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.target_region.shape)

    def support(self) -> np.ndarray:
        """The map with the supporting sign positive, float32 ``S``."""
        return (self.attribution if self.sign == POSITIVE_SUPPORTS else -self.attribution).astype(np.float32)

    def summary(self) -> dict:
        finite = self.attribution[np.isfinite(self.attribution)]
        return {
            "method": self.method,
            "sign": self.sign,
            "base_score": self.base_score,
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "forward_passes": self.forward_passes,
            "timings": self.timings,
        }

    # ---------------------------------------------------------------- store
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"attribution": np.asarray(self.attribution, np.float32)}
        arrays.update({name: np.asarray(getattr(self, name), np.uint8) for name in MASKS if getattr(self, name) is not None})
        return arrays

    def meta(self) -> dict:
        return {"method": self.method, "sign": self.sign, "units": self.units, "base_score": self.base_score}

    @classmethod
    def from_store(cls, arrays, meta, **common) -> AttributionMap:
        return cls(
            attribution=arrays["attribution"],
            **{name: arrays[name].astype(bool) if name in arrays else None for name in MASKS},
            method=meta["method"], sign=meta["sign"], units=meta["units"], base_score=float(meta["base_score"]),
            **common,
        )

    @classmethod
    def check_store(cls, path, arrays, meta) -> None:
        """Arrays present with their dtypes, all of one spatial shape; fields valid."""
        require_arrays(path, arrays, {"attribution": np.float32, **dict.fromkeys(MASKS, np.uint8)}, optional=("reference",))
        require_fields(path, meta, _FIELD_RULES)
        spatial = arrays["target_region"].shape
        for name in ("attribution", "prediction", "reference"):
            if name in arrays and arrays[name].shape != spatial:
                raise damaged(path, f"array '{name}' has shape {arrays[name].shape}, not the target region's {spatial}")
