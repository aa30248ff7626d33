"""The result of a region-effect run and its summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.regions import BlockGrid

#: Published histogram bin edges (outcome units) besides +-tau.
PUBLISHED_EDGES = (3.0, 1.0, 0.3)


@dataclass
class RegionExplanation:
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
    parameters: dict = field(default_factory=dict)
    model_identity: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  #: versions, time, seed
    timings: dict = field(default_factory=dict)  #: seconds per phase
    #: images run through the model for the estimate, the reach probe and coarse screening
    #: (the few overhead passes - base outcome, window check, full prediction - are not counted)
    forward_passes: int = 0
    spacing: tuple[float, ...] | None = None  #: voxel size (e.g. mm) for distances
    log: list[str] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  #: further arrays saved with the result

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
        """Bool ``grid.shape``: blocks set to 0 by the screen."""
        return self.block_status == NodeStatus.SCREENED_OUT

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
            "forward_passes": self.forward_passes,
            "timings": self.timings,
        }

    # ---------------------------------------------------------------- I/O and viewer
    def save(self, path, overwrite: bool = True) -> Path:
        """Write to a result store (a ``.zarr`` folder) at ``path`` atomically; returns ``path``.

        A previous napari-pdcr result store at ``path`` is replaced unless ``overwrite`` is
        False; anything else there (a file, other folders, other zarr stores) is never touched:
        ``FileExistsError``. See :func:`napari_pdcr.io.results.write_store`.
        """
        from napari_pdcr.io.results import save_explanation

        return save_explanation(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> RegionExplanation:
        """Read a store written by :meth:`save` (``DamagedStoreError`` when it is damaged)."""
        from napari_pdcr.io.results import load_explanation

        return load_explanation(path)

    def add_to_viewer(self, viewer, source_layer=None, name: str | None = None, **options):
        """Add the ATE map (and optionally more) to a napari viewer; returns the new layers.

        ``source_layer``: the image layer explained, whose scale and translate the new
        layers copy. See :func:`napari_pdcr._napari.layers.explanation_layers`.
        """
        from napari_pdcr._napari.layers import add_explanation_layers

        return add_explanation_layers(viewer, self, source_layer=source_layer, name=name, **options)
