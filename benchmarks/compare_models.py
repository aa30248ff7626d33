"""Compare the strategies of the 2D demo models on one image and target region.

Every shipped 2D demo model explains the same held-out Colin27 slice and the same 32x32
target region on the brain's left edge (``napari_pdcr.cli.demo_target_region``):

- region effects: published settings (8x8 blocks, natural patches from the other
  Colin27 slices, screen 3 draws, then ``--draws`` draws, tau 0.02; Dice against the
  ground-truth brain mask inside the region), ``exact`` mode;
- component effects of the stages: ``resample`` intervention (each stage's activation
  on one of 16 other Colin27 slices), screen 3, then ``--component-draws`` draws;
- the strategy profile of each model (``napari_pdcr.studies.comparison``).

Writes the figure ``docs/images/model_comparison.png`` and the measured tables between
the result markers of ``docs/model_comparison.md`` (``--save DIR``: also every
explanation as a zarr store, with the component effects in its extras; ``--load DIR``:
redraw the figure and tables from such a folder without recomputing).

    PYTHONPATH=. python benchmarks/compare_models.py            # published 50 draws
    PYTHONPATH=. python benchmarks/compare_models.py --quick    # 10 draws, a smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import torch

from napari_pdcr import PatchBank
from napari_pdcr.cli import bank_from_stack, demo_target_region
from napari_pdcr.explanations.region import RegionExplanation
from napari_pdcr.models.demo import (
    DEMO_MODELS,
    TEMPERATURE_SERIES,
    demo_weights_path,
    load_demo_model,
)
from napari_pdcr.samples import load_sample
from napari_pdcr.studies.comparison import ModelComparison, compare_models, strategy_profile

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "images" / "model_comparison.png"
DOC = ROOT / "docs" / "model_comparison.md"
START, END = "<!-- results: start (written by benchmarks/compare_models.py) -->", "<!-- results: end -->"
LOCALITY_MM = 16.0


def shipped_2d_models() -> dict:
    """Every registered 2D demo model whose weights are present, by name; the temperature series
    has its own study (benchmarks/temperature_study.py)."""
    return {
        name: load_demo_model(name)
        for name, spec in DEMO_MODELS.items()
        if spec.spatial_dims == 2 and demo_weights_path(name).is_file() and name not in TEMPERATURE_SERIES
    }


def heldout_dice_table(names) -> str:
    """Held-out Dice of each model, measured by ``sample_data/evaluate_demo_models.py``."""
    sys.path.insert(0, str(ROOT / "sample_data"))
    from evaluate_demo_models import evaluate_2d

    lines = [
        "| model | family | parameters | weights sha256 | Colin27 held-out slices | second subject (ITK) slices |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name in names:
        result = evaluate_2d(name)
        model = load_demo_model(name)
        lines.append(
            f"| `{name}` | {type(model.network).__name__} | {sum(p.numel() for p in model.network.parameters()):,} | "
            f"`{model.sha256[:12]}` | {result['colin']:.3f} | {result['itk']:.3f} |"
        )
    return "\n".join(lines)


def compute(args, image, mask, spacing, region, others) -> ModelComparison:
    """Run the comparison of the chosen models (printing progress)."""
    models = shipped_2d_models()
    if args.models:
        models = {name: models[name] for name in args.models}
    component_bank = np.stack([others[i] for i in np.linspace(0, len(others) - 1, 16).round().astype(int)])
    settings = dict(
        region_effects=dict(
            intervention=PatchBank(others, size=10_000, seed=0), block_shape=8, outcome="dice",
            n_screen=3, n_estimate=args.draws, tau=0.02, mode="exact", seed=0, device="cpu",
        ),
        component_effects=dict(
            intervention="resample", granularity="stages", outcome="dice",
            n_screen=3, n_estimate=args.component_draws, tau=0.02, seed=0, device="cpu",
        ),
        bank_images=component_bank,
        spacing=spacing,
        locality_distance=LOCALITY_MM,
    )
    started = time.perf_counter()

    def report(progress):
        print(f"\r{progress.stage:<40} {progress.done:>6}/{progress.total:<6} {time.perf_counter() - started:7.0f} s",
              end="", flush=True)

    comparison = compare_models(models, image, region, reference=mask, progress=report, **settings)
    print()
    if args.save:
        for profile in comparison.profiles:
            if profile.components is not None:
                profile.explanation.related["components"] = profile.components
            profile.explanation.save(args.save / f"{profile.model}.zarr")
    return comparison


def load(directory: Path, names) -> ModelComparison:
    """The comparison saved by ``--save`` (region explanations with their component effects)."""
    profiles = []
    for path in sorted(directory.glob("*.zarr")):
        if names and path.stem not in names:
            continue
        explanation = RegionExplanation.load(path)
        components = explanation.related.get("components")
        profiles.append(strategy_profile(path.stem, explanation, components, LOCALITY_MM))
    order = {name: i for i, name in enumerate(names or DEMO_MODELS)}
    return ModelComparison(sorted(profiles, key=lambda p: order.get(p.model, len(order))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 draws per block and component (smoke run)")
    parser.add_argument("--draws", type=int, default=50, help="draws per block that passes the screen")
    parser.add_argument("--component-draws", type=int, default=50, help="draws per component that passes the screen")
    parser.add_argument("--models", nargs="+", help="demo model names (default: every shipped 2D one)")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/ (print only)")
    parser.add_argument("--save", type=Path, help="also save each model's explanation (with its component "
                        "effects in extras) as DIR/<model>.zarr, readable by napari-pdcr")
    parser.add_argument("--load", type=Path, help="redraw the figure and tables from a --save folder "
                        "instead of recomputing")
    args = parser.parse_args()
    if args.quick:
        args.draws = args.component_draws = 10
    torch.set_num_threads(2)
    matplotlib.use("Agg")

    sample = load_sample("colin27_slice")
    image, mask, spacing = sample["image"][None], sample["mask"].astype(bool), sample["spacing"]
    region = demo_target_region(mask)
    others = bank_from_stack(load_sample("colin27_slices"), sample.get("slice_index"))
    if args.load:
        comparison = load(args.load, args.models)
    else:
        comparison = compute(args, image, mask, spacing, region, others)
    table = comparison.to_markdown()
    print(table)
    dice_table = heldout_dice_table([p.model for p in comparison.profiles])
    print(dice_table)
    if args.no_doc:
        return
    first = comparison.profiles[0]
    draws = first.explanation.parameters["n_estimate"], first.components.parameters["n_estimate"]
    fig = comparison.figure(image[0])
    fig.suptitle(
        f"Colin27 held-out slice, 32x32 target region (gold): natural-patch region effects "
        f"({draws[0]} draws), resample component effects ({draws[1]} draws)",
        fontsize=9,
    )
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110, bbox_inches="tight")
    seconds = sum(row["seconds"] for row in comparison.table())
    write_results(table, dice_table, draws, seconds, len(others), args.quick)


def write_results(table: str, dice_table: str, draws, seconds: float, n_bank: int, quick: bool) -> None:
    """Replace the measured part of docs/model_comparison.md (between the markers)."""
    command = "PYTHONPATH=. python benchmarks/compare_models.py" + (" --quick" if quick else "")
    block = "\n".join([
        START,
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `{command}` "
        f"(torch {torch.__version__}, CPU, 2 threads, {platform.machine()}; {seconds / 60:.0f} min of compute). "
        f"Region effects: 8x8 blocks, natural patches from {n_bank} other Colin27 slices, screen 3 + "
        f"{draws[0]} draws, tau 0.02, Dice against the ground-truth mask in the region, `exact` mode, seed 0. "
        f"Component effects: stages, resample from 16 other slices, screen 3 + {draws[1]} draws, seed 0.",
        "",
        "Held-out Dice of the compared models (pooled over slices; `sample_data/evaluate_demo_models.py`):",
        "",
        dice_table,
        "",
        "Strategy profiles on the explained slice and region:",
        "",
        table,
        "",
        "![model comparison](images/model_comparison.png)",
        END,
    ])
    text = DOC.read_text()
    head, rest = text.split(START)
    DOC.write_text(head + block + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
