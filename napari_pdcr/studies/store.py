"""The study store: one zarr hierarchy with a group per task, and the table of the study.

Layout of a study's output folder::

    <output>/study.zarr/           zarr group, attrs {"napari_pdcr_study": {"study", "spec", "format_version"}}
        tasks/<task id>/           one result store per finished task (napari_pdcr.io.results format,
                                   any Explanation kind), with the field "study_task": {"task", "row"}
    <output>/tasks.parquet, tasks.csv    one row per task of the current spec (done and failed)
    <output>/profiles.csv, models.png    the per-model aggregation (napari_pdcr.studies.aggregate)
    <output>/report.json           the last run: counts, wall time, failures and their messages

Workers write the task groups themselves, each atomically
(:func:`~napari_pdcr.io.results.write_store`): a group exists only once it is complete,
and its path is the task's id, so a task that ran twice (a worker killed after writing,
or a duplicate run) is still one group, and the table built from the groups has each
task exactly once. The table is rebuilt from the groups after every run, so nothing is
lost when the client dies: the next run picks up the finished groups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STUDY_KEY = "napari_pdcr_study"
STUDY_FORMAT = 1
STORE_NAME, TASKS = "study.zarr", "tasks"
TABLE_FILES = ("tasks.parquet", "tasks.csv")


def study_root(path) -> Path:
    """The study store of an output folder or of the store itself."""
    path = Path(path)
    return path if is_study_store(path) else path / STORE_NAME


def is_study_store(path) -> bool:
    """True when ``path`` is the root group of a study store."""
    try:
        attributes = json.loads((Path(path) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and STUDY_KEY in attributes


def create_store(output: Path, study: str, spec: dict) -> Path:
    """Create (or reopen) the study store under ``output``; returns its tasks folder.

    ``FileExistsError`` when ``output/study.zarr`` exists and is not a study store.
    """
    import zarr

    root = Path(output) / STORE_NAME
    if root.exists() and not is_study_store(root):
        raise FileExistsError(f"{root} exists and is not a napari-pdcr study store: move it away or choose "
                              "another output folder in the spec")
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    group.attrs[STUDY_KEY] = {"study": study, "spec": json.loads(json.dumps(spec, default=str)),
                              "format_version": STUDY_FORMAT}
    group.require_group(TASKS)
    return root / TASKS


def task_record(tasks_dir: Path, task_id: str) -> dict | None:
    """The ``{"task", "row"}`` record of a finished task group, or None when it is not there (yet)."""
    from napari_pdcr.io.results import STORE_KEY
    from napari_pdcr.studies.tasks import STUDY_FIELD

    try:
        attributes = json.loads((Path(tasks_dir) / task_id / "zarr.json").read_text())["attributes"]
        return attributes[STORE_KEY][STUDY_FIELD]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finished_ids(tasks_dir: Path, ids) -> set[str]:
    """The ids among ``ids`` whose groups are complete in the store."""
    return {task_id for task_id in ids if task_record(tasks_dir, task_id) is not None}


def write_table(output: Path, rows: list[dict]):
    """Write ``rows`` as ``tasks.parquet`` and ``tasks.csv`` (each replaced atomically); returns the DataFrame."""
    import pandas as pd

    table = pd.DataFrame(rows)
    for name, write in zip(TABLE_FILES, (lambda p: table.to_parquet(p, index=False),
                                          lambda p: table.to_csv(p, index=False)), strict=True):
        target = Path(output) / name
        partial = target.with_name(f".{name}.{os.getpid()}.partial")
        write(partial)
        os.replace(partial, target)
    return table


def load(store):
    """The study table as a pandas DataFrame (one row per task), from an output folder or its ``study.zarr``.

    Reads ``tasks.parquet``; when it is missing (a study whose client died before writing
    it) the table is rebuilt from the finished task groups.
    """
    import pandas as pd

    root = study_root(store)
    if not is_study_store(root):
        raise ValueError(f"{store} is not a napari-pdcr study (no {STORE_NAME} with study attributes): "
                         "give the output folder of napari_pdcr.studies.run")
    table = root.parent / TABLE_FILES[0]
    if table.exists():
        return pd.read_parquet(table)
    tasks_dir = root / TASKS
    records = [task_record(tasks_dir, entry.name) for entry in sorted(tasks_dir.iterdir())
               if not entry.name.startswith(".")]
    return pd.DataFrame([r["row"] for r in records if r is not None])


def task_path(store, task_id: str) -> Path:
    """The result store of one task (open it with ``Explanation.load`` or napari)."""
    path = study_root(store) / TASKS / task_id
    if task_record(path.parent, task_id) is None:
        raise KeyError(f"task {task_id!r} has no finished group in {study_root(store)}: "
                       "list the finished tasks with napari_pdcr.studies.load")
    return path


def open_task(store, task_id: str):
    """The :class:`~napari_pdcr.explanations.Explanation` of one finished task (checked for damage)."""
    from napari_pdcr.explanations import Explanation

    return Explanation.load(task_path(store, task_id))
