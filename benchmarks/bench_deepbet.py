"""deepbet (a real pretrained 3D TorchScript network) explained on Colin27: cost and fidelity.

Loads deepbet's brain-extraction network from its wheel (``pip install --no-deps deepbet``
plus ``fill_voids connected-components-3d fastremap``, or ``pip install
napari-pdcr[deepbet]``), explains a 16^3-voxel region of the bundled Colin27 volume
(2 mm; ``--spacing 1`` resamples it to 1 mm) with the zero intervention, and reports the
cost estimate, forward passes, wall time and peak memory of the run, and its fidelity:
the effect of ``--subset`` blocks recomputed by hand (zero the block, run the whole
volume, score the region) against the map.

    .venv/bin/python benchmarks/bench_deepbet.py --spacing 2 --block 8 --mode fast --out docs/...

Threads are pinned (``--threads``, default 1): the development machine has 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_erosion

from napari_pdcr import NodeStatus, RegionEffects, box_region
from napari_pdcr.engine.scoring import RegionScoring
from napari_pdcr.models.loading import load_model
from napari_pdcr.samples import load_sample


def deepbet_model_path():
    """Path of deepbet's TorchScript network inside its installed wheel."""
    try:
        files = distribution("deepbet").files or []
    except PackageNotFoundError:
        raise SystemExit("deepbet is not installed: pip install 'napari-pdcr[deepbet]'") from None
    path = next((f.locate() for f in files if str(f).replace("\\", "/").endswith("data/models/model.pt")), None)
    if path is None:
        raise SystemExit("deepbet's data/models/model.pt is not in its installed files")
    return path


def deepbet_normalize(image: np.ndarray) -> np.ndarray:
    """deepbet's own intensity normalisation (``deepbet.utils.normalize``) of a ``(C, *S)`` image:
    clip to the 0.5 / 99.5% quantiles, rescale to [0, 1], z-score, then ``0.226 x + 0.449``."""
    low, high = np.quantile(image, [0.005, 0.995])
    x = np.clip((image - low) / max(high - low, 1e-8), 0, 1)
    x = (x - x.mean()) / max(x.std(), 1e-8)
    return (0.226 * x + 0.449).astype(np.float32)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0, choices=[1.0, 2.0])
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--mode", default="fast", choices=["fast", "exact"])
    parser.add_argument("--subset", type=int, default=12, help="blocks recomputed by hand for fidelity")
    parser.add_argument("--outcome", default="dice", help="'dice' (thresholded, as published) or 'soft_dice'")
    parser.add_argument("--region", default="white_matter", choices=["white_matter", "boundary"],
                        help="the 16^3 region: in the left white matter (the issue's), or on the edge of deepbet's mask")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--coarse-depth", type=int, default=RegionEffects.coarse_depth_deterministic,
                        help="levels of fast mode's coarse screen (2: groups of 4, then 2 blocks per axis; 1: of 2)")
    parser.add_argument("--estimate-only", action="store_true", help="print the cost estimate and stop")
    parser.add_argument("--out", help="append a JSON line with the results")
    parser.add_argument("--save-map", help="save the block effects and statuses to this .npz (e.g. an exact run)")
    parser.add_argument("--reference", help="compare every block with the map of an earlier run saved by --save-map")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(deepbet_model_path(), trusted=True, description={"preprocess": deepbet_normalize, "channel": 1})  # channel 1: brain
    print("description:", *model.description.inferred, sep="\n  ")
    sample = load_sample("colin27_volume")  # RAS+ axes (x, y, z), 2 mm, values in [0, 1]
    image = sample["image"].astype(np.float32)
    mask = sample["mask"].astype(bool)
    if args.spacing == 1.0:
        image = F.interpolate(torch.from_numpy(image)[None, None], scale_factor=2, mode="trilinear")[0, 0].numpy()
        mask = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], scale_factor=2)[0, 0].numpy() > 0.5
    shape = image.shape
    # a 16^3-voxel region in the left hemisphere's white matter, inside the brain (or on its edge)
    centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)]
    start = (centre[0] - shape[0] // 6, centre[1], centre[2] + shape[2] // 10)
    if args.region == "boundary":  # centred on the edge of deepbet's own mask nearest to it: effects exist here
        with torch.inference_mode():
            predicted = model(model.prepare_image(image[None])[None])[0, 1].numpy() > 0.5
        edge = np.argwhere(predicted & ~binary_erosion(predicted))
        edge = edge[((edge >= 8) & (edge <= np.array(shape) - 9)).all(axis=1)]  # a whole 16^3 box inside
        nearest = edge[np.argmin(np.linalg.norm(edge - (np.array(start) + 8), axis=1))]
        start = tuple(int(v) - 8 for v in nearest)
    region = box_region(shape, start, 16)
    x = image[None]

    method = RegionEffects(model, "zero", outcome=args.outcome, block_shape=args.block, mode=args.mode, device="cpu")
    method.coarse_depth_deterministic = args.coarse_depth
    cost = method.estimate_cost(x, region)
    print(f"image {shape} at {args.spacing:g} mm, region 16^3 at {start}, blocks {args.block}^3, mode {args.mode}")
    print("cost estimate:", cost.message())
    row = {"spacing_mm": args.spacing, "block": args.block, "mode": args.mode, "outcome": args.outcome,
           "region": args.region, "region_start": [int(v) for v in start],
           "threads": args.threads, "coarse_levels": list(method.coarse_levels(True)),
           "estimate_passes_if_pruned": cost.passes_if_pruned,
           "estimate_passes": cost.passes, "estimate_s": round(cost.seconds, 1),
           "seconds_per_pass": round(cost.seconds_per_pass, 3)}
    if not args.estimate_only:
        t0 = time.perf_counter()
        result = method.attribute(x, region)
        row.update(wall_s=round(time.perf_counter() - t0, 1), passes=result.forward_passes,
                   peak_rss_mb=round(peak_rss_mb()), timings={k: round(v, 1) for k, v in result.timings.items()})
        prediction = result.prediction.astype(bool)
        row["prediction_dice_vs_brain_mask"] = round(2 * (prediction & mask).sum() / (prediction.sum() + mask.sum()), 3)

        effects, status = result.block_effects, result.block_status
        counts = np.bincount(status.ravel(), minlength=len(NodeStatus))
        row["statuses"] = {s.name.lower(): int(counts[s]) for s in NodeStatus if counts[s]}
        row["passes_by_stage"] = result.parameters["forward_passes_by_stage"]
        if args.save_map:
            np.savez_compressed(args.save_map, block_effects=effects, block_status=status)
        if args.reference:  # every block against an earlier run (e.g. mode exact)
            reference = np.load(args.reference)
            difference = np.abs(effects - reference["block_effects"])
            pruned = status == NodeStatus.PRUNED_COARSE
            row.update(reference_max_abs_error=round(float(difference.max()), 4),
                       reference_max_abs_error_not_pruned=round(float(difference[~pruned].max()), 4),
                       reference_blocks_differing=int((difference > 1e-4).sum()),
                       reference_pruned_with_effect=int((pruned & (reference["block_effects"] != 0)).sum()))

        # fidelity: the effect of a few blocks recomputed by hand, on the whole volume: the largest |effect|
        # (non-zero), then blocks the coarse screen pruned (fast mode's approximation; half of them the nearest
        # to the region, where effects are likeliest) and random other blocks, half and half where both exist
        rng = np.random.default_rng(0)
        ranked = np.argsort(-np.abs(effects).ravel())
        top = ranked[: args.subset // 2][np.abs(effects.ravel()[ranked[: args.subset // 2]]) > 0]
        pruned = np.flatnonzero(status.ravel() == NodeStatus.PRUNED_COARSE)
        others = np.setdiff1d(np.flatnonzero(status.ravel() != NodeStatus.TARGET), np.concatenate([pruned, top]))
        n_rest = args.subset - len(top)
        n_pruned = min(len(pruned), n_rest // 2 if len(others) else n_rest)
        n_pruned = max(n_pruned, n_rest - len(others))
        centre = np.argwhere(region).mean(axis=0) / args.block - 0.5  # in block units
        distance = np.linalg.norm(np.stack(np.unravel_index(pruned, effects.shape), axis=1) - centre, axis=1)
        near = pruned[np.argsort(distance)[: n_pruned // 2]]
        far = rng.choice(np.setdiff1d(pruned, near), n_pruned - len(near), replace=False)
        chosen = np.unique(np.concatenate([
            top, near, far, rng.choice(others, min(len(others), n_rest - n_pruned), replace=False),
        ])).astype(np.int64)
        prepared = model.prepare_image(x)  # interventions act in model input space
        scoring = RegionScoring(model, np.flatnonzero(region), method.outcome)
        with torch.inference_mode():
            scoring.set_base(scoring.region_scores(prepared[None]), scoring.region_reference(None))
        by_hand, errors = [], []
        for flat in chosen:
            index = np.unravel_index(flat, effects.shape)
            zeroed = prepared.clone()
            zeroed[(slice(None), *(slice(i * args.block, (i + 1) * args.block) for i in index))] = 0
            with torch.inference_mode():
                value = float(scoring(scoring.region_scores(zeroed[None]))[0]) - scoring.base
            by_hand.append(value)
            errors.append(abs(value - float(effects[index])))
        if by_hand:
            chosen_pruned = np.isin(chosen, pruned)
            by_hand = np.asarray(by_hand)
            exact_rule = np.where(np.abs(by_hand) >= method.settings.tau, by_hand, 0.0)  # what mode="exact" reports
            row.update(fidelity_max_abs_error_vs_exact=round(float(np.abs(exact_rule - effects.ravel()[chosen]).max()), 4),
                       fidelity_pruned_max_abs_effect=round(float(np.abs(by_hand[chosen_pruned]).max(initial=0.0)), 4))
            row.update(fidelity_blocks=len(by_hand), fidelity_max_abs_error=round(max(errors), 4),
                       fidelity_pruned_blocks=int(chosen_pruned.sum()),
                       fidelity_max_abs_error_pruned=round(max(np.asarray(errors)[chosen_pruned], default=0.0), 4),
                       fidelity_largest_effect=round(float(np.abs(effects).max()), 3))
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
