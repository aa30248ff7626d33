"""The result of a component-effect run: one ATE per component, its plot and storage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pdcr.components.enumerate import Component
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.plotting.components import plot_components

_ARRAYS = ("ate", "standard_error", "raw_mean", "n_draws", "status")


@dataclass
class ComponentExplanation:
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
    parameters: dict = field(default_factory=dict)
    model_identity: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    forward_passes: int = 0
    log: list[str] = field(default_factory=list)

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

    # ---------------------------------------------------------------- storage
    def _meta(self) -> dict:
        return {
            "kind": "component_explanation",
            "components": [c.describe() for c in self.components],
            "base_outcome": self.base_outcome,
            "parameters": self.parameters,
            "model_identity": self.model_identity,
            "provenance": self.provenance,
            "timings": self.timings,
            "forward_passes": self.forward_passes,
            "log": self.log,
        }

    def to_extras(self, prefix: str = "components") -> dict[str, np.ndarray]:
        """Plain arrays for ``RegionExplanation.extras`` (saved with the region explanation).

        Keys ``<prefix>_ate``, ``_standard_error``, ``_raw_mean``, ``_n_draws``,
        ``_status``, ``_target_region`` (uint8) and ``_meta`` (UTF-8 JSON as uint8).
        """
        meta = json.dumps(self._meta(), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        extras = {f"{prefix}_{name}": np.asarray(getattr(self, name)) for name in _ARRAYS}
        extras[f"{prefix}_target_region"] = self.target_region.astype(np.uint8)
        extras[f"{prefix}_meta"] = np.frombuffer(meta.encode(), dtype=np.uint8).copy()
        return extras

    @classmethod
    def from_extras(cls, extras: dict[str, np.ndarray], prefix: str = "components") -> ComponentExplanation:
        """Rebuild from :meth:`to_extras` output (e.g. a loaded ``RegionExplanation.extras``)."""
        key = f"{prefix}_meta"
        if key not in extras:
            raise KeyError(f"no component explanation under prefix {prefix!r}")
        meta = json.loads(np.asarray(extras[key], dtype=np.uint8).tobytes().decode())
        return cls(
            components=[Component.from_record(r) for r in meta["components"]],
            **{name: np.asarray(extras[f"{prefix}_{name}"]) for name in _ARRAYS},
            base_outcome=float(meta["base_outcome"]),
            target_region=np.asarray(extras[f"{prefix}_target_region"]).astype(bool),
            parameters=meta["parameters"],
            model_identity=meta["model_identity"],
            provenance=meta["provenance"],
            timings=meta["timings"],
            forward_passes=int(meta["forward_passes"]),
            log=list(meta["log"]),
        )

    def save(self, path) -> Path:
        """Write to ``path`` as an ``.npz`` of :meth:`to_extras` arrays (written atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, **self.to_extras())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> ComponentExplanation:
        with np.load(path, allow_pickle=False) as data:
            return cls.from_extras(dict(data))

    # ---------------------------------------------------------------- plot
    def plot(self, ax=None, top: int | None = 20, title: str | None = None):
        """Sorted bar chart of the ATEs with 95% error bars; returns the ``Axes``.

        See :func:`napari_pdcr.plotting.plot_components`.
        """
        return plot_components(self, ax, top=top, title=title)
