"""Batch-study benchmark: the 2D demo models x regions x 2 subjects on a LocalCluster of 1 and 2 workers.

Prints the wall time of each run, the speed-up, the per-task costs from the table
(method, whole task, store size) and the overhead per task against calling the method
directly in this process (same tasks, same settings, torch pinned to 1 thread).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_studies.py --regions 20     # the full benchmark
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = ["unet2d", "segresnet2d", "shallow2d", "vit2d"]
SETTINGS = {"block_shape": 16, "n_screen": 1, "n_estimate": 2}  # zero intervention: one draw per block


def spec(output: Path, regions: int) -> dict:
    return {
        "study": "bench", "output": str(output), "device": "cpu",
        "images": [{"sample": "colin27_slice", "name": "colin27"},
                   {"sample": "itk_slices", "index": 10, "name": "itk"}],
        "regions": {"rule": "boundary", "count": regions, "size": 24, "seed": 0},
        "models": [{"name": m} for m in MODELS],
        "methods": [{"name": "region_effects", "settings": dict(SETTINGS)}],
        "resources": {"torch_threads": 1},
    }


def direct_seconds(study_spec: dict) -> tuple[float, int]:
    """Seconds to run every task's method directly (models loaded beforehand), and the task count."""
    from napari_pdcr import RegionEffects
    from napari_pdcr.models.demo import load_demo_model
    from napari_pdcr.studies.spec import load_spec
    from napari_pdcr.studies.tasks import plan_tasks, read_image_source, region_array

    tasks, _ = plan_tasks(load_spec(study_spec))
    models = {m: load_demo_model(m) for m in MODELS}
    t0 = time.perf_counter()
    for task in tasks:
        image, _, spacing = read_image_source(task.image.describe())
        region = region_array(task.region, None, image.shape)
        RegionEffects(models[task.model.name], device="cpu", **SETTINGS).attribute(image[None], region,
                                                                                  spacing=spacing)
    return time.perf_counter() - t0, len(tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--regions", type=int, default=20, help="regions per subject (default 20)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from napari_pdcr import studies

    root = Path(tempfile.mkdtemp(prefix="bench-studies-"))
    walls = {}
    try:
        for workers in (1, 2):
            output = root / f"w{workers}"
            t0 = time.perf_counter()
            report = studies.run(spec(output, args.regions), workers=workers, progress=lambda p: None)
            walls[workers] = time.perf_counter() - t0
            assert not report.failures, report.to_text()
            table = studies.load(output)
            size = sum(f.stat().st_size for f in (output / "study.zarr").rglob("*") if f.is_file())
            print(f"{workers} worker(s): {report.total} tasks in {walls[workers]:.1f} s (cluster start included); "
                  f"method {table['method_s'].mean():.3f} s/task, whole task {table['task_s'].mean():.3f} s/task, "
                  f"store {size / report.total / 1024:.0f} KiB/task")
        direct, n = direct_seconds(spec(root / "direct", args.regions))
        one = studies.load(root / "w1")
        print(f"speed-up 2 vs 1 workers: {walls[1] / walls[2]:.2f}x")
        print(f"direct calls: {direct:.1f} s for {n} tasks ({direct / n:.3f} s/task); study with 1 worker: "
              f"{walls[1] / n:.3f} s/task wall, overhead {walls[1] / n - direct / n:+.3f} s/task "
              f"({walls[1] / direct:.2f}x); in-task overhead (task - method): "
              f"{(one['task_s'] - one['method_s']).mean():.3f} s/task")
        print("per model, method s/task: " + ", ".join(
            f"{m} {g['method_s'].mean():.3f}" for m, g in one.groupby("model")))
        print(f"forward passes per task: {np.mean(one['forward_passes']):.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
