"""Running a study on Dask distributed: a LocalCluster by default, an existing scheduler, or SLURM.

    from napari_pdcr import studies
    report = studies.run("study.yaml")            # LocalCluster: one worker process per core
    table = studies.load(report.output)           # pandas DataFrame, one row per task

The client plans the tasks (:func:`~napari_pdcr.studies.tasks.plan_tasks`), skips those
whose groups are already in the store, submits the others (each with a Dask key made of
its id, and ``resources={"GPU": 1}`` for GPU studies), prints progress (done / total,
failures, ETA), then writes the table, the per-model profiles and figure, and
``report.json``. Dask reschedules the task of a worker that dies; the worker that runs
it again writes the same group (see :mod:`napari_pdcr.studies.store`).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from napari_pdcr.studies.spec import StudySpec, load_spec
from napari_pdcr.studies.store import create_store, task_record, write_table
from napari_pdcr.studies.tasks import first_line, payload, plan_tasks, run_task

PLUGIN_NAME = "napari-pdcr-study"


def _worker_plugin_class():
    from distributed import WorkerPlugin

    class TorchThreads(WorkerPlugin):
        """Set torch's intra-op threads on every worker (also on workers that join or restart)."""

        name = PLUGIN_NAME

        def __init__(self, threads: int):
            self.threads = int(threads)

        def setup(self, worker):
            import torch

            torch.set_num_threads(self.threads)

    return TorchThreads


@dataclass
class StudyProgress:
    """Where a run stands: tasks done and failed of ``total`` (the tasks this run submitted)."""

    done: int
    failed: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        finished = self.done + self.failed
        return None if finished == 0 else self.elapsed_s / finished * (self.total - finished)


def progress_printer(every_s: float = 2.0):
    """A progress callback printing one line at most every ``every_s`` seconds (and at the end)."""
    last = [0.0]

    def report(progress: StudyProgress):
        now = time.perf_counter()
        if now - last[0] >= every_s or progress.done + progress.failed == progress.total:
            eta = f", ~{progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
            print(f"  study: {progress.done + progress.failed}/{progress.total} tasks, {progress.failed} failed"
                  f"{eta}", flush=True)
            last[0] = now

    return report


@dataclass
class StudyReport:
    """What one :func:`run` did."""

    output: Path
    total: int  #: tasks of the spec
    skipped: int  #: already finished before this run
    ran: int  #: finished in this run
    failures: list[dict] = field(default_factory=list)  #: {"task_id", "label", "error"} per failed task or image
    wall_s: float = 0.0
    workers: int = 0

    def to_dict(self) -> dict:
        return {"output": str(self.output), "total": self.total, "skipped": self.skipped, "ran": self.ran,
                "failed": len(self.failures), "failures": self.failures, "wall_s": self.wall_s,
                "workers": self.workers}

    def to_text(self) -> str:
        lines = [f"study {self.output}: {self.total} tasks, {self.skipped} already done, {self.ran} ran, "
                 f"{len(self.failures)} failed, {self.wall_s:.1f} s on {self.workers} workers"]
        lines += [f"  failed: {f['label']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect(spec: StudySpec, stack: ExitStack, scheduler: str | None = None, cluster: str | None = None,
            workers: int | None = None):
    """A Dask client (closed with ``stack``) and the torch threads per task for the chosen cluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("running a study needs dask distributed, which is not installed: "
                           "pip install distributed") from None
    if scheduler is not None and cluster is not None:
        raise ValueError("give either a scheduler address or a cluster kind, not both")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive integer; got {workers!r}")
    if scheduler is not None:
        client = stack.enter_context(Client(scheduler))
        return client, spec.resources["torch_threads"]
    if cluster is not None:
        if cluster != "slurm":
            raise ValueError(f"unknown cluster kind {cluster!r}: use 'slurm' or give --scheduler ADDRESS")
        return _slurm(spec, stack, workers), spec.resources.get("slurm", {}).get("cores", 1) // max(
            1, spec.resources.get("slurm", {}).get("processes", 1))
    n = workers or cores()
    threads = max(1, cores() // n)
    gpus = {}
    if spec.uses_gpu:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the study runs on cuda but this machine has no CUDA device: set device: cpu "
                               "in the spec, or run on a GPU cluster (--cluster slurm / --scheduler)")
        n, gpus = min(n, torch.cuda.device_count()), {"resources": {"GPU": 1}}
    local = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                             dashboard_address=None, **gpus))
    return stack.enter_context(Client(local)), threads


def _slurm(spec: StudySpec, stack: ExitStack, workers: int | None):
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise RuntimeError("--cluster slurm needs dask-jobqueue, which is not installed: "
                           "pip install 'napari-pdcr[cluster]'") from None
    from distributed import Client

    options = dict(spec.resources.get("slurm", {}))
    jobs = workers or options.pop("jobs", 1)
    options.pop("jobs", None)
    gpus = options.pop("gpus", spec.resources.get("gpus", 0))
    options.setdefault("cores", 1)
    options.setdefault("memory", "8GB")
    if gpus:
        options["job_extra_directives"] = [*options.get("job_extra_directives", []), f"--gres=gpu:{gpus}"]
        options["worker_extra_args"] = ["--resources", f"GPU={gpus}"]
    cluster = stack.enter_context(SLURMCluster(**options))
    cluster.scale(jobs=jobs)
    return stack.enter_context(Client(cluster))


def run(spec, *, scheduler: str | None = None, cluster: str | None = None, workers: int | None = None,
        client=None, progress=None) -> StudyReport:
    """Run every unfinished task of ``spec`` (a path, a dict or a StudySpec) and write the results.

    ``scheduler``: address of an existing Dask scheduler; ``cluster="slurm"``: SLURM jobs
    through dask-jobqueue (the spec's ``resources.slurm``); neither: a LocalCluster with
    ``workers`` processes (default: one per core), each running one task at a time with
    ``cores // workers`` torch threads. ``client``: an existing ``distributed.Client``
    instead. ``progress(StudyProgress)`` is called as tasks finish (default: a printer).
    Returns a :class:`StudyReport`; the table is in ``report.output`` (see :func:`load`).
    """
    spec = load_spec(spec)
    t0 = time.perf_counter()
    progress = progress_printer() if progress is None else progress
    tasks, plan_failures = plan_tasks(spec)
    tasks_dir = create_store(spec.output, spec.study, spec.source)
    records = {t.id: task_record(tasks_dir, t.id) for t in tasks}
    todo = [t for t in tasks if records[t.id] is None]
    failures = [{"task_id": None, "label": f"image {f.image}", "error": f.error} for f in plan_failures]
    with ExitStack() as stack:
        if client is None:
            client, threads = connect(spec, stack, scheduler, cluster, workers)
        else:
            threads = spec.resources["torch_threads"]
        client.register_plugin(_worker_plugin_class()(threads), name=PLUGIN_NAME)
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"]) if todo else 0
        ran, failed_tasks = _submit(client, spec, todo, tasks_dir, progress, t0)
    by_id = {t.id: t for t in tasks}
    failures += [{"task_id": r["task_id"], "label": by_id[r["task_id"]].label(), "error": r["error"]}
                 for r in failed_tasks]
    rows = []
    failed_ids = {r["task_id"]: r["error"] for r in failed_tasks}
    for task in tasks:
        record = task_record(tasks_dir, task.id)
        if record is not None:
            rows.append(record["row"])
        elif task.id in failed_ids:
            rows.append({"task_id": task.id, "status": "failed", "error": failed_ids[task.id], "study": spec.study,
                         "model": task.model.name, "image": task.image.name, "region": task.region["id"],
                         "method": task.method.name, "seed": task.seed})
    report = StudyReport(Path(spec.output), len(tasks), len(tasks) - len(todo), ran, failures,
                         time.perf_counter() - t0, n_workers)
    write_results(spec, rows, report)
    return report


def _submit(client, spec: StudySpec, todo, tasks_dir: Path, progress, t0: float) -> tuple[int, list[dict]]:
    """Submit ``todo`` and wait for them; returns (tasks done, failed results)."""
    from distributed import as_completed

    resources = {"GPU": 1} if spec.uses_gpu else None
    futures = [client.submit(run_task, payload(t, spec), str(tasks_dir), key=f"pdcr-study-{t.id}", pure=False,
                             resources=resources) for t in todo]
    done, failed = 0, []
    for future in as_completed(futures):
        try:
            result = future.result()
        except Exception as error:  # noqa: BLE001 - e.g. KilledWorker: the task killed its workers again and again
            result = {"task_id": future.key.removeprefix("pdcr-study-"), "status": "failed",
                      "error": f"{type(error).__name__}: {first_line(error)}"}
        if result["status"] == "done":
            done += 1
        else:
            failed.append(result)
        progress(StudyProgress(done, len(failed), len(todo), time.perf_counter() - t0))
    return done, failed


def write_results(spec: StudySpec, rows: list[dict], report: StudyReport) -> None:
    """The table (Parquet, CSV), the per-model profiles and figure, and ``report.json``."""
    from napari_pdcr.studies.aggregate import figure, profiles

    output = Path(spec.output)
    table = write_table(output, rows)
    (output / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if len(table) and (table["status"] == "done").any():
        profiles(table).to_csv(output / "profiles.csv", index=False)
        fig = figure(table, spec.locality_distance)
        fig.savefig(output / "models.png", dpi=110)
