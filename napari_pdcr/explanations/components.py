"""The result of a component-effect run: one ATE per component, its table, plot and summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_pdcr.components.enumerate import Component
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.explanations.base import Explanation
from napari_pdcr.io.results import damaged, is_number, require_arrays, require_fields
from napari_pdcr.plotting.components import plot_components

#: the per-component arrays and their dtypes
COMPONENT_ARRAYS = {"ate": np.float64, "standard_error": np.float64, "raw_mean": np.float64,
                    "n_draws": np.int32, "status": np.int8}
_FIELD_RULES = {
    "base_outcome": (is_number, "a number"),
    "components": (lambda v: isinstance(v, list) and all(isinstance(r, dict) and "name" in r and "path" in r for r in v),
                   "a list of component records"),
}


@dataclass
class ComponentExplanation(Explanation):
    """Average treatment effects of network components on a model's outcome in a target region.

    Arrays have one entry per component, in the order of :attr:`components`. Effects are
    in outcome units (Dice points for the default outcome): negative where the
    component's own activation *supported* the outcome (replacing it lowers it),
    positive where it hurt it. ``|ATE| < tau`` is reported as 0 (see :attr:`status`).
    """

    components: list[Component]
    ate: np.ndarray  #: effect after the tau rule, float64
    standard_error: np.ndarray  #: standard error of the mean change, float64
    raw_mean: np.ndarray  #: mean change before the tau rule, float64
    n_draws: np.ndarray  #: draws behind each value, int32
    status: np.ndarray  #: :class:`~napari_pdcr.engine.NodeStatus` codes, int8
    base_outcome: float
    target_region: np.ndarray  #: bool ``S``

    kind = "component_explanation"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def order(self) -> np.ndarray:
        """Component indices by decreasing ``|ATE|`` (then by ``|raw mean|``)."""
        return np.lexsort((-np.abs(np.nan_to_num(self.raw_mean)), -np.abs(self.ate)))

    def table(self) -> list[dict]:
        """One row per component (in :meth:`order`): name, path, ATE, SE, draws, status."""
        return [
            {
                "name": self.components[i].name,
                "path": self.components[i].path,
                "ate": float(self.ate[i]),
                "standard_error": float(self.standard_error[i]),
                "n_draws": int(self.n_draws[i]),
                "status": NodeStatus(int(self.status[i])).name.lower(),
            }
            for i in self.order()
        ]

    def summary(self) -> dict:
        """Base outcome, counts of effects by sign and the table, JSON-serialisable."""
        estimated = self.status == NodeStatus.ESTIMATED
        return {
            "base_outcome": self.base_outcome,
            "n_components": len(self.components),
            "counts": {
                "positive": int((self.ate[estimated] > 0).sum()),
                "negative": int((self.ate[estimated] < 0).sum()),
                "zero": int(len(self.components) - (self.ate[estimated] != 0).sum()),
            },
            "table": self.table(),
            "forward_passes": self.forward_passes,
            "timings": self.timings,
        }

    # ---------------------------------------------------------------- store
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(getattr(self, name), dtype) for name, dtype in COMPONENT_ARRAYS.items()}
        arrays["target_region"] = np.asarray(self.target_region, np.uint8)
        return arrays

    def meta(self) -> dict:
        return {"components": [c.describe() for c in self.components], "base_outcome": self.base_outcome}

    @classmethod
    def from_store(cls, arrays, meta, **common) -> ComponentExplanation:
        return cls(
            components=[Component.from_record(r) for r in meta["components"]],
            **{name: arrays[name] for name in COMPONENT_ARRAYS},
            base_outcome=float(meta["base_outcome"]),
            target_region=arrays["target_region"].astype(bool),
            **common,
        )

    @classmethod
    def check_store(cls, path, arrays, meta) -> None:
        """Arrays present with their dtypes, one entry per component record."""
        require_arrays(path, arrays, {**COMPONENT_ARRAYS, "target_region": np.uint8})
        require_fields(path, meta, _FIELD_RULES)
        n = len(meta["components"])
        for name in COMPONENT_ARRAYS:
            if arrays[name].shape != (n,):
                raise damaged(path, f"array '{name}' has shape {arrays[name].shape}, but {n} components are recorded")
        try:
            [Component.from_record(r) for r in meta["components"]]
        except TypeError as error:
            raise damaged(path, f"a component record is malformed ({error})") from None

    # ---------------------------------------------------------------- plot
    def plot(self, ax=None, top: int | None = 20, title: str | None = None):
        """Sorted bar chart of the ATEs with 95% error bars; returns the ``Axes``.

        See :func:`napari_pdcr.plotting.plot_components`.
        """
        return plot_components(self, ax, top=top, title=title)
