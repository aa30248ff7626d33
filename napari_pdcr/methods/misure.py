"""MiSuRe-style minimal sufficient region (after Hasany et al. 2024) for a target region.

Two stages, on the image kept inside a mask ``m`` and replaced by a fill outside it
(``x * m + fill * (1 - m)``):

1. **Dilation**: the target region is dilated by ``dilation_step`` voxels at a time
   (Euclidean distance) until the region's Dice, the masked image's prediction against
   the unperturbed prediction inside the target region, reaches ``dice_threshold``.
   The radii run in batches; the first one that passes stops the stage.
2. **Optimisation**: a mask of one logit per cell of ``cell_size`` voxels, started from
   the dilated mask, upsampled bi/trilinearly to the image, minimises
   ``dice_weight * (1 - soft Dice) + l1_weight * mean(m) + tv_weight * TV(m)`` by Adam
   (sparse and smooth while still sufficient). After every step the binarised mask
   (``m > 0.5``) is scored with the hard Dice: the smallest binarised mask that passes
   the threshold is kept (**sufficiency is kept**); if none does, the dilated mask is.

The map is the kept soft mask (float32 ``S`` in [0, 1], positive supports): 1 inside the
minimal sufficient region. Its binarised version and the dilated mask are in the
result's ``extras`` (``sufficient_mask``, ``dilated_mask``), the radius and the Dice of
both stages in its ``log``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_pdcr.engine.composites import CompositeImages
from napari_pdcr.engine.estimator import BatchRunner, Progress
from napari_pdcr.methods.attribution import BASELINES, AttributionMethod, baseline_image
from napari_pdcr.validation import finite_float, positive_float, positive_int, shown

#: outcomes whose sufficiency MiSuRe can reach (a Dice, hard for the check, soft for the gradient)
SUFFICIENCY_OUTCOMES = ("dice", "soft_dice")


class MiSuRe(AttributionMethod):
    """The smallest, smoothest mask whose content alone keeps the target region's segmentation.

    Parameters
    ----------
    dice_threshold
        Dice (0-1] against the unperturbed prediction in the target region that the
        masked image must reach (the sufficiency criterion of both stages).
    fill
        What replaces the image outside the mask: ``"zero"`` (default), ``"mean"``
        (per-channel image mean) or ``"blur"`` (Gaussian, sigma 4 voxels).
    dilation_step
        Voxels added to the radius per dilation step.
    cell_size
        Voxels per cell of the optimised mask (its resolution; the block size is natural).
    n_iterations, learning_rate
        Adam steps of the optimisation and their learning rate (on the cells' logits).
    l1_weight, tv_weight, dice_weight
        Weights of the sparsity (mean mask value), smoothness (mean absolute difference
        of neighbouring voxels, summed over axes) and sufficiency (1 - soft Dice) terms.
    outcome
        ``"dice"`` (or an :class:`~napari_pdcr.outcomes.Outcome` of kind dice / soft
        dice, for its channel and temperature).
    seed, device, batch_size, memory_budget_mb
        See :class:`~napari_pdcr.methods.base.Method` (the method draws nothing at random).

    Every step is one forward pass (dilation) or a forward and backward pass plus one
    forward pass of the binarised mask (optimisation). The reference mask given to
    :meth:`attribute` is recorded, not used: MiSuRe explains the model's own prediction.
    """

    name = "misure"
    units = "mask value (1: in the minimal sufficient region, 0: replaced by the fill)"

    def __init__(self, model, dice_threshold: float = 0.9, fill: str = "zero", dilation_step: int = 2,
                 cell_size: int = 8, n_iterations: int = 100, learning_rate: float = 0.1, l1_weight: float = 1.0,
                 tv_weight: float = 1.0, dice_weight: float = 5.0, outcome="dice", **options):
        super().__init__(model, outcome=outcome, **options)
        if self.outcome.kind not in SUFFICIENCY_OUTCOMES:
            raise ValueError(f"MiSuRe's sufficiency is a Dice: outcome must be one of {', '.join(SUFFICIENCY_OUTCOMES)}; "
                             f"got {self.outcome.kind!r}")
        threshold = finite_float("dice_threshold", dice_threshold, minimum=0, strict=True)
        if threshold > 1:
            raise ValueError(f"dice_threshold is a Dice between 0 (exclusive) and 1; got {shown(dice_threshold)} "
                             "(give 0.9 rather than 90)")
        if fill not in BASELINES:
            raise ValueError(f"fill must be one of {', '.join(BASELINES)}; got {shown(fill)}")
        self.dice_threshold, self.fill = threshold, fill
        self.dilation_step = positive_int("dilation_step", dilation_step)
        self.cell_size = positive_int("cell_size", cell_size)
        self.n_iterations = positive_int("n_iterations", n_iterations)
        self.learning_rate = positive_float("learning_rate", learning_rate)
        self.l1_weight = finite_float("l1_weight", l1_weight, minimum=0)
        self.tv_weight = finite_float("tv_weight", tv_weight, minimum=0)
        self.dice_weight = positive_float("dice_weight", dice_weight)
        self.hard_outcome = replace(self.outcome, kind="dice")
        self.soft_outcome = replace(self.outcome, kind="soft_dice")
        self.stages: dict = {}  #: the last run: dilation radius, Dice of each stage, masks (see the module docstring)

    def method_parameters(self) -> dict:
        return {"dice_threshold": self.dice_threshold, "fill": self.fill, "dilation_step": self.dilation_step,
                "cell_size": self.cell_size, "n_iterations": self.n_iterations, "learning_rate": self.learning_rate,
                "l1_weight": self.l1_weight, "tv_weight": self.tv_weight, "dice_weight": self.dice_weight,
                "outcome": self.outcome.describe()}

    def iter_attribute(self, image, target_region, reference=None):
        """The map as a generator of progress (see :meth:`Method.check_inputs`); the masks of
        both stages go to ``extras``, their radius and Dice to ``log``."""
        explanation = yield from super().iter_attribute(image, target_region, reference)
        stages = self.stages
        explanation.extras.update(dilated_mask=stages["dilated_mask"].astype(np.uint8),
                                  sufficient_mask=stages["sufficient_mask"].astype(np.uint8))
        explanation.log += [
            f"dilation: radius {stages['radius']} voxels, Dice {stages['dilation_dice']:.1f} "
            f"(threshold {100 * self.dice_threshold:.1f}), {int(stages['dilated_mask'].sum())} voxels",
            f"optimisation: {stages['note']}, Dice {stages['sufficient_dice']:.1f}, "
            f"{int(stages['sufficient_mask'].sum())} voxels",
        ]
        return explanation

    def iter_map(self, score, x):
        t0 = time.perf_counter()
        spatial = tuple(x.shape[1:])
        region = score.region.cpu().numpy()
        fill = baseline_image(x, self.fill).clone()
        distance = ndimage.distance_transform_edt(~region)
        radii = np.arange(0, int(np.ceil(distance.max())) + self.dilation_step, self.dilation_step)

        def dilated(index: int) -> torch.Tensor:
            return torch.from_numpy(distance <= radii[index]).to(x.device, torch.float32)

        composites = CompositeImages(score.model, x, fill, region, self.hard_outcome, masks=(len(radii), dilated))
        needed = 100.0 * self.dice_threshold
        runner = BatchRunner(self.choose_batch_size(composites.item_bytes))
        passing, done = None, 0
        while passing is None:  # the largest radius keeps the whole image: it always passes
            nodes = list(range(done, min(done + runner.batch_size, len(radii))))
            dice = runner.run(composites, nodes, [dilated(i) for i in nodes]).numpy()
            hits = np.flatnonzero(dice >= needed)
            done = nodes[-1] + 1
            if hits.size:
                passing, dilation_dice = nodes[hits[0]], float(dice[hits[0]])
            yield Progress("misure: dilation", done, len(radii), runner.forward_passes, time.perf_counter() - t0)
        start = dilated(passing)

        def hard_dice(mask: torch.Tensor) -> float:
            return float(composites.outcomes([0], [mask])[0])

        cells = tuple(-(-n // self.cell_size) for n in spatial)
        pool = F.adaptive_avg_pool2d if len(spatial) == 2 else F.adaptive_avg_pool3d
        initial = pool(start[None, None], cells)[0, 0].clamp(0.1, 0.9)
        logits = torch.logit(initial).requires_grad_(True)
        optimiser = torch.optim.Adam([logits], lr=self.learning_rate)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        region_index = torch.from_numpy(np.flatnonzero(region)).to(x.device)
        reference = composites.scoring.reference.to(x.device)
        channel, activation = composites.scoring.channel, score.model.activation
        best_mask, kept, best_dice = start, start, dilation_dice
        note = "no binarised mask passed: the dilated mask is kept"
        passes = runner.forward_passes
        for step in range(self.n_iterations):
            with torch.enable_grad():
                mask = F.interpolate(torch.sigmoid(logits)[None, None], size=spatial, mode=mode,
                                     align_corners=False)[0, 0]
                scores = score.model((fill + mask * (x - fill))[None]).flatten(2)[:, :, region_index]
                soft = self.soft_outcome(scores, reference, activation, channel)[0] / 100.0
                smoothness = sum(mask.diff(dim=axis).abs().mean() for axis in range(mask.ndim))
                loss = self.dice_weight * (1 - soft) + self.l1_weight * mask.mean() + self.tv_weight * smoothness
                (gradient,) = torch.autograd.grad(loss, [logits])
            logits.grad = gradient
            optimiser.step()
            binary = (mask.detach() > 0.5).float()
            dice = hard_dice(binary)
            passes += 2
            if dice >= needed and binary.sum() < best_mask.sum():
                best_mask, best_dice, note = binary, dice, f"smallest sufficient binarised mask at step {step + 1}"
                kept = mask.detach().clone()
            yield Progress("misure: optimisation", step + 1, self.n_iterations, passes, time.perf_counter() - t0)
        self.stages = {"radius": float(radii[passing]), "dilation_dice": dilation_dice,
                       "dilated_mask": start.bool().cpu().numpy(), "sufficient_mask": best_mask.bool().cpu().numpy(),
                       "sufficient_dice": best_dice, "note": note}
        return kept.float().cpu().numpy(), passes
