"""The result of a region-effect run and its summaries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.explanations.base import Explanation
from napari_pdcr.io.results import damaged, is_number, positive_list, require_arrays, require_fields
from napari_pdcr.regions import BlockGrid

#: Published histogram bin edges (outcome units) besides +-tau.
PUBLISHED_EDGES = (3.0, 1.0, 0.3)
#: the per-block arrays and their dtypes
GRID_ARRAYS = {"block_effects": np.float32, "block_standard_error": np.float32,
               "block_draws": np.int32, "block_status": np.int8}
#: per-block uncertainty arrays (newer runs; absent from older stores, which load with None)
INTERVAL_ARRAYS = {"block_lower": np.float32, "block_upper": np.float32, "block_few_draws": np.uint8}
#: the masks (bool ``S``), stored as uint8; ``reference`` only when one was given
MASKS = ("target_region", "prediction", "reference")
_FIELD_RULES = {
    "block_shape": (positive_list(lambda v: isinstance(v, int) and not isinstance(v, bool)), "a list of positive integers"),
    "base_outcome": (is_number, "a number"),
    "spacing": (lambda v: v is None or positive_list(is_number)(v), "null or a list of positive numbers"),
}


@dataclass
class RegionExplanation(Explanation):
    """Average treatment effects of input blocks on a model's outcome in a target region.

    Per-block arrays have the grid's shape (``ceil(S / block_shape)`` per axis);
    :attr:`ate`, :attr:`standard_error` and :attr:`n_draws` broadcast them to the
    image's spatial shape ``S``. Effects are in outcome units (Dice points, 0-100, for
    the default outcome): negative where the block's content *supported* the outcome,
    positive where it hurt it. Blocks touching the target region are 0 (status TARGET).
    """

    block_effects: np.ndarray  #: ATE per block after the tau rule, float32
    block_standard_error: np.ndarray  #: standard error of each block's mean, float32
    block_draws: np.ndarray  #: draws behind each reported value, int32
    block_status: np.ndarray  #: :class:`NodeStatus` codes, int8
    block_shape: tuple[int, ...]
    target_region: np.ndarray  #: bool ``S``
    prediction: np.ndarray  #: the model's unperturbed thresholded prediction of the explained channel, bool ``S``
    reference: np.ndarray | None  #: the reference mask given by the user, bool ``S`` (None: the prediction)
    base_outcome: float  #: outcome of the unperturbed image
    spacing: tuple[float, ...] | None = None  #: voxel size (e.g. mm) for distances
    #: lower / upper end of each block's 95 % interval of its effect (before the tau rule), float32;
    #: heavy-tail-proof (a betting interval on the outcome's range); None in stores written before them
    block_lower: np.ndarray | None = None
    block_upper: np.ndarray | None = None
    #: the block's estimate rests on few draws (fewer than 10 sampled, or carried by one or two), bool
    block_few_draws: np.ndarray | None = None
    # forward_passes counts the images run for the estimate, the reach probe and coarse
    # screening (not the few overhead passes: base outcome, window check, full prediction)

    kind = "region_explanation"

    # ---------------------------------------------------------------- geometry
    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.target_region.shape)

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid.create(self.spatial_shape, self.block_shape)

    @property
    def ate(self) -> np.ndarray:
        """ATE map, float32 ``S`` (each voxel carries its block's effect)."""
        return self.grid.to_voxels(self.block_effects).astype(np.float32)

    @property
    def standard_error(self) -> np.ndarray:
        """Standard-error map, float32 ``S``."""
        return self.grid.to_voxels(self.block_standard_error).astype(np.float32)

    @property
    def n_draws(self) -> np.ndarray:
        """Draws per voxel's block, int32 ``S``."""
        return self.grid.to_voxels(self.block_draws).astype(np.int32)

    @property
    def screened_out(self) -> np.ndarray:
        """Bool ``grid.shape``: blocks set to 0 by the screen (after its few draws; not tested further)."""
        return self.block_status == NodeStatus.SCREENED_OUT

    @property
    def tested_zero(self) -> np.ndarray:
        """Bool ``grid.shape``: blocks given the full estimate whose mean was below tau (reported 0)."""
        return self.block_status == NodeStatus.BELOW_TAU

    @property
    def has_intervals(self) -> bool:
        """Whether the run recorded per-block intervals (stores written before them did not)."""
        return self.block_lower is not None and self.block_upper is not None

    # ---------------------------------------------------------------- summaries
    def _explained(self) -> np.ndarray:
        return self.block_status != NodeStatus.TARGET

    def counts(self) -> dict[str, int]:
        """Numbers of positive / negative / zero blocks (blocks touching the target excluded)."""
        values = self.block_effects[self._explained()]
        return {
            "positive": int((values > 0).sum()),
            "negative": int((values < 0).sum()),
            "zero": int((values == 0).sum()),
        }

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Block-effect histogram with the published edges (+-3, +-1, +-0.3, +-tau).

        Returns ``(edges, counts)``: ``edges`` has 10 entries from -inf to inf, counts 9.
        Bins are by magnitude and mirror each other: a value on an edge belongs to the bin
        farther from zero (as the tau rule keeps ``|ATE| >= tau``), so the middle bin
        ``(-tau, tau)`` holds exactly the zero blocks of an engine result.
        """
        tau = abs(float(self.parameters.get("tau", 0.02)))
        magnitudes = np.array(sorted({tau, *PUBLISHED_EDGES}))
        edges = np.concatenate([[-np.inf], -magnitudes[::-1], magnitudes, [np.inf]])
        values = self.block_effects[self._explained()]
        # compare in the map's precision, so that a kept effect of exactly tau stored as
        # float32 is not rounded into the zero bin
        level = np.searchsorted(magnitudes.astype(values.dtype), np.abs(values), side="right")
        level[values == 0] = 0
        middle = len(magnitudes)
        counts = np.bincount(middle + np.sign(values).astype(np.int64) * level, minlength=2 * middle + 1)
        return edges, counts

    def block_distances(self) -> np.ndarray:
        """Distance of each block's centre from the target region, ``grid.shape`` (spacing units)."""
        return self.grid.block_distances(self.target_region, self.spacing)

    def effect_vs_distance(self, n_bins: int = 12) -> dict[str, np.ndarray]:
        """Absolute effect against distance from the target region.

        Returns ``bin_edges`` (n_bins + 1), ``mean_abs_effect`` and ``abs_effect_share`` per
        bin, and ``cumulative_share``: the share of all absolute effect within each upper
        edge (the locality curve).
        """
        explained = self._explained()
        dist = self.block_distances()[explained]
        mag = np.abs(self.block_effects[explained]).astype(np.float64)
        edges = np.linspace(0.0, float(dist.max()) if dist.size else 1.0, n_bins + 1)
        which = np.clip(np.digitize(dist, edges[1:-1]), 0, n_bins - 1)
        total = mag.sum()
        sums = np.bincount(which, weights=mag, minlength=n_bins)
        counts = np.bincount(which, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_abs = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        share = sums / total if total > 0 else np.zeros(n_bins)
        return {
            "bin_edges": edges,
            "mean_abs_effect": mean_abs,
            "abs_effect_share": share,
            "cumulative_share": np.cumsum(share),
        }

    def locality(self, distance: float) -> float:
        """Share of the total absolute effect in blocks within ``distance`` of the region (NaN if no effect)."""
        explained = self._explained()
        mag = np.abs(self.block_effects[explained]).astype(np.float64)
        total = mag.sum()
        if total == 0:
            return float("nan")
        return float(mag[self.block_distances()[explained] <= distance].sum() / total)

    def summary(self) -> dict:
        """Counts, histogram and run figures as a JSON-serialisable dict."""
        edges, counts = self.histogram()
        return {
            "base_outcome": self.base_outcome,
            "counts": self.counts(),
            "histogram_edges": [float(e) for e in edges],
            "histogram_counts": [int(c) for c in counts],
            "n_blocks": int(self.block_effects.size),
            "status_counts": {s.name.lower(): int((self.block_status == s).sum()) for s in NodeStatus},
            "few_draws": None if self.block_few_draws is None else int(np.count_nonzero(self.block_few_draws)),
            "forward_passes": self.forward_passes,
            "timings": self.timings,
        }

    # ---------------------------------------------------------------- store
    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(getattr(self, name), dtype) for name, dtype in GRID_ARRAYS.items()}
        arrays.update({name: np.asarray(getattr(self, name), np.uint8) for name in MASKS if getattr(self, name) is not None})
        arrays.update({name: np.asarray(getattr(self, name), dtype) for name, dtype in INTERVAL_ARRAYS.items()
                       if getattr(self, name) is not None})
        return arrays

    def meta(self) -> dict:
        return {
            "block_shape": list(self.block_shape),
            "base_outcome": self.base_outcome,
            "spacing": list(self.spacing) if self.spacing is not None else None,
        }

    @classmethod
    def from_store(cls, arrays, meta, **common) -> RegionExplanation:
        return cls(
            **{name: arrays[name] for name in GRID_ARRAYS},
            **{name: arrays[name].astype(bool) if name in arrays else None for name in MASKS},
            block_lower=arrays.get("block_lower"),
            block_upper=arrays.get("block_upper"),
            block_few_draws=arrays["block_few_draws"].astype(bool) if "block_few_draws" in arrays else None,
            block_shape=tuple(meta["block_shape"]),
            base_outcome=float(meta["base_outcome"]),
            spacing=tuple(meta["spacing"]) if meta["spacing"] is not None else None,
            **common,
        )

    @classmethod
    def check_store(cls, path, arrays, meta) -> None:
        """Arrays present with their dtypes; masks, ``block_shape`` and grid arrays agree."""
        require_arrays(path, arrays, {**GRID_ARRAYS, **dict.fromkeys(MASKS, np.uint8), **INTERVAL_ARRAYS},
                       optional=("reference", *INTERVAL_ARRAYS))
        require_fields(path, meta, _FIELD_RULES)
        spatial = arrays["target_region"].shape
        for name in ("prediction", "reference"):
            if name in arrays and arrays[name].shape != spatial:
                raise damaged(path, f"array '{name}' has shape {arrays[name].shape}, not the target region's {spatial}")
        block_shape = meta["block_shape"]
        for name, value in (("block_shape", block_shape), ("spacing", meta["spacing"] or spatial)):
            if len(value) != len(spatial):
                raise damaged(path, f"the field '{name}' {value} has {len(value)} axes, but the masks {spatial} have "
                                    f"{len(spatial)}")
        grid = BlockGrid.create(spatial, block_shape).shape
        for name in (*GRID_ARRAYS, *(a for a in INTERVAL_ARRAYS if a in arrays)):
            if arrays[name].shape != grid:
                raise damaged(path, f"array '{name}' has shape {arrays[name].shape}, but block_shape {block_shape} "
                                    f"on masks of shape {spatial} makes a {grid} grid")
        unknown = np.setdiff1d(arrays["block_status"], [int(s) for s in NodeStatus])
        if unknown.size:
            raise damaged(path, f"array 'block_status' holds codes {unknown.tolist()} that are no NodeStatus")
