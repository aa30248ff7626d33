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

from napari_pdcr import RegionEffects, box_region
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate-only", action="store_true", help="print the cost estimate and stop")
    parser.add_argument("--out", help="append a JSON line with the results")
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
    # a 16^3-voxel region in the left hemisphere's white matter, inside the brain
    centre = [int(round(c)) for c in np.argwhere(mask).mean(axis=0)]
    start = (centre[0] - shape[0] // 6, centre[1], centre[2] + shape[2] // 10)
    region = box_region(shape, start, 16)
    x = image[None]

    method = RegionEffects(model, "zero", outcome=args.outcome, block_shape=args.block, mode=args.mode, device="cpu")
    cost = method.estimate_cost(x, region)
    print(f"image {shape} at {args.spacing:g} mm, region 16^3 at {start}, blocks {args.block}^3, mode {args.mode}")
    print("cost estimate:", cost.message())
    row = {"spacing_mm": args.spacing, "block": args.block, "mode": args.mode, "outcome": args.outcome,
           "threads": args.threads,
           "estimate_passes": cost.passes, "estimate_s": round(cost.seconds, 1),
           "seconds_per_pass": round(cost.seconds_per_pass, 3)}
    if not args.estimate_only:
        t0 = time.perf_counter()
        result = method.attribute(x, region)
        row.update(wall_s=round(time.perf_counter() - t0, 1), passes=result.forward_passes,
                   peak_rss_mb=round(peak_rss_mb()), timings={k: round(v, 1) for k, v in result.timings.items()})
        prediction = result.prediction.astype(bool)
        row["prediction_dice_vs_brain_mask"] = round(2 * (prediction & mask).sum() / (prediction.sum() + mask.sum()), 3)

        # fidelity: the effect of a few blocks recomputed by hand, on the whole volume
        rng = np.random.default_rng(0)
        effects = result.block_effects
        ranked = np.argsort(-np.abs(effects).ravel())
        chosen = np.unique(np.concatenate([ranked[: args.subset // 2], rng.choice(effects.size, args.subset // 2, replace=False)]))
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
            row.update(fidelity_blocks=len(by_hand), fidelity_max_abs_error=round(max(errors), 4),
                       fidelity_largest_effect=round(float(np.abs(effects).max()), 3))
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
