"""The study spec: which images, target regions, models, methods, metrics and seeds a study runs.

A spec is a YAML or JSON file (or the same as a dict)::

    study: brain-edges                 # a name (default: the file's stem)
    output: results/brain-edges        # folder of the study store and table (relative to the spec)
    seeds: [0]                         # each seed is its own set of tasks
    device: auto                       # auto, cpu or cuda; GPU tasks run only on GPU workers
    reference: prediction              # Dice against the model's own prediction, or 'mask'
    images:
      - sample: colin27_slice          # a bundled sample (index: for a stack)
        crop: {start: [60, 0], size: [64, 64]}
      - file: data/subject1.nii.gz     # .npy, .npz, .nii(.gz), .tif(f) or a .zarr array
        mask: data/subject1_mask.nii.gz
      - glob: data/*.npy               # a folder glob; mask: a pattern with {stem}
        mask: "{stem}_mask.npy"
    regions:                           # for every image (an image may give its own)
      rule: boundary                   # boundary | components | boxes
      count: 20                        # boundary: boxes centred on random mask-boundary voxels
      size: 16
      seed: 0
    models:
      - name: unet2d                   # a demo model, or a file:
      - {name: mine, file: model.pt, description: model.json, trusted: false}
    methods:
      - name: region_effects           # any Method of napari_pdcr.methods, by its name
        settings: {block_shape: 16, n_screen: 1, n_estimate: 4, intervention: zero}
    metrics:
      faithfulness: {n_steps: 5, n_random: 1, fills: [blur]}
    resources:                         # for --cluster slurm and GPU workers
      torch_threads: 1                 # torch threads per task on a --scheduler cluster
      slurm: {queue: gpu, cores: 4, memory: 16GB, walltime: "02:00:00", jobs: 4}

:func:`load_spec` checks every key before anything runs; a problem raises
:class:`SpecError` naming the key, e.g. ``study spec: models[1].name: unknown demo model
'unet' ...``.
"""

from __future__ import annotations

import glob as globbing
import importlib
import inspect
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

from napari_pdcr.interventions import INTERVENTION_NAMES

REGION_RULES = ("boundary", "components", "boxes")
DEVICES = ("auto", "cpu", "cuda")
REFERENCES = ("prediction", "mask")
#: settings a study sets for every method itself
STUDY_LEVEL = {"seed": "seeds", "device": "device"}
SLURM_KEYS = ("queue", "account", "cores", "processes", "memory", "walltime", "jobs", "gpus",
              "job_extra_directives", "local_directory", "log_directory")


class SpecError(ValueError):
    """A study spec with a missing, unknown or malformed key (the message names it)."""


def method_classes() -> dict[str, type]:
    """``{name: class}`` of every concrete :class:`~napari_pdcr.methods.Method` in ``napari_pdcr.methods``.

    Every module of the package is imported, so a method added as a new file there plugs in.
    """
    import napari_pdcr.methods as package
    from napari_pdcr.methods.base import Method

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found, pending = {}, list(Method.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if not inspect.isabstract(cls) and isinstance(getattr(cls, "name", None), str):
            found[cls.name] = cls
    return dict(sorted(found.items()))


def method_settings(cls: type) -> list[str]:
    """Keyword settings ``cls(model, ...)`` accepts (its own and those its bases take through ``**options``)."""
    names = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[2:]
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class ImageSource:
    """One image of a study: a bundled sample (and stack index) or a file, its mask, a crop."""

    name: str
    sample: str | None = None
    index: int | None = None
    file: str | None = None
    mask: str | None = None
    crop: dict | None = None  #: {"start": [..], "size": [..]} in voxels of the image
    regions: dict | None = None  #: this image's own region rule (None: the study's)

    def key(self) -> dict:
        """What identifies the image's content in a task id (file paths with size and modification time)."""
        return {"name": self.name, "sample": self.sample, "index": self.index, "crop": self.crop,
                "file": _fingerprint(self.file), "mask": _fingerprint(self.mask)}

    def describe(self) -> dict:
        """The source as plain values (what a worker needs to read it)."""
        return {"name": self.name, "sample": self.sample, "index": self.index, "file": self.file,
                "mask": self.mask, "crop": self.crop}


@dataclass(frozen=True)
class ModelSource:
    """One model: a demo model's name, or a file with an optional description."""

    name: str
    file: str | None = None
    description: str | None = None
    trusted: bool = False

    def key(self) -> dict:
        """What identifies the model's weights in a task id."""
        if self.file is None:
            from napari_pdcr.models.demo import demo_weights_path

            return {"demo": self.name, "weights": _fingerprint(str(demo_weights_path(self.name)))}
        return {"name": self.name, "file": _fingerprint(self.file), "description": _fingerprint(self.description)}

    def describe(self) -> dict:
        return {"name": self.name, "file": self.file, "description": self.description, "trusted": self.trusted}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings: dict = field(default_factory=dict)


@dataclass
class StudySpec:
    """A checked study spec (see the module docstring); paths are absolute."""

    study: str
    output: Path
    images: list[ImageSource]
    regions: dict
    models: list[ModelSource]
    methods: list[MethodSpec]
    seeds: list[int]
    metrics: dict
    device: str = "auto"
    reference: str = "prediction"
    keep_image: bool = True
    locality_distance: float = 16.0
    resources: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  #: the spec as given

    @property
    def uses_gpu(self) -> bool:
        """True when tasks must run on a GPU worker."""
        return self.device == "cuda" or bool(self.resources.get("gpus"))


# ---------------------------------------------------------------------- loading and checks
def load_spec(spec) -> StudySpec:
    """A :class:`StudySpec` from a YAML / JSON file path, a dict or a StudySpec; raises :class:`SpecError`."""
    if isinstance(spec, StudySpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec, Path.cwd(), "study")
    path = Path(spec)
    if not path.is_file():
        raise SpecError(f"study spec {path} does not exist: check the path")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise SpecError(f"study spec {path} is not valid JSON ({error}): fix the syntax") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SpecError(f"study spec {path} is not valid YAML ({first}): fix the syntax") from None
    return parse_spec(data, path.parent, path.stem)


def parse_spec(data, root: Path, default_name: str) -> StudySpec:
    """Check ``data`` (the parsed spec) key by key; relative paths are taken from ``root``."""
    top = _mapping(data, "", {"study", "output", "images", "regions", "models", "methods", "seeds", "metrics",
                              "device", "reference", "keep_image", "locality_distance", "resources"})
    for key in ("images", "regions", "models", "methods"):
        if key not in top:
            raise SpecError(f"study spec: {key}: missing; every study needs images, regions, models and methods")
    study = _text(top.get("study", default_name), "study")
    output = root / _text(top.get("output", f"{study}-study"), "output")
    device = _choice(top.get("device", "auto"), "device", DEVICES)
    reference = _choice(top.get("reference", "prediction"), "reference", REFERENCES)
    regions = _regions(top["regions"], "regions")
    images = _images(top["images"], root, regions)
    if reference == "mask" and any(i.mask is None and i.sample is None for i in images):
        bad = next(i for i, s in enumerate(images) if s.mask is None and s.sample is None)
        raise SpecError(f"study spec: images[{bad}].mask: missing, but reference is 'mask': give its mask file")
    models = _models(top["models"], root)
    methods = _methods(top["methods"], models)
    seeds = _list(top.get("seeds", [0]), "seeds")
    for i, seed in enumerate(seeds):
        _integer(seed, f"seeds[{i}]", 0)
    return StudySpec(
        study=study, output=output, images=images, regions=regions, models=models, methods=methods,
        seeds=[int(s) for s in seeds], metrics=_metrics(top.get("metrics", {}), "metrics"), device=device,
        reference=reference, keep_image=_boolean(top.get("keep_image", True), "keep_image"),
        locality_distance=_number(top.get("locality_distance", 16.0), "locality_distance"),
        resources=_resources(top.get("resources", {}), "resources"), source=data,
    )


def _images(value, root: Path, regions: dict) -> list[ImageSource]:
    from napari_pdcr.samples import sample_names

    images = []
    for i, entry in enumerate(_list(value, "images")):
        where = f"images[{i}]"
        item = _mapping(entry, where, {"name", "sample", "index", "file", "glob", "mask", "crop", "regions"})
        given = [k for k in ("sample", "file", "glob") if k in item]
        if len(given) != 1:
            raise SpecError(f"study spec: {where}: give exactly one of sample, file or glob (got "
                            f"{', '.join(given) or 'none'})")
        crop = _crop(item["crop"], f"{where}.crop") if "crop" in item else None
        own = _regions(item["regions"], f"{where}.regions") if "regions" in item else None
        rule = (own or regions)["rule"]
        if "sample" in item:
            name = _text(item["sample"], f"{where}.sample")
            if name not in sample_names():
                raise SpecError(f"study spec: {where}.sample: unknown sample {name!r}; choose from "
                                f"{', '.join(sample_names())}")
            index = _integer(item["index"], f"{where}.index", 0) if "index" in item else None
            label = _text(item.get("name", name if index is None else f"{name}[{index}]"), f"{where}.name")
            images.append(ImageSource(label, sample=name, index=index, crop=crop, regions=own))
            continue
        files = [root / _text(item["file"], f"{where}.file")] if "file" in item else sorted(
            Path(p) for p in globbing.glob(str(root / _text(item["glob"], f"{where}.glob"))))
        if not files:
            raise SpecError(f"study spec: {where}.glob: {item['glob']!r} matches no file under {root}")
        for path in files:
            if not path.exists():
                raise SpecError(f"study spec: {where}.file: {path} does not exist; check the path")
            mask = None
            if "mask" in item:
                pattern = _text(item["mask"], f"{where}.mask")
                mask = path.parent / pattern.format(stem=_stem(path)) if "glob" in item else root / pattern
                if not mask.exists():
                    raise SpecError(f"study spec: {where}.mask: {mask} does not exist; check the path or pattern")
            elif rule in ("boundary", "components"):
                raise SpecError(f"study spec: {where}.mask: missing; the '{rule}' region rule picks regions "
                                "from a mask (give one, or use rule: boxes)")
            name = item.get("name", _stem(path)) if "file" in item else _stem(path)
            images.append(ImageSource(_text(name, f"{where}.name"), file=str(path),
                                      mask=None if mask is None else str(mask), crop=crop, regions=own))
    names = [image.name for image in images]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(f"study spec: images: the name {repeated[0]!r} is used twice; give each image a name")
    if not images:
        raise SpecError("study spec: images: empty; list at least one image")
    return images


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npy", ".npz", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _regions(value, where: str) -> dict:
    item = _mapping(value, where, {"rule", "count", "size", "seed", "boxes", "label", "min_voxels", "max_regions"})
    rule = _choice(item.get("rule"), f"{where}.rule", REGION_RULES)
    out = {"rule": rule}
    if rule == "boundary":
        out["count"] = _integer(item.get("count", 10), f"{where}.count", 1)
        out["size"] = _integer(item.get("size", 16), f"{where}.size", 1)
        out["seed"] = _integer(item.get("seed", 0), f"{where}.seed", 0)
    elif rule == "components":
        out["label"] = _integer(item.get("label", 0), f"{where}.label", 0)
        out["min_voxels"] = _integer(item.get("min_voxels", 1), f"{where}.min_voxels", 1)
        out["max_regions"] = _integer(item.get("max_regions", 100), f"{where}.max_regions", 1)
    else:
        boxes = _list(item.get("boxes"), f"{where}.boxes")
        out["boxes"] = [_crop(box, f"{where}.boxes[{i}]") for i, box in enumerate(boxes)]
        if not boxes:
            raise SpecError(f"study spec: {where}.boxes: empty; give at least one box {{start: [...], size: ...}}")
    unused = sorted(set(item) - set(out))
    if unused:
        raise SpecError(f"study spec: {where}.{unused[0]}: does not apply to rule '{rule}'; leave it out")
    return out


def _crop(value, where: str) -> dict:
    item = _mapping(value, where, {"start", "size"})
    start = _list(item.get("start"), f"{where}.start")
    size = item.get("size")
    sizes = size if isinstance(size, list) else [size] * len(start)
    if len(sizes) != len(start):
        raise SpecError(f"study spec: {where}.size: {len(sizes)} values for {len(start)} axes of start")
    return {"start": [_integer(v, f"{where}.start[{i}]", 0) for i, v in enumerate(start)],
            "size": [_integer(v, f"{where}.size", 1) for v in sizes]}


def _models(value, root: Path) -> list[ModelSource]:
    from napari_pdcr.models.demo import demo_model_names

    models = []
    for i, entry in enumerate(_list(value, "models")):
        where = f"models[{i}]"
        item = _mapping(entry, where, {"name", "file", "description", "trusted"})
        name = _text(item.get("name"), f"{where}.name")
        trusted = _boolean(item.get("trusted", False), f"{where}.trusted")
        if "file" not in item:
            if name not in demo_model_names():
                raise SpecError(f"study spec: {where}.name: unknown demo model {name!r}; choose from "
                                f"{', '.join(demo_model_names())}, or give its file")
            if "description" in item:
                raise SpecError(f"study spec: {where}.description: only for a model file, not the demo model {name!r}")
            models.append(ModelSource(name, trusted=trusted))
            continue
        paths = {}
        for key in ("file", "description"):
            if key in item:
                path = root / _text(item[key], f"{where}.{key}")
                if not path.exists():
                    raise SpecError(f"study spec: {where}.{key}: {path} does not exist; check the path")
                paths[key] = str(path)
        models.append(ModelSource(name, paths["file"], paths.get("description"), trusted))
    names = [m.name for m in models]
    if not models:
        raise SpecError("study spec: models: empty; list at least one model")
    if len(set(names)) != len(names):
        raise SpecError(f"study spec: models: the name {next(n for n in names if names.count(n) > 1)!r} "
                        "is used twice; give each model a name")
    return models


def _methods(value, models: list[ModelSource]) -> list[MethodSpec]:
    known = method_classes()
    methods = []
    for i, entry in enumerate(_list(value, "methods")):
        where = f"methods[{i}]"
        item = _mapping(entry, where, {"name", "settings"})
        name = _text(item.get("name"), f"{where}.name")
        if name not in known:
            raise SpecError(f"study spec: {where}.name: unknown method {name!r}; choose from {', '.join(known)}")
        settings = _mapping(item.get("settings", {}), f"{where}.settings", None)
        accepted = method_settings(known[name])
        for key in settings:
            if key in STUDY_LEVEL:
                raise SpecError(f"study spec: {where}.settings.{key}: set by the study; use the top-level "
                                f"'{STUDY_LEVEL[key]}' key")
            if key not in accepted:
                raise SpecError(f"study spec: {where}.settings.{key}: not a setting of {name}; choose from "
                                f"{', '.join(k for k in accepted if k not in STUDY_LEVEL)}")
        intervention = settings.get("intervention")
        if name == "region_effects" and intervention is not None and intervention not in INTERVENTION_NAMES:
            raise SpecError(f"study spec: {where}.settings.intervention: unknown intervention {intervention!r}; "
                            f"choose from {', '.join(INTERVENTION_NAMES)}")
        methods.append(MethodSpec(name, dict(settings)))
    if not methods:
        raise SpecError("study spec: methods: empty; list at least one method")
    return methods


def _metrics(value, where: str) -> dict:
    item = _mapping(value, where, {"faithfulness"})
    if "faithfulness" not in item:
        return {}
    sub = f"{where}.faithfulness"
    faith = _mapping(item["faithfulness"] or {}, sub, {"n_steps", "n_random", "fills"})
    fills = _list(faith.get("fills", ["blur"]), f"{sub}.fills")
    for i, fill in enumerate(fills):
        if fill not in INTERVENTION_NAMES or fill == "patch_bank":
            raise SpecError(f"study spec: {sub}.fills[{i}]: unknown fill {fill!r}; choose from "
                            f"{', '.join(n for n in INTERVENTION_NAMES if n != 'patch_bank')}")
    return {"faithfulness": {"n_steps": _integer(faith.get("n_steps", 10), f"{sub}.n_steps", 1),
                             "n_random": _integer(faith.get("n_random", 1), f"{sub}.n_random", 1),
                             "fills": list(fills)}}


def _resources(value, where: str) -> dict:
    item = _mapping(value, where, {"torch_threads", "gpus", "slurm"})
    out = {"torch_threads": _integer(item.get("torch_threads", 1), f"{where}.torch_threads", 1),
           "gpus": _integer(item.get("gpus", 0), f"{where}.gpus", 0)}
    if "slurm" in item:
        out["slurm"] = _mapping(item["slurm"], f"{where}.slurm", set(SLURM_KEYS))
    return out


# ---------------------------------------------------------------------- small checks
def _mapping(value, where: str, keys: set[str] | None) -> dict:
    label = where or "the spec"
    if not isinstance(value, dict):
        raise SpecError(f"study spec: {label}: expected a mapping of keys, got {type(value).__name__}")
    if keys is not None:
        for key in value:
            if key not in keys:
                raise SpecError(f"study spec: {f'{where}.' if where else ''}{key}: unknown key; known keys: "
                                f"{', '.join(sorted(keys))}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise SpecError(f"study spec: {where}: expected a list, got {type(value).__name__}")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"study spec: {where}: expected a non-empty text, got {value!r}")
    return value


def _choice(value, where: str, choices) -> str:
    if value not in choices:
        raise SpecError(f"study spec: {where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _integer(value, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SpecError(f"study spec: {where}: expected an integer >= {least}, got {value!r}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SpecError(f"study spec: {where}: expected a positive number, got {value!r}")
    return float(value)


def _boolean(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"study spec: {where}: expected true or false, got {value!r}")
    return value


def _fingerprint(path: str | None) -> list | None:
    """``[path, size, modification time (ns)]`` of a file or folder: a changed file changes its tasks' ids."""
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
