"""Tasks of a study: one (model, image, target region, method, seed), planned on the client, run on a worker.

:func:`plan_tasks` expands a :class:`~napari_pdcr.studies.spec.StudySpec` into
:class:`Task` objects; a task's id is the sha256 of its full settings (the model's and
the image's files with size and modification time, the region, the method and its
settings, the seed, the metrics), so a rerun recognises finished tasks and a changed
setting gives new ids to exactly the tasks it changes. :func:`run_task` is what a Dask
worker runs: it loads the model once per worker thread (:func:`cached_model`), explains
the region through :mod:`napari_pdcr.jobs` (region and component effects) or the method
class, computes the row of the study table and writes the task's group atomically
(:func:`napari_pdcr.io.results.write_store`); it returns a small status dict.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_pdcr.studies.spec import ImageSource, MethodSpec, ModelSource, StudySpec
from napari_pdcr.validation import first_line

#: bump when the meaning of a task's settings changes (every id changes with it)
TASK_FORMAT = 1
#: the field of a task group that holds the study's record of the task
STUDY_FIELD = "study_task"


@dataclass(frozen=True)
class Task:
    """One unit of work; :meth:`payload` is what travels to the worker (plain values)."""

    id: str
    model: ModelSource
    image: ImageSource
    region: dict  #: {"id", "start", "size"} (a box) or {"id", "label", "component"} (a mask component)
    method: MethodSpec
    seed: int

    def label(self) -> str:
        return f"{self.model.name} / {self.image.name} / {self.region['id']} / {self.method.name} / seed {self.seed}"


@dataclass(frozen=True)
class PlanFailure:
    """An image whose target regions could not be chosen (its tasks do not exist)."""

    image: str
    error: str


def plan_tasks(spec: StudySpec) -> tuple[list[Task], list[PlanFailure]]:
    """Every task of ``spec`` (model-major order) and the images whose regions could not be chosen."""
    tasks, failures = [], []
    for image in spec.images:
        rule = image.regions or spec.regions
        try:
            regions = choose_regions(image, rule)
        except Exception as error:  # noqa: BLE001 - a bad image fails its tasks, the rest goes on
            failures.append(PlanFailure(image.name, first_line(error)))
            continue
        for model in spec.models:
            for method in spec.methods:
                for seed in spec.seeds:
                    for region in regions:
                        key = {"format": TASK_FORMAT, "model": model.key(), "image": image.key(), "region": region,
                               "method": method.name, "settings": method.settings, "seed": seed,
                               "reference": spec.reference, "metrics": spec.metrics, "keep_image": spec.keep_image,
                               "locality_distance": spec.locality_distance}
                        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                        tasks.append(Task(digest, model, image, region, method, seed))
    tasks.sort(key=lambda t: [m.name for m in spec.models].index(t.model.name))
    return tasks, failures


def payload(task: Task, spec: StudySpec) -> dict:
    """What a worker needs to run ``task`` (plain values)."""
    return {"task_id": task.id, "study": spec.study, "model": task.model.describe(), "image": task.image.describe(),
            "region": task.region, "method": task.method.name, "settings": task.method.settings,
            "seed": task.seed, "device": spec.device, "reference": spec.reference, "metrics": spec.metrics,
            "keep_image": spec.keep_image, "locality_distance": spec.locality_distance}


# ---------------------------------------------------------------------- images and regions
def read_array(path: str, what: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A float32 array and its spacing (or None) from an image file or a ``.zarr`` array."""
    if path.lower().rstrip("/").endswith(".zarr"):
        import zarr

        try:
            return np.asarray(zarr.open_array(path, mode="r")[...], dtype=np.float32), None
        except Exception as error:  # noqa: BLE001 - zarr's many errors for a folder that is no array
            raise ValueError(f"{what} {path} is not a readable zarr array ({first_line(error)})") from None
    from napari_pdcr.io.images import read_image

    return read_image(Path(path), what)


def cropped(array: np.ndarray | None, crop: dict | None, what: str) -> np.ndarray | None:
    """``array`` cut to ``crop`` (its last axes); ``ValueError`` when the crop leaves it."""
    if array is None or crop is None:
        return array
    start, size = crop["start"], crop["size"]
    spatial = array.shape[array.ndim - len(start):]
    if any(a + s > n for a, s, n in zip(start, size, spatial, strict=True)):
        raise ValueError(f"the crop start={start} size={size} leaves {what} of shape {tuple(spatial)}: "
                         "choose a crop inside the image")
    return array[(..., *(slice(a, a + s) for a, s in zip(start, size, strict=True)))]


@lru_cache(maxsize=8)
def _read_source(source_json: str) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...] | None]:
    source = json.loads(source_json)
    if source["sample"] is not None:
        from napari_pdcr.samples import load_sample

        sample = load_sample(source["sample"])
        pick = (lambda a: a) if source["index"] is None else (lambda a: a[source["index"]])
        image, mask, spacing = pick(sample["image"]), pick(sample["mask"]), sample["spacing"]
        spacing = spacing[-mask.ndim:]
    else:
        image, spacing = read_array(source["file"], f"image {source['name']!r}")
        mask = None if source["mask"] is None else read_array(source["mask"], f"mask of {source['name']!r}")[0]
    image = cropped(image, source["crop"], f"image {source['name']!r}")
    mask = cropped(mask, source["crop"], f"the mask of {source['name']!r}")
    return image, mask, spacing


def read_image_source(source: dict, with_image: bool = True):
    """``(image, mask, spacing)`` of an image source (cached per process); ``with_image=False``
    reads only the mask of a file (what the client needs to choose regions): ``(None, mask, None)``."""
    if with_image or source["sample"] is not None:
        return _read_source(json.dumps(source, sort_keys=True))
    mask = None if source["mask"] is None else read_array(source["mask"], f"mask of {source['name']!r}")[0]
    return None, cropped(mask, source["crop"], f"the mask of {source['name']!r}"), None


def choose_regions(image: ImageSource, rule: dict) -> list[dict]:
    """The target regions of ``image`` under ``rule`` as plain dicts (boxes or mask components)."""
    if rule["rule"] == "boxes":
        return [{"id": f"box-{i}", **box} for i, box in enumerate(rule["boxes"])]
    _, mask, _ = read_image_source(image.describe(), with_image=False)
    mask = np.asarray(mask)
    if rule["rule"] == "components":
        chosen = mask == rule["label"] if rule["label"] else mask != 0
        labels, n = ndimage.label(chosen)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = [int(k) + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] >= rule["min_voxels"]]
        if not order:
            raise ValueError(f"the mask of {image.name!r} has no component of label {rule['label']} with at least "
                             f"{rule['min_voxels']} voxels: check the mask or the rule's label")
        return [{"id": f"component-{k}", "label": rule["label"], "component": k} for k in order[: rule["max_regions"]]]
    inside = mask != 0
    boundary = np.argwhere(inside & ~ndimage.binary_erosion(inside))
    if len(boundary) == 0:
        raise ValueError(f"the mask of {image.name!r} is empty: a boundary rule needs a mask with a boundary")
    rng = np.random.default_rng([rule["seed"], zlib.crc32(image.name.encode())])
    picks = rng.choice(len(boundary), size=min(rule["count"], len(boundary)), replace=False)
    size = [min(rule["size"], n) for n in mask.shape]
    regions = []
    for i, p in enumerate(sorted(int(p) for p in picks)):
        start = [min(max(int(c) - s // 2, 0), n - s) for c, s, n in zip(boundary[p], size, mask.shape, strict=True)]
        regions.append({"id": f"boundary-{i}", "start": start, "size": size})
    return regions


def region_array(region: dict, mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The bool target region ``shape`` of a region dict."""
    if "start" in region:
        from napari_pdcr.regions import box_region

        return box_region(shape, region["start"], region["size"])
    chosen = mask == region["label"] if region["label"] else mask != 0
    return ndimage.label(chosen)[0] == region["component"]


# ---------------------------------------------------------------------- models
_MODELS: dict[tuple[int, str], object] = {}
_MODELS_LOCK = threading.Lock()
#: model name -> loads in this process (a worker loads each model once per thread)
MODEL_LOADS: Counter = Counter()


def cached_model(source: dict):
    """``(SegmentationModel, seconds spent loading)`` for a model source: loaded once per worker thread
    (threads do not share a model: hooks of component effects must not cross)."""
    key = (threading.get_ident(), json.dumps(source, sort_keys=True))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key], 0.0
    t0 = time.perf_counter()
    if source["file"] is None:
        from napari_pdcr.models.demo import load_demo_model

        model = load_demo_model(source["name"])
    else:
        from napari_pdcr.models.loading import load_model

        model = load_model(source["file"], description=source["description"], trusted=source["trusted"])
    with _MODELS_LOCK:
        _MODELS[key] = model
        MODEL_LOADS[source["name"]] += 1
    return model, time.perf_counter() - t0


# ---------------------------------------------------------------------- running one task
def explain(task: dict, model, image: np.ndarray, region: np.ndarray, reference, spacing):
    """The task's explanation: region and component effects through the job layer, others directly."""
    from napari_pdcr.engine.estimator import drive
    from napari_pdcr.jobs import ComponentJob, ExplainJob, model_input
    from napari_pdcr.studies.spec import method_classes

    settings = dict(task["settings"])
    common = {"seed": task["seed"], "device": task["device"]}
    if task["method"] == "region_effects":
        job = ExplainJob(image=image, target_region=region, model=model, reference=reference,
                         intervention=settings.pop("intervention", "zero"), outcome=settings.pop("outcome", "dice"),
                         spacing=spacing, source_layer={"name": task["image"]["name"]},
                         parameters={**settings, **common})
        return drive(job.iter_run())
    if task["method"] == "component_effects":
        return drive(ComponentJob(image=image, target_region=region, model=model, reference=reference,
                                  parameters={**settings, **common}).iter_run())
    method = method_classes()[task["method"]](model, **settings, **common)
    return method.attribute(model_input(image, model, task["image"]["name"]), region, reference)


def faithfulness_row(task: dict, model, image: np.ndarray, region: np.ndarray, reference, explanation) -> dict:
    """Deletion / insertion AUCs of the task's map and of the random-order floor (empty for non-maps;
    ``faithfulness_error`` when the map has no curve, e.g. one that ranks no block)."""
    from napari_pdcr.explanations import AttributionMap, RegionExplanation
    from napari_pdcr.interventions import make_intervention
    from napari_pdcr.jobs import model_input
    from napari_pdcr.metrics import Faithfulness

    settings = task["metrics"].get("faithfulness")
    if settings is None or not isinstance(explanation, AttributionMap | RegionExplanation):
        return {}
    block_shape = getattr(explanation, "block_shape", None) or task["settings"].get("block_shape", 8)
    metric = Faithfulness(model, fills={name: make_intervention(name) for name in settings["fills"]},
                          block_shape=block_shape, n_steps=settings["n_steps"], n_random=settings["n_random"],
                          seed=task["seed"], device=task["device"])
    try:
        curves = metric.evaluate(model_input(image, model), region, {"map": explanation}, reference)
    except ValueError as error:  # e.g. a map with one value outside the region ranks nothing: no curve
        return {"faithfulness_error": first_line(error)}
    row = {}
    for entry in curves.table():
        prefix = "" if entry["method"] == "map" else f"{entry['method']} "
        row.update({f"{prefix}{key}": value for key, value in entry.items() if key != "method"})
    row["faithfulness_forward_passes"] = curves.forward_passes
    return row


def strategy_row(task: dict, explanation) -> dict:
    """Strategy numbers of a region explanation (locality, signs) or a component explanation (concentration)."""
    from napari_pdcr.explanations import ComponentExplanation, RegionExplanation
    from napari_pdcr.studies.comparison import strategy_profile, top_component

    if isinstance(explanation, RegionExplanation):
        profile = strategy_profile(task["model"]["name"], explanation, locality_distance=task["locality_distance"])
        return {"locality": profile.locality, "half_effect_distance": profile.half_effect_distance,
                **{f"fraction_{k}": v for k, v in profile.fractions.items()},
                "total_abs_effect": profile.total_abs_effect}
    if isinstance(explanation, ComponentExplanation):
        name, ate, share = top_component(explanation)
        return {"top_component": name, "top_component_ate": ate, "top_component_share": share}
    return {}


def summary_columns(summary: dict) -> dict:
    """The numbers of an explanation's summary as flat columns (``summary_<key>[_<sub key>]``)."""
    columns = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            columns.update({f"summary_{key}_{k}": v for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            columns[f"summary_{key}"] = value
    return columns


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def worker_name() -> str:
    """The Dask worker's address, or ``local`` outside a worker."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def run_task(task: dict, tasks_dir: str) -> dict:
    """Run one task on this process and write its group ``tasks_dir/<task id>`` atomically.

    Returns ``{"task_id", "status": "done" | "failed", "error", "seconds"}``; an error of
    the task (a bad image, a region outside it, a model that fails) is returned as a
    failure with its message, so the study goes on.
    """
    from napari_pdcr.io.results import write_store
    from napari_pdcr.methods.base import package_versions

    t0 = time.perf_counter()
    try:
        model, model_load_s = cached_model(task["model"])
        t1 = time.perf_counter()
        image, mask, spacing = read_image_source(task["image"])
        image_read_s = time.perf_counter() - t1
        shape = tuple(image.shape[image.ndim - model.spatial_dims:])
        region = region_array(task["region"], mask, shape)
        reference = mask != 0 if task["reference"] == "mask" else None
        t2 = time.perf_counter()
        explanation = explain(task, model, image, region, reference, spacing)
        method_s = time.perf_counter() - t2
        row_start = time.perf_counter()
        row = {"task_id": task["task_id"], "status": "done", "error": None, "study": task["study"],
               "model": task["model"]["name"], "model_sha256": explanation.model_identity.get("sha256"),
               "image": task["image"]["name"], "region": task["region"]["id"],
               "region_spec": json.dumps({k: v for k, v in task["region"].items() if k != "id"}),
               "method": task["method"], "seed": task["seed"], "settings": json.dumps(task["settings"], sort_keys=True),
               "kind": explanation.kind, **summary_columns(explanation.summary()), **strategy_row(task, explanation),
               **faithfulness_row(task, model, image, region, reference, explanation),
               "forward_passes": explanation.forward_passes}
        metrics_s = time.perf_counter() - row_start
        if task["keep_image"]:
            explanation.extras["image"] = np.asarray(image, dtype=np.float32)
        arrays, fields = explanation.contents()
        versions = package_versions()
        row.update({f"version_{name}": version for name, version in versions.items()})
        row.update(model_load_s=model_load_s, image_read_s=image_read_s, method_s=method_s, metrics_s=metrics_s,
                   worker=worker_name(), host=socket.gethostname(), pid=os.getpid(),
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        row["task_s"] = time.perf_counter() - t0  # everything but writing the group
        fields[STUDY_FIELD] = {"task": task, "row": row}
        write_store(Path(tasks_dir) / task["task_id"], explanation.kind, arrays, fields)
        return {"task_id": task["task_id"], "status": "done", "error": None, "seconds": time.perf_counter() - t0}
    except Exception as error:  # noqa: BLE001 - every failure of a task is reported with its message
        return {"task_id": task["task_id"], "status": "failed", "error": first_line(error),
                "seconds": time.perf_counter() - t0}
