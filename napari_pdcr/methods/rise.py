"""RISE (Petsiuk et al. 2018) for a region: random smooth masks weighted by the region outcome."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_pdcr.engine.composites import CompositeImages, iter_composite_outcomes
from napari_pdcr.engine.estimator import BatchRunner
from napari_pdcr.methods.attribution import BASELINES, AttributionMethod, baseline_image
from napari_pdcr.validation import positive_int, shown


class Rise(AttributionMethod):
    """Randomised input sampling: ``map = sum_i Y(x * m_i + fill * (1 - m_i)) m_i / (n_masks p)``.

    Parameters
    ----------
    n_masks
        The budget: masks, i.e. forward passes.
    cell_size
        Voxels per cell of the random binary grid (each mask is that grid, upsampled
        bi/trilinearly and shifted by a random offset below one cell).
    keep_probability
        ``p``: chance that a cell is kept.
    fill
        What replaces the masked part: ``"zero"`` (as published), ``"mean"`` or ``"blur"``.
    outcome
        The weight ``Y`` of a mask: an outcome in the target region (default the mean
        probability of the explained channel, in percent).
    seed, device, batch_size, memory_budget_mb
        See :class:`~napari_pdcr.methods.base.Method`; mask ``i`` is drawn from its own
        stream ``(seed, i)``, so the map does not depend on the batch size.

    Positive supports the region (the map is a weighted share of kept masks, in outcome units).
    """

    name = "rise"

    def __init__(self, model, n_masks: int = 1000, cell_size: int = 16, keep_probability: float = 0.5,
                 fill: str = "zero", outcome="mean_probability", **options):
        super().__init__(model, outcome=outcome, **options)
        self.n_masks = positive_int("n_masks", n_masks)
        self.cell_size = positive_int("cell_size", cell_size)
        p = float(keep_probability)
        if not 0 < p < 1:
            raise ValueError(f"keep_probability must be between 0 and 1 (exclusive); got {shown(keep_probability)}")
        if fill not in BASELINES:
            raise ValueError(f"fill must be one of {', '.join(BASELINES)}; got {shown(fill)}")
        self.keep_probability, self.fill = p, fill
        self.units = f"outcome ({self.outcome.kind}) weighted share of kept masks"

    def method_parameters(self) -> dict:
        return {"n_masks": self.n_masks, "cell_size": self.cell_size, "keep_probability": self.keep_probability,
                "fill": self.fill, "outcome": self.outcome.describe()}

    def mask(self, index: int, spatial: tuple[int, ...], device) -> torch.Tensor:
        """Mask ``index``: float32 ``spatial`` in [0, 1], from the stream ``(seed, index)``."""
        rng = np.random.default_rng([self.seed, index])
        cells = tuple(-(-n // self.cell_size) + 1 for n in spatial)
        grid = torch.from_numpy((rng.random(cells) < self.keep_probability).astype(np.float32)).to(device)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        smooth = F.interpolate(grid[None, None], size=tuple(c * self.cell_size for c in cells), mode=mode,
                               align_corners=False)[0, 0]
        shift = rng.integers(0, self.cell_size, size=len(spatial))
        return smooth[tuple(slice(int(s), int(s) + n) for s, n in zip(shift, spatial, strict=True))]

    def iter_map(self, score, x):
        spatial = tuple(x.shape[1:])
        composites = CompositeImages(
            score.model, x, baseline_image(x, self.fill), score.region.cpu().numpy(), self.outcome,
            masks=(self.n_masks, lambda i: self.mask(i, spatial, x.device)),
        )
        runner = BatchRunner(self.choose_batch_size(composites.item_bytes))
        saliency = torch.zeros(spatial, dtype=torch.float64, device=x.device)

        def accumulate(nodes, weights):
            masks = torch.stack([composites.sample(int(n), 1)[0] for n in nodes]).double()
            saliency.add_(torch.einsum("n,n...->...", weights.to(x.device), masks))

        yield from iter_composite_outcomes(composites, range(self.n_masks), runner, "rise", accumulate)
        return (saliency / (self.n_masks * self.keep_probability)).float().cpu().numpy(), runner.forward_passes
