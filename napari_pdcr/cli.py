"""Command line: ``napari-pdcr demo`` (the main job on bundled data) and ``napari-pdcr explain``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def demo_target_region(mask: np.ndarray, size: int = 32) -> np.ndarray:
    """A ``size``-square target region centred on the brain's left edge at its middle row.

    The brain boundary is where a brain-extraction model has something to decide, so it
    is the natural region to explain.
    """
    from napari_pdcr.regions import centered_box

    rows = np.flatnonzero(mask.any(axis=1))
    row = int((rows[0] + rows[-1]) // 2)
    col = int(np.flatnonzero(mask[row])[0])
    return centered_box(mask.shape, (row, col), size)


def bank_from_stack(stack: dict, exclude_index: int | None) -> list[np.ndarray]:
    """Other slices of a ``(N, H, W)`` sample stack as ``(1, H, W)`` patch-bank sources."""
    keep = np.ones(len(stack["image"]), bool)
    if exclude_index is not None and "slice_index" in stack:
        keep &= np.asarray(stack["slice_index"]) != exclude_index
    return [s[None] for s in stack["image"][keep]]


def run_demo(args) -> int:
    from napari_pdcr import PatchBank, RegionEffects
    from napari_pdcr.models.demo import load_demo_model
    from napari_pdcr.samples import load_sample

    sample = load_sample("colin27_slice")
    image, mask, spacing = sample["image"], sample["mask"], sample["spacing"]
    region = demo_target_region(mask.astype(bool), args.region_size)

    if args.gui:
        return open_viewer(sample, region)

    model = load_demo_model("unet2d")
    bank = PatchBank(bank_from_stack(load_sample("colin27_slices"), sample.get("slice_index")), seed=args.seed)
    method = RegionEffects(
        model, intervention=bank, outcome="dice", block_shape=args.block, mode=args.mode, seed=args.seed,
        device=args.device, n_screen=args.screen, n_estimate=args.draws,
    )
    print(f"explaining demo model 'unet2d' on Colin27 slice {image.shape} (1 mm), "
          f"target region {args.region_size}x{args.region_size} px on the brain's edge, mode={args.mode}")
    last = [0.0]

    def report(progress):
        now = time.perf_counter()
        if now - last[0] > 2 or progress.done == progress.total:
            eta = f", ~{progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
            print(f"  {progress.stage}: {progress.done}/{progress.total} evaluations{eta}", flush=True)
            last[0] = now

    explanation = method.attribute(image[None], region, reference=mask, spacing=spacing, progress=report)
    return write_outputs(explanation, image, Path(args.output), "colin27_slice_unet2d")


def write_outputs(explanation, image: np.ndarray, output: Path, stem: str) -> int:
    """Write the zarr store, the PNG figure and the summary JSON; print where they are."""
    import matplotlib

    matplotlib.use("Agg")
    from napari_pdcr.plotting import explanation_figure

    output.mkdir(parents=True, exist_ok=True)
    store = output / f"{stem}.zarr"
    explanation.save(store)
    fig = explanation_figure(explanation, image, title=f"{explanation.model_identity.get('name')}: "
                             f"base Dice {explanation.base_outcome:.1f}")
    png = output / f"{stem}.png"
    fig.savefig(png, dpi=100)
    summary = output / f"{stem}_summary.json"
    summary.write_text(json.dumps(explanation.summary(), indent=2))
    counts = explanation.counts()
    print(f"base outcome {explanation.base_outcome:.2f}; blocks +{counts['positive']} "
          f"-{counts['negative']} 0:{counts['zero']}; {explanation.forward_passes} forward passes in "
          f"{explanation.timings['total_s']:.1f} s")
    print(f"wrote {store}\nwrote {png}\nwrote {summary}")
    return 0


def open_viewer(sample: dict, region: np.ndarray) -> int:
    """Open napari with the 2D sample, the demo region and the plugin docked."""
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        print("no display: run without --gui to write the results to files", file=sys.stderr)
        return 2
    import napari

    from napari_pdcr.samples import sample_layers_2d

    viewer = napari.Viewer()
    for data, kwargs, kind in sample_layers_2d():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.add_labels(region.astype(np.uint8), name="target region", scale=sample["spacing"])
    viewer.window.add_plugin_dock_widget("napari-pdcr")
    napari.run()
    return 0


def run_explain(args) -> int:
    """Explain a model on an image file with a box target region."""
    from napari_pdcr import RegionEffects, box_region
    from napari_pdcr.models.demo import demo_model_names, load_demo_model

    image = np.load(args.image, allow_pickle=False)
    if isinstance(image, np.lib.npyio.NpzFile):
        image = image["image"]
    image = np.asarray(image, dtype=np.float32)
    if args.model in demo_model_names():
        model = load_demo_model(args.model)
    else:
        from napari_pdcr.models.loading import load_model

        model = load_model(args.model, trusted=args.trusted)
    if image.ndim == model.spatial_dims:
        image = image[None]
    size = args.box_size[0] if len(args.box_size) == 1 else args.box_size
    region = box_region(image.shape[1:], args.box_start, size)
    method = RegionEffects(model, intervention=args.intervention, block_shape=args.block, mode=args.mode,
                           seed=args.seed, device=args.device, n_screen=args.screen, n_estimate=args.draws)
    explanation = method.attribute(image, region)
    shown = image[0]
    return write_outputs(explanation, shown, Path(args.output), Path(args.image).stem)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-pdcr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--block", type=int, default=8, help="block size in pixels (default 8)")
        p.add_argument("--mode", default="exact", choices=["exact", "fast", "published"])
        p.add_argument("--screen", type=int, default=3, help="screening draws per block (default 3)")
        p.add_argument("--draws", type=int, default=50, help="draws per block in the full estimate (default 50)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
        p.add_argument("--output", default="pdcr-output", help="folder for the results (default pdcr-output)")

    demo = sub.add_parser("demo", help="explain the 2D demo model on the bundled Colin27 slice")
    common(demo)
    demo.add_argument("--region-size", type=int, default=32)
    demo.add_argument("--gui", action="store_true", help="open napari with the sample and the plugin instead")
    demo.set_defaults(func=run_demo)

    explain = sub.add_parser("explain", help="explain a model on an image (.npy or .npz with 'image')")
    common(explain)
    explain.add_argument("image")
    explain.add_argument("--model", default="unet2d", help="a demo model name or a model file")
    explain.add_argument("--trusted", action="store_true", help="allow model files that execute code")
    explain.add_argument("--intervention", default="zero", help="zero, mean, blur, noise or constant")
    explain.add_argument("--box-start", type=int, nargs="+", required=True, help="target box start per axis")
    explain.add_argument("--box-size", type=int, nargs="+", default=[32], help="target box size")
    explain.set_defaults(func=run_explain)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        print(f"napari-pdcr: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
