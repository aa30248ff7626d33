"""Several explanation methods on the same model, image and region, scored for faithfulness.

Usage (console or script)::

    from napari_pdcr import compare_methods
    result = compare_methods("unet2d", image, region, methods=["region_effects", "seg_grad_cam", "rise"])
    result.maps["seg_grad_cam"].attribution      # float32 S
    result.table                                   # AUCs and wall time per method
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_pdcr.engine.estimator import Progress, drive, relay
from napari_pdcr.explanations.base import Explanation
from napari_pdcr.interventions import Blur
from napari_pdcr.methods.base import Method
from napari_pdcr.methods.gradient_x_input import GradientXInput
from napari_pdcr.methods.integrated_gradients import IntegratedGradients
from napari_pdcr.methods.lrp import Lrp
from napari_pdcr.methods.misure import MiSuRe
from napari_pdcr.methods.occlusion import Occlusion
from napari_pdcr.methods.region_effects import RegionEffects
from napari_pdcr.methods.rise import Rise
from napari_pdcr.methods.seg_grad_cam import SegGradCam
from napari_pdcr.metrics.faithfulness import Faithfulness, FaithfulnessCurves, support_map

logger = logging.getLogger(__name__)

#: the methods by name, in the order they are shown
METHODS: dict[str, type[Method]] = {
    "region_effects": RegionEffects,
    "seg_grad_cam": SegGradCam,
    "integrated_gradients": IntegratedGradients,
    "gradient_x_input": GradientXInput,
    "occlusion": Occlusion,
    "rise": Rise,
    "misure": MiSuRe,
    "lrp": Lrp,
}
#: the methods that explain classifiers only (their constructor refuses a segmentation model)
CLASSIFIER_ONLY = ("lrp",)


def methods_for(model) -> list[str]:
    """The names of :data:`METHODS` that explain ``model`` (a loaded model): LRP for classifiers only."""
    return [name for name in METHODS if model.is_classifier or name not in CLASSIFIER_ONLY]


@dataclass
class MethodComparison:
    """Maps, faithfulness curves and the AUC table of several methods on one image and region."""

    maps: dict[str, Explanation]  #: method name -> its explanation (a map of the image's spatial shape)
    curves: FaithfulnessCurves
    #: one row per method (and the random floor): AUCs, ``ranked`` / ``note`` (a constant map has no
    #: ranking: its AUCs are the random floor's), wall time (s), forward passes
    table: list[dict]

    def support_maps(self) -> dict[str, np.ndarray]:
        """Every map with the supporting sign positive, divided by its largest magnitude: float32 ``S`` in [-1, 1]."""
        out = {}
        for name, explanation in self.maps.items():
            support = support_map(explanation)
            peak = float(np.abs(support).max())
            out[name] = (support / peak if peak > 0 else support).astype(np.float32)
        return out


def build_method(name: str, model, bank, block_shape, seed: int, device) -> Method:
    """Method ``name`` of :data:`METHODS` with the comparison's block grid, seed and device."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} or pass Method objects")
    common = dict(seed=seed, device=device)
    if name == "region_effects":
        return RegionEffects(model, intervention=bank, block_shape=block_shape, **common)
    if name == "occlusion":
        return Occlusion(model, block_shape=block_shape, **common)
    return METHODS[name](model, **common)


def iter_compare_methods(
    model, image, target_region, methods: Sequence[str | Method] | None = None, reference=None,
    block_shape=8, bank=None, n_steps: int | None = 20, n_random: int = 3, seed: int = 0, device="auto",
) -> Generator[Progress, None, MethodComparison]:
    """:func:`compare_methods` as a generator of progress (stage names say which method runs)."""
    from napari_pdcr.jobs import model_input, patch_bank, resolve_model

    model = resolve_model(model)
    image = model_input(np.asarray(image, dtype=np.float32), model)
    bank_intervention, _ = patch_bank(model, image, bank, block_shape=block_shape, seed=seed)
    chosen = [build_method(m, model, bank_intervention, block_shape, seed, device) if isinstance(m, str) else m
              for m in (methods if methods is not None else methods_for(model))]
    if not chosen:
        raise ValueError("give at least one method to compare")
    names = [m.name for m in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"methods {names} repeat a name: compare each method once")
    metric = Faithfulness(model, fills={"patch_bank": bank_intervention, "blur": Blur()}, block_shape=block_shape,
                          n_steps=n_steps, n_random=n_random, constant_maps="random", seed=seed, device=device)
    maps, wall = {}, {}
    for method in chosen:
        t0 = time.perf_counter()
        maps[method.name] = yield from relay(method.iter_attribute(image, target_region, reference),
                                             lambda p, name=method.name: Progress(f"{name}: {p.stage}", p.done, p.total,
                                                                                  p.forward_passes, p.elapsed_s))
        wall[method.name] = time.perf_counter() - t0
    curves = yield from metric.iter_evaluate(image, target_region, maps, reference)
    for name, note in curves.unranked.items():
        logger.info("compare_methods: the map of %s has %s", name, note)
    table = curves.table()
    for row in table:
        explanation = maps.get(row["method"])
        row["wall_s"] = wall.get(row["method"])
        row["forward_passes"] = explanation.forward_passes if explanation is not None else None
    return MethodComparison(maps=maps, curves=curves, table=table)


def compare_methods(model, image, target_region, methods: Sequence[str | Method] | None = None, reference=None,
                    block_shape=8, bank=None, n_steps: int | None = 20, n_random: int = 3, seed: int = 0,
                    device="auto", progress=None) -> MethodComparison:
    """Explain one region with several methods and score every map's faithfulness.

    Parameters
    ----------
    model
        A :class:`~napari_pdcr.models.SegmentationModel`, a demo name or a model file.
    image, target_region, reference
        ``(C, *S)`` (or ``S``) raw image, bool ``S`` region, optional bool ``S`` reference.
    methods
        Names from :data:`METHODS` or :class:`~napari_pdcr.methods.Method` objects
        (default: every one that explains the model, :func:`methods_for`). Region effects use a patch bank of other images and
        ``block_shape``; the gradient methods the default bottleneck layer.
    block_shape, bank, n_steps, n_random, seed, device
        The block grid of region effects, occlusion and the curves; the patch-bank
        images (None: the bundled ones); see :class:`~napari_pdcr.metrics.Faithfulness`.
    progress
        ``progress(Progress)`` after every batch; returning False cancels.

    Returns a :class:`MethodComparison`: the maps, the deletion / insertion curves (fills:
    natural patches and blur) and the table of AUCs, wall time and forward passes. A map
    that is constant outside the region (e.g. an all-zero causal map when no block there
    can reach the region) ranks nothing: it is scored as the random floor, flagged
    ``ranked=False`` in the table and listed in ``curves.unranked`` (and logged).
    """
    return drive(iter_compare_methods(model, image, target_region, methods, reference, block_shape, bank, n_steps,
                                      n_random, seed, device), progress)
