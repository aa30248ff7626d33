"""Occlusion: the published ablation (zero, mean or blur of each block, one draw) on the block grid.

This is a thin method over :class:`~napari_pdcr.methods.region_effects.RegionEffects` in
``mode="published"`` with a deterministic intervention: one draw per block is the exact
effect, so occlusion is region effects with a fixed replacement. The result is an
:class:`~napari_pdcr.explanations.attribution.AttributionMap` of the voxel map of the
block effects (negative supports the region, as published).
"""

from __future__ import annotations

from napari_pdcr.explanations.attribution import NEGATIVE_SUPPORTS, AttributionMap
from napari_pdcr.explanations.base import COMMON_FIELDS
from napari_pdcr.explanations.region import MASKS
from napari_pdcr.methods.base import Method
from napari_pdcr.methods.region_effects import RegionEffects
from napari_pdcr.validation import shown

#: the fills of occlusion
OCCLUSION_FILLS = ("zero", "mean", "blur")
#: the region-effects modes that give occlusion's map exactly
EXACT_MODES = ("published", "exact")


class Occlusion(Method):
    """Occlude each block of the grid with ``fill`` and measure the change of the outcome.

    Parameters
    ----------
    fill
        ``"zero"``, ``"mean"`` (per-channel image mean) or ``"blur"`` (Gaussian, sigma 4).
    outcome, block_shape, tau
        As for :class:`~napari_pdcr.methods.region_effects.RegionEffects` (default: Dice
        points, blocks of 8, tau 0.02).
    mode
        ``"published"`` (default) or ``"exact"`` (the same map, with the exact
        accelerations of region effects: unreachable blocks skipped, the input cropped).
    seed, device, batch_size, memory_budget_mb, precision
        See :class:`~napari_pdcr.methods.base.Method`.
    """

    name = "occlusion"

    def __init__(self, model, fill: str = "zero", outcome="dice", block_shape=8, tau: float = 0.02,
                 precision: str = "float32", mode: str = "published", **options):
        if fill not in OCCLUSION_FILLS:
            raise ValueError(f"fill must be one of {', '.join(OCCLUSION_FILLS)}; got {shown(fill)}")
        if mode not in EXACT_MODES:
            raise ValueError(f"occlusion's mode must be one of {', '.join(EXACT_MODES)} (one draw: nothing to "
                             f"make adaptive); got {shown(mode)}")
        super().__init__(model, **options)
        self.fill = fill
        self.effects = RegionEffects(
            model, intervention=fill, outcome=outcome, block_shape=block_shape, tau=tau, mode=mode,
            precision=precision, seed=self.seed, device=self.device, batch_size=self.batch_size,
            memory_budget_mb=self.memory_budget_mb,
        )

    def method_parameters(self) -> dict:
        effects = self.effects.method_parameters()
        return {"fill": self.fill, **{key: effects[key] for key in ("outcome", "block_shape", "tau", "precision", "mode")}}

    def iter_attribute(self, image, target_region=None, reference=None):
        """The occlusion map as a generator of progress (see :meth:`Method.check_inputs`; a
        classifier needs no target region)."""
        effects = yield from self.effects.iter_attribute(image, target_region, reference)
        common = {name: getattr(effects, name) for name in COMMON_FIELDS}
        return AttributionMap(
            attribution=effects.ate,
            **{name: getattr(effects, name) for name in MASKS},
            method=self.name,
            sign=NEGATIVE_SUPPORTS,
            units="outcome change when the block is occluded (Dice points for the Dice outcome)",
            base_score=effects.base_outcome,
            **{**common, "parameters": {**effects.parameters, **self.parameters()}},
        )
