"""The same run from the napari console and from the dock widget, in one script.

A person who starts napari sets no environment variable, so every run happens in a
child process started with ``OMP_WAIT_POLICY``, ``KMP_BLOCKTIME`` and
``OMP_NUM_THREADS`` removed from its environment (CI's ``.ci/run`` sets
``OMP_WAIT_POLICY=PASSIVE``; this benchmark must not rely on it). In the child, napari
is imported first and the plugin second, as when napari loads it. The child opens the
2D Colin27 sample in a real viewer (needs a display: run under ``xvfb-run -a``), paints
a 16x16 region, and runs, interleaved and ``--repeats`` times each:

- ``console``: :func:`napari_pdcr.console.explain` on the same arrays, called on the GUI
  thread as from napari's console (the event loop does not run meanwhile);
- ``widget``: the dock widget's Run (worker thread, progress, result layers and plots on
  the GUI thread), timed from pressing Run until the result is shown.

``--baseline`` adds two children with other worker thread settings (:data:`VARIANTS`):
one core left free for the GUI (with the plugin's passive OpenMP wait), and what the widget did
before (torch imported before the plugin, so OpenMP keeps its default spin-waiting, and
every core).

Both paths compute the same map (checked: identical ATE arrays). Prints one table row
per child: median wall times, the ratio widget / console and the longest event-loop
stall during the widget's runs (a 10 ms QTimer).

    xvfb-run -a python benchmarks/bench_widget_vs_console.py [--repeats 2] [--baseline] [--block-size 8] [--n-estimate 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

#: Environment variables that change OpenMP's threads; removed for the child processes.
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: The run: the demo 2D model, natural patches, 8-pixel blocks, screen 3 / estimate 20
#: (``--block-size`` / ``--n-estimate`` change it): long enough that the result's display
#: (~1 s of layers and plots) does not dominate the ratio.
RUN = {"block_size": 8, "n_screen": 3, "n_estimate": 20, "seed": 0}
REGION = (slice(60, 76), slice(40, 56))  # 16x16 px of left frontal cortex


#: the widget's thread settings compared: label and (default OpenMP wait, every core for the worker)
VARIANTS = {
    "plugin": ("plugin's (passive wait, every core)", False, True),
    "one-free": ("passive wait, cores - 1", False, False),
    "baseline": ("before: OpenMP default wait, every core", True, True),
}


def child(repeats: int, variant: str, run: dict) -> dict:
    """Runs in the child process: the console and the widget runs, interleaved."""
    import napari  # first, as when napari starts and then loads the plugin

    _, baseline, all_cores = VARIANTS[variant]
    if baseline:
        import torch  # noqa: F401 - imported before the plugin: OpenMP keeps its default wait policy

    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    import napari_pdcr._napari.base_widget as base_widget
    import napari_pdcr._napari.widget as region_widget
    import napari_pdcr.models.devices as devices
    from napari_pdcr.console import explain

    if not all_cores:  # one core left for the GUI (every binding of the name)
        def one_core_free() -> int:
            return max(1, devices.cpu_cores() - 1)

        for module in (base_widget, region_widget, devices):
            module.worker_cpu_threads = one_core_free
    import torch

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-pdcr", "colin27_slice")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    region = widget.brush_region()
    region.data[REGION] = 1
    region.refresh()
    for name, value in run.items():
        getattr(widget, name).setValue(value)
    image = viewer.layers["colin27_slice image"]
    app = QApplication.instance()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def run_console():
        start = time.perf_counter()
        explanation = explain(
            image.data, region.data == 1, model="unet2d", spacing=tuple(image.scale),
            block_shape=run["block_size"], n_screen=run["n_screen"], n_estimate=run["n_estimate"], seed=run["seed"],
        )
        return time.perf_counter() - start, explanation.ate

    def run_widget():
        ticks[:] = [time.perf_counter()]
        timer.start()
        start = time.perf_counter()
        widget.run()
        while widget.worker is not None or widget.result_pending:  # until the layers and plots are in
            app.processEvents()
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        timer.stop()
        gaps = np.diff([*ticks, time.perf_counter()])
        return elapsed, widget.explanation.ate, float(gaps.max())

    run_console()  # warm-up: load the model and the patch bank once
    console_s, widget_s, stalls = [], [], []
    for _ in range(repeats):
        seconds, console_map = run_console()
        console_s.append(seconds)
        seconds, widget_map, stall = run_widget()
        widget_s.append(seconds)
        stalls.append(stall)
        assert np.array_equal(console_map, widget_map), "the widget and the console computed different maps"
    viewer.close()
    return {
        "console_s": console_s,
        "widget_s": widget_s,
        "stall_s": stalls,
        "torch_threads_console": torch.get_num_threads(),
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"),
    }


def run_child(repeats: int, variant: str, run: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.setdefault("QT_API", "pyqt6")
    command = [sys.executable, __file__, "--child", "--repeats", str(repeats), "--block-size", str(run["block_size"]),
               "--n-estimate", str(run["n_estimate"]), "--variant", variant]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if output.returncode:
        sys.exit(f"the child failed:\n{output.stderr[-4000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", action="store_true",
                        help="also run with one core left free for the GUI, and with OpenMP's default spin-wait")
    parser.add_argument("--variant", choices=list(VARIANTS), default="plugin", help=argparse.SUPPRESS)
    parser.add_argument("--block-size", type=int, default=RUN["block_size"])
    parser.add_argument("--n-estimate", type=int, default=RUN["n_estimate"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = {**RUN, "block_size": args.block_size, "n_estimate": args.n_estimate}
    if args.child:
        print(json.dumps(child(args.repeats, args.variant, run)))
        return
    import statistics

    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; run: {run}, 2D sample, natural patches")
    print("| widget settings | console (s) | widget (s) | widget / console | longest stall (ms) |")
    print("|---|---|---|---|---|")
    for variant in (list(VARIANTS) if args.baseline else ["plugin"]):
        result = run_child(args.repeats, variant, run)
        console, widget = statistics.median(result["console_s"]), statistics.median(result["widget_s"])
        what = VARIANTS[variant][0]
        print(
            f"| {what} | {console:.1f} | {widget:.1f} | {widget / console:.2f}x | "
            f"{1000 * max(result['stall_s']):.0f} |"
        )
        print(f"<!-- raw: {json.dumps(result)} -->")


if __name__ == "__main__":
    main()
