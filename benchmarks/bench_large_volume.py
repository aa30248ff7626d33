"""Large volumes: windows saved by the sliding-window restriction, and peak memory at 1 mm.

Two parts, each run in its own process (so peak memory is its own):

``sample``
    The 3D sample (``colin27_volume``, 91x109x91 at 2 mm) with the ``unet3d`` demo model
    applied by sliding windows of ``--sample-roi`` voxels; a small target region on the
    brain's edge, 8^3-voxel blocks, zero intervention. Counts the windows a full
    sliding-window pass per intervened volume would run against the windows the
    restriction runs, times both (full passes: measured per pass, multiplied by the
    number of evaluations), and spot-checks that the restricted outcomes equal those of
    MONAI's full ``sliding_window_inference`` for a few blocks.
``colin1mm``
    The whole Colin27 T1 at 1 mm (181x217x181, read from Debian's ``mricron-data``:
    ``/usr/share/mricron/templates/ch2.nii.gz``), ``unet3d`` by sliding windows of
    ``--roi`` voxels, a 16^3-voxel target region on the brain's edge, 16^3 blocks; once
    with the zero intervention and once with ``--draws`` noise draws per block. Reports
    peak resident memory (``ru_maxrss``), time and window counts.

Writes the results between the markers of ``docs/large_volumes.md`` (``--out``)::

    python benchmarks/bench_large_volume.py [--part all|sample|colin1mm] [--out docs/large_volumes.md]

The demo model was trained on the 2 mm volume; at 1 mm its brain mask is not the point:
memory and time are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

COLIN_1MM = Path("/usr/share/mricron/templates/ch2.nii.gz")
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edge_region(mask: np.ndarray, size: int) -> np.ndarray:
    """A ``size``^3 box centred on the brain's left edge at its middle axial slice and row."""
    from napari_pdcr.regions import centered_box

    d = int(np.mean(np.flatnonzero(mask.any(axis=(1, 2)))))
    h = int(np.mean(np.flatnonzero(mask[d].any(axis=1))))
    w = int(np.flatnonzero(mask[d, h])[0])
    return centered_box(mask.shape, (d, h, w), size)


def windowed_demo_model(roi: int, batch_size: int):
    from napari_pdcr.models.demo import load_demo_model
    from napari_pdcr.models.sliding_window import SlidingWindow

    model = load_demo_model("unet3d")
    return dataclasses.replace(model, sliding_window=SlidingWindow(roi, overlap=0.25, batch_size=batch_size))


def full_pass_seconds(model, x: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one full sliding-window pass over ``x`` ``(C, *S)``."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x[None])
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_sample(args) -> dict:
    from napari_pdcr import RegionEffects
    from napari_pdcr.engine.blocks import InputBlocks
    from napari_pdcr.engine.windowed import WindowedInputBlocks
    from napari_pdcr.interventions import make_intervention
    from napari_pdcr.outcomes import Outcome
    from napari_pdcr.regions import BlockGrid
    from napari_pdcr.samples import load_sample

    sample = load_sample("colin27_volume")
    model = windowed_demo_model(args.sample_roi, batch_size=8)
    image = sample["image"][None]
    region = edge_region(sample["mask"], 8)
    t0 = time.perf_counter()
    result = RegionEffects(model, "zero", block_shape=8, device="cpu").attribute(image, region)
    restricted_s = time.perf_counter() - t0
    info = result.parameters["sliding_window"]
    evaluations = result.forward_passes
    x = model.prepare_image(image)
    per_pass_s = full_pass_seconds(model, x)

    # Spot check: restricted outcomes == outcomes of MONAI's full sliding_window_inference.
    grid = BlockGrid.create(x.shape[1:], 8)
    zero, outcome = make_intervention("zero"), Outcome("dice")
    windowed = WindowedInputBlocks(model, x, grid, region, outcome, zero)
    full = InputBlocks(model, x, grid, region, outcome, zero)
    reachable = np.flatnonzero(result.block_status.ravel() != 4)  # not UNREACHABLE
    reachable = reachable[~grid.any_per_block(region).ravel()[reachable]]
    blocks = [int(b) for b in np.random.default_rng(0).choice(reachable, size=min(12, len(reachable)), replace=False)]
    replacements = [windowed.sample(b, 1, np.random.default_rng(b))[0] for b in blocks]
    difference = float((windowed.outcomes(blocks, replacements) - full.outcomes(blocks, replacements)).abs().max())

    full_windows = (evaluations + 1) * info["windows_per_pass"]
    return {
        "shape": list(x.shape[1:]),
        "roi": args.sample_roi,
        "blocks": int(grid.n_blocks),
        "candidate_blocks": result.parameters["n_candidate_blocks"],
        "reachable_blocks": result.parameters["n_reachable_blocks"],
        "evaluations": evaluations,
        "windows_per_pass": info["windows_per_pass"],
        "windows_over_region": info["windows_over_region"],
        "window_evaluations": info["window_evaluations"],
        "full_windows": full_windows,
        "full_windows_all_blocks": (result.parameters["n_candidate_blocks"] + 1) * info["windows_per_pass"],
        "restricted_s": restricted_s,
        "full_pass_s": per_pass_s,
        "full_estimated_s": (evaluations + 1) * per_pass_s,
        "spot_check_blocks": len(blocks),
        "spot_check_max_difference": difference,
        "base_outcome": result.base_outcome,
        "peak_rss_mb": peak_rss_mb(),
    }


def load_colin_1mm() -> np.ndarray:
    """Colin27 T1 at 1 mm as float32 in [0, 1], in the samples' (S, P, R) axis layout."""
    import nibabel as nib

    if not COLIN_1MM.is_file():
        raise SystemExit(f"{COLIN_1MM} is missing: apt-get install mricron-data")
    canonical = nib.as_closest_canonical(nib.load(str(COLIN_1MM)))  # axes (R, A, S)
    volume = np.asarray(canonical.dataobj, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1])  # (S, A->P, R)


def run_colin1mm(args) -> dict:
    from napari_pdcr import Noise, RegionEffects

    torch.set_num_threads(args.threads)
    baseline = peak_rss_mb()
    image = load_colin_1mm()[None]
    model = windowed_demo_model(args.roi, batch_size=4)
    with torch.inference_mode():  # the model's own brain mask decides where the edge is
        mask = torch.sigmoid(model(torch.from_numpy(image)[None]))[0, 0].numpy() > 0.5
    after_load = peak_rss_mb()
    region = edge_region(mask, 16)
    intervention = "zero" if args.draws == 0 else Noise()
    settings = {} if args.draws == 0 else {"n_screen": 0, "n_estimate": args.draws}
    t0 = time.perf_counter()
    result = RegionEffects(model, intervention, block_shape=16, device="cpu", **settings).attribute(image, region)
    seconds = time.perf_counter() - t0
    info = result.parameters["sliding_window"]
    return {
        "shape": list(image.shape[1:]),
        "roi": args.roi,
        "threads": args.threads,
        "intervention": "zero" if args.draws == 0 else f"noise, {args.draws} draws",
        "blocks": int(np.prod(result.block_status.shape)),
        "reachable_blocks": result.parameters["n_reachable_blocks"],
        "evaluations": result.forward_passes,
        "batch_size": result.parameters["batch_size"],
        "windows_per_pass": info["windows_per_pass"],
        "windows_over_region": info["windows_over_region"],
        "window_evaluations": info["window_evaluations"],
        "seconds": seconds,
        "rss_after_imports_mb": baseline,
        "rss_after_load_and_prediction_mb": after_load,
        "peak_rss_mb": peak_rss_mb(),
        "nonzero_blocks": int((result.block_effects != 0).sum()),
    }


def report(sample: dict | None, colins: list[dict], command: str) -> str:
    lines = [
        MARK_START,
        f"Measured with `{command}` on {platform.machine()}, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__} (CPU). Written by the script; do not edit by hand.",
        "",
    ]
    if sample:
        s = sample
        lines += [
            f"**3D sample** (`colin27_volume`, {'x'.join(map(str, s['shape']))} at 2 mm; `unet3d` by sliding "
            f"windows of {s['roi']}^3, overlap 0.25; 8^3-voxel target region on the brain's edge; 8^3 blocks; "
            "zero intervention):",
            "",
            "| | full sliding-window inference | window restriction |",
            "|---|---:|---:|",
            f"| windows per evaluation | {s['windows_per_pass']} | "
            f"{(s['window_evaluations'] - s['windows_over_region']) / max(1, s['evaluations']):.2f} (mean) |",
            f"| blocks evaluated (of {s['candidate_blocks']} outside the region) | {s['candidate_blocks']} | "
            f"{s['reachable_blocks']} (the others lie in no window over the region: exactly 0) |",
            f"| window passes in all | {s['full_windows_all_blocks']:,} | {s['window_evaluations']:,} "
            f"(incl. {s['windows_over_region']} cached unperturbed) |",
            f"| wall time | {s['full_pass_s'] * (s['candidate_blocks'] + 1):.0f} s (estimated: "
            f"{s['full_pass_s']:.2f} s per pass) | {s['restricted_s']:.1f} s (measured, incl. the full prediction) |",
            "",
            f"Work saved: **{s['full_windows_all_blocks'] / s['window_evaluations']:.0f}x fewer window passes**; "
            f"against full inference on the reachable blocks only, {s['full_windows'] / s['window_evaluations']:.0f}x. "
            f"Spot check on {s['spot_check_blocks']} random reachable blocks: largest difference between the "
            f"restricted outcome and MONAI's full `sliding_window_inference` = {s['spot_check_max_difference']:.2g} "
            "Dice points.",
            "",
        ]
    if colins:
        c = colins[0]
        columns = " | ".join(run["intervention"] for run in colins)

        def row(name, cell):
            return f"| {name} | " + " | ".join(cell(run) for run in colins) + " |"

        lines += [
            f"**Whole Colin27 at 1 mm** ({'x'.join(map(str, c['shape']))}; `unet3d` by sliding windows of "
            f"{c['roi']}^3, overlap 0.25; 16^3-voxel target region on the edge of the model's brain mask; 16^3 "
            f"blocks; {c['threads']} CPU threads):",
            "",
            f"| quantity | {columns} |",
            "|---|" + "---:|" * len(colins),
            row("peak resident memory (ru_maxrss)", lambda r: f"**{r['peak_rss_mb']:.0f} MiB**"),
            row("resident after imports", lambda r: f"{r['rss_after_imports_mb']:.0f} MiB"),
            row("resident after loading the volume + one full prediction", lambda r: f"{r['rss_after_load_and_prediction_mb']:.0f} MiB"),
            row("wall time of the explanation", lambda r: f"{r['seconds']:.1f} s"),
            row("blocks: all / evaluated", lambda r: f"{r['blocks']} / {r['reachable_blocks']}"),
            row("evaluations (intervened volumes)", lambda r: f"{r['evaluations']:,}"),
            row("windows per full pass / over the region", lambda r: f"{r['windows_per_pass']} / {r['windows_over_region']}"),
            row("window passes run (full inference would run)",
                lambda r: f"{r['window_evaluations']:,} ({(r['evaluations'] + 1) * r['windows_per_pass']:,})"),
            row("items per batch (memory budget 1024 MiB)", lambda r: str(r["batch_size"])),
            row("blocks with a non-zero effect", lambda r: str(r["nonzero_blocks"])),
            "",
        ]
    lines.append(MARK_END)
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    doc = path.read_text() if path.is_file() else f"# Large volumes\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START not in doc or MARK_END not in doc:
        doc += f"\n{MARK_START}\n{MARK_END}\n"
    head, rest = doc.split(MARK_START, 1)
    tail = rest.split(MARK_END, 1)[1]
    path.write_text(head + text + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "sample", "colin1mm"), default="all")
    parser.add_argument("--sample-roi", type=int, default=32, help="window size on the 2 mm sample")
    parser.add_argument("--roi", type=int, default=64, help="window size on the 1 mm volume")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per block in the second 1 mm run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/large_volumes.md"))
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()

    if args.json:
        result = run_sample(args) if args.part == "sample" else run_colin1mm(args)
        print(json.dumps(result))
        return
    runs = []  # (part, draws); one process each, so each peak memory is its own
    if args.part in ("all", "sample"):
        runs.append(("sample", 0))
    if args.part in ("all", "colin1mm"):
        runs += [("colin1mm", 0), ("colin1mm", args.draws)]
    results = {"sample": None, "colin1mm": []}
    for part, draws in runs:
        child = [sys.executable, __file__, "--json", "--part", part, "--sample-roi", str(args.sample_roi),
                 "--roi", str(args.roi), "--draws", str(draws), "--threads", str(args.threads)]
        output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(part, json.dumps(result, indent=1))
        if part == "sample":
            results["sample"] = result
        else:
            results["colin1mm"].append(result)
    command = "python " + " ".join(["benchmarks/bench_large_volume.py", *sys.argv[1:]])
    write_report(args.out, report(results["sample"], results["colin1mm"], command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
