"""Command line: ``napari-pdcr demo`` (the main job on bundled data), ``explain``, ``summary`` and ``study``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_pdcr.interventions import INTERVENTION_NAMES
from napari_pdcr.io.images import IMAGE_FORMATS, file_stem, read_image
from napari_pdcr.validation import first_line

#: Image file formats ``explain`` reads (for images and patch-bank files).


class CommandLineError(Exception):
    """A problem the user can fix, already worded as the one line the command prints."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors."""

    def error(self, message):
        print(f"napari-pdcr: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------- helpers
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


def progress_printer():
    """A progress callback printing a line at most every 2 s (and at the end)."""
    last = [0.0]

    def report(progress):
        now = time.perf_counter()
        if now - last[0] > 2 or progress.done == progress.total:
            eta = f", ~{progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
            print(f"  {progress.stage}: {progress.done}/{progress.total} evaluations{eta}", flush=True)
            last[0] = now

    return report


def output_paths(output: Path, stem: str) -> tuple[Path, Path, Path]:
    """The result store, figure and summary ``run`` will write; refuse anything that would
    overwrite a file that is not an earlier napari-pdcr result (checked before computing)."""
    from napari_pdcr.io.results import is_explanation_store

    if output.exists() and not output.is_dir():
        raise CommandLineError(
            f"--output {output} is an existing file, not a folder: give a folder for the results "
            "(it is created if missing)"
        )
    store, png, summary = output / f"{stem}.zarr", output / f"{stem}.png", output / f"{stem}_summary.json"
    earlier = is_explanation_store(store)
    if store.exists() and not earlier:
        raise CommandLineError(
            f"{store} exists and is not a napari-pdcr result store: move it away or choose another --output"
        )
    for path in (png, summary):
        if path.exists() and not earlier:
            raise CommandLineError(
                f"{path} exists but no earlier napari-pdcr result {store.name} lies beside it: "
                "move it away or choose another --output"
            )
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise CommandLineError(f"cannot write the results under {output}: choose a writable --output folder")
    if earlier:
        print(f"note: replacing the earlier results {store.name} in {output}")
    return store, png, summary


def write_outputs(explanation, image: np.ndarray, paths: tuple[Path, Path, Path]) -> int:
    """Write the zarr store, the PNG figure and the summary JSON; print where they are."""
    import matplotlib

    matplotlib.use("Agg")
    from napari_pdcr.plotting import explanation_figure

    store, png, summary = paths
    store.parent.mkdir(parents=True, exist_ok=True)
    explanation.save(store)
    fig = explanation_figure(explanation, image, title=f"{explanation.model_identity.get('name')}: "
                             f"base Dice {explanation.base_outcome:.1f}")
    fig.savefig(png, dpi=100)
    summary.write_text(json.dumps(explanation.summary(), indent=2))
    counts = explanation.counts()
    print(f"base outcome {explanation.base_outcome:.2f}; blocks +{counts['positive']} "
          f"-{counts['negative']} 0:{counts['zero']}; {explanation.forward_passes} forward passes in "
          f"{explanation.timings['total_s']:.1f} s")
    print(f"wrote {store}\nwrote {png}\nwrote {summary}")
    return 0


# ---------------------------------------------------------------------- models and banks
def is_factory(source: str) -> bool:
    """True when ``source`` is a ``package.module:function`` factory rather than a path."""
    from napari_pdcr.models.loading import FACTORY_PATTERN

    return bool(FACTORY_PATTERN.match(source)) and not Path(source).exists()


def check_model_options(args) -> None:
    """Refuse model options that do not go together, before anything is loaded."""
    from napari_pdcr.models.demo import demo_model_names

    names = demo_model_names()
    if args.model in names:
        options = {"--checkpoint": args.checkpoint, "--description": args.description,
                   "--random-weights": args.random_weights}
        given = [flag for flag, value in options.items() if value]
        if given:
            raise CommandLineError(
                f"{' and '.join(given)} do not apply to the demo model {args.model!r}: leave them out"
            )
        return
    if is_factory(args.model):
        if args.checkpoint is None and not args.random_weights:
            raise CommandLineError(
                f"--model {args.model} builds an untrained network and explaining random weights is "
                "meaningless: give its weights with --checkpoint FILE (or --random-weights to do it anyway)"
            )
        if args.checkpoint is not None and args.random_weights:
            raise CommandLineError("--checkpoint and --random-weights contradict each other: give only one")
    elif not Path(args.model).exists():
        raise CommandLineError(
            f"--model {args.model} is neither a demo model ({', '.join(names)}), nor an existing model "
            "file or folder, nor a factory 'package.module:function': check the name or path"
        )
    elif args.checkpoint is not None or args.random_weights:
        flag = "--checkpoint" if args.checkpoint is not None else "--random-weights"
        raise CommandLineError(
            f"{flag} is only for factory models ('package.module:function'), not the file {args.model}"
        )
    for flag, value in (("--checkpoint", args.checkpoint), ("--description", args.description)):
        if value is not None and not Path(value).is_file():
            raise CommandLineError(f"{flag} {value} is not an existing file: check the path")


def load_cli_model(args):
    """The model ``--model`` names (checked by :func:`check_model_options`)."""
    from napari_pdcr.models.demo import demo_model_names, load_demo_model

    if args.model in demo_model_names():
        return load_demo_model(args.model)
    from napari_pdcr.models.loading import load_model

    if args.random_weights:
        print(f"warning: explaining {args.model} with random weights (--random-weights): the map shows "
              "what an untrained network does", file=sys.stderr)
    from napari_pdcr.models.loading import UntrustedModelError

    try:
        return load_model(args.model, description=args.description, trusted=args.trusted,
                          checkpoint=args.checkpoint)
    except UntrustedModelError as error:
        raise CommandLineError(f"{first_line(error)} (on the command line: --trusted)") from None


def read_bank(sources: list[str]) -> list[tuple[np.ndarray, str]]:
    """Each ``--bank`` source (a bundled sample name or an image file) as an array and a description."""
    from napari_pdcr.samples import load_sample, sample_names

    banks = []
    for source in sources:
        if source in sample_names():
            banks.append((load_sample(source)["image"], f"bundled sample {source}"))
        else:
            path = Path(source)
            if not path.exists():
                raise CommandLineError(
                    f"--bank {source} is neither an existing file nor a bundled sample "
                    f"({', '.join(sample_names())}): check the name or path"
                )
            banks.append((read_image(path, "bank file")[0], str(path)))
    return banks


def check_bank(banks: list[tuple[np.ndarray, str]], model) -> None:
    """Refuse bank images whose dimensionality or channels do not fit the model."""
    dims, channels = model.spatial_dims, model.in_channels
    least = dims + (channels > 1)
    for array, where in banks:
        if array.ndim < least or (channels > 1 and array.shape[-dims - 1] != channels):
            layout = f"{dims}D" if channels == 1 else f"({channels}, {dims}D) channels-first"
            raise CommandLineError(
                f"--bank {where} has shape {array.shape}, but model {model.name!r} takes {layout} images: "
                f"give {layout} images (or stacks of them) for the patch bank"
            )


# ---------------------------------------------------------------------- commands
def run_demo(args) -> int:
    from napari_pdcr import PatchBank, RegionEffects
    from napari_pdcr.models.demo import load_demo_model
    from napari_pdcr.samples import load_sample

    sample = load_sample("colin27_slice")
    image, mask, spacing = sample["image"], sample["mask"], sample["spacing"]
    region = demo_target_region(mask.astype(bool), args.region_size)

    if args.gui:
        return open_viewer(sample, region)

    paths = output_paths(Path(args.output), "colin27_slice_unet2d")
    model = load_demo_model("unet2d")
    bank = PatchBank(bank_from_stack(load_sample("colin27_slices"), sample.get("slice_index")), seed=args.seed)
    method = RegionEffects(
        model, intervention=bank, outcome="dice", block_shape=args.block, mode=args.mode, seed=args.seed,
        device=args.device, n_screen=args.screen, n_estimate=args.draws,
    )
    print(f"explaining demo model 'unet2d' on Colin27 slice {image.shape} (1 mm), "
          f"target region {args.region_size}x{args.region_size} px on the brain's edge, mode={args.mode}")
    explanation = method.attribute(image[None], region, reference=mask, spacing=spacing,
                                   progress=progress_printer())
    return write_outputs(explanation, image, paths)


def open_viewer(sample: dict, region: np.ndarray) -> int:
    """Open napari with the 2D sample, the demo region and the plugin docked."""
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        raise CommandLineError("no display for --gui: run without --gui to write the results to files")
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
    image_path = Path(args.image)
    paths = output_paths(Path(args.output), file_stem(image_path))
    if args.bank and args.intervention != "patch_bank":
        raise CommandLineError(
            f"--bank is for --intervention patch_bank, not {args.intervention}: leave it out"
        )
    image, spacing = read_image(image_path)
    banks = read_bank(args.bank or [])
    check_model_options(args)

    from napari_pdcr import box_region
    from napari_pdcr.console import cost_message
    from napari_pdcr.engine.estimator import drive
    from napari_pdcr.jobs import ExplainJob, default_bank, model_input

    model = load_cli_model(args)
    model_image = model_input(image, model, str(image_path))
    size = args.box_size[0] if len(args.box_size) == 1 else args.box_size
    region = box_region(model_image.shape[1:], args.box_start, size)
    check_bank(banks, model)
    if args.intervention == "patch_bank" and not banks and model.in_channels == 1:
        banks = [default_bank(model_image, model.spatial_dims)]
        print(f"note: no --bank given: the patch bank is cut from the {banks[0][1]}")
    job = ExplainJob(
        image=image,
        target_region=region,
        model=model,
        intervention=args.intervention,
        bank=[array for array, _ in banks] or None,
        bank_description=", ".join(where for _, where in banks),
        spacing=spacing,
        source_layer={"name": str(image_path)},
        parameters=dict(block_shape=args.block, mode=args.mode, seed=args.seed, device=args.device,
                        n_screen=args.screen, n_estimate=args.draws),
    )
    print(f"explaining {model.name!r} on {image_path} {image.shape}, target box {list(args.box_start)} "
          f"size {size}, intervention {args.intervention}, mode={args.mode}")
    print(f"cost: {cost_message(job)}", flush=True)
    explanation = drive(job.iter_run(), progress_printer())
    if explanation.provenance.get("patch_bank"):
        print(f"patch bank: {explanation.provenance['patch_bank']}")
    return write_outputs(explanation, model_image[0], paths)


def run_summary(args) -> int:
    """Open a saved result store (checked for damage) and print its kind and summary as JSON."""
    from napari_pdcr.explanations import Explanation

    path = Path(args.store)
    if not path.exists():
        raise CommandLineError(f"result store {path} does not exist: check the path")
    explanation = Explanation.load(path)
    print(json.dumps({"kind": explanation.kind, "model": explanation.model_identity.get("name"),
                      "summary": explanation.summary()}, indent=2, default=str))
    return 0


def run_study(args) -> int:
    """Run a batch study from a YAML / JSON spec on Dask; exit code 1 when any task failed."""
    from napari_pdcr import studies

    report = studies.run(args.spec, scheduler=args.scheduler, cluster=args.cluster, workers=args.workers)
    print(report.to_text())
    print(f"table: {report.output / 'tasks.parquet'} (and tasks.csv); per-model profiles: "
          f"{report.output / 'profiles.csv'}, {report.output / 'models.png'}")
    return 1 if report.failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="napari-pdcr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--block", type=int, default=8, help="block size in pixels (default 8)")
        p.add_argument("--mode", default="exact", choices=["exact", "fast", "published"])
        p.add_argument("--screen", type=int, default=3, help="screening draws per block (default 3)")
        p.add_argument("--draws", type=int, default=50, help="draws per block in the full estimate (default 50)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
        p.add_argument("--output", default="pdcr-output", help="folder for the results (default pdcr-output)")
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    demo = sub.add_parser("demo", help="explain the 2D demo model on the bundled Colin27 slice")
    common(demo)
    demo.add_argument("--region-size", type=int, default=32)
    demo.add_argument("--gui", action="store_true", help="open napari with the sample and the plugin instead")
    demo.set_defaults(func=run_demo)

    explain = sub.add_parser("explain", help=f"explain a model on an image ({IMAGE_FORMATS})")
    common(explain)
    explain.add_argument("image", help=f"the image: {IMAGE_FORMATS}")
    explain.add_argument("--model", default="unet2d",
                         help="a demo model name, a model file or bundle, or a factory 'package.module:function'")
    explain.add_argument("--checkpoint", help="state dict file with the weights of a factory model")
    explain.add_argument("--description", help="JSON model description file (spatial_dims, in_channels, ...)")
    explain.add_argument("--random-weights", action="store_true",
                         help="explain a factory model without --checkpoint (untrained weights)")
    explain.add_argument("--trusted", action="store_true", help="allow model sources that execute code")
    explain.add_argument("--intervention", default="zero", choices=INTERVENTION_NAMES,
                         help="what replaces a block (default zero)")
    explain.add_argument("--bank", nargs="+", metavar="SOURCE",
                         help="patch-bank images for --intervention patch_bank: image files or bundled "
                              "sample names (default: the bundled sample for the model's dimensionality)")
    explain.add_argument("--box-start", type=int, nargs="+", required=True, help="target box start per axis")
    explain.add_argument("--box-size", type=int, nargs="+", default=[32], help="target box size")
    explain.set_defaults(func=run_explain)

    summary = sub.add_parser("summary", help="check a saved result store and print its summary (JSON)")
    summary.add_argument("store", help="a result store (.zarr folder) written by napari-pdcr")
    summary.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    summary.set_defaults(func=run_summary)

    study = sub.add_parser("study", help="run a batch study (images x models x methods) from a spec on Dask")
    study.add_argument("spec", help="the study spec (.yaml or .json)")
    where = study.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of an existing Dask scheduler")
    where.add_argument("--cluster", choices=["slurm"], help="start SLURM jobs through dask-jobqueue")
    study.add_argument("--workers", type=int, help="worker processes (default: one per core) or SLURM jobs")
    study.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    study.set_defaults(func=run_study)
    return parser


#: Error classes a run can end with for bad input or a failing model: one line, no traceback.
EXPECTED_ERRORS = (CommandLineError, ValueError, TypeError, KeyError, OSError, RuntimeError,
                   FloatingPointError, ImportError, MemoryError, EOFError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("napari-pdcr: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command line never shows a traceback unless --debug
        if args.debug:
            raise
        hint = "" if isinstance(error, EXPECTED_ERRORS) else (
            f" (unexpected {type(error).__name__}; run with --debug for the traceback)"
        )
        print(f"napari-pdcr: error: {first_line(error)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
