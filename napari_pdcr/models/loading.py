"""Load segmentation models as people have them: TorchScript, torch.export, MONAI bundles,
factory functions with checkpoints, and ``nn.Module`` objects.

One entry point, :func:`load_model`, finds the format from the file's content (not only
its name), reads the model description (:mod:`napari_pdcr.models.description`), infers
what is unambiguous from a test pass, and returns a
:class:`~napari_pdcr.models.base.SegmentationModel` with the sha256 of the file(s) it
came from.

Trust: every model format that holds a program runs code from its file when loaded, and
is loaded only with ``trusted=True``: a MONAI bundle's config (``$`` expressions and
``_target_`` instantiation), a factory's module, a pickled module, a TorchScript program
(its ``__setstate__`` runs at load, and TorchScript can write files, e.g. ``torch.save``)
and a ``torch.export`` program (``torch.export.load`` unpickles parts of it without
restriction and parses its shape expressions with ``sympy.sympify``, i.e. ``eval``).
Without trust only data is read: state dicts (``weights_only=True``) and descriptions
(JSON). ``docs/models.md`` lists every format and what it can run.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_pdcr.models.base import CLASSIFIER, SegmentationModel, hash_file
from napari_pdcr.models.description import (
    ModelDescription,
    complete_description,
    description_path_for,
)
from napari_pdcr.models.devices import resolve_device
from napari_pdcr.models.sliding_window import SlidingWindow
from napari_pdcr.validation import first_line

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
BUNDLE_WEIGHTS = ("model.pt", "model.ts")
#: How to proceed past an UntrustedModelError (the end of every such message).
TRUST_ADVICE = (
    "pass trusted=True (in the widget: tick 'Trust this file') only if you trust where it came from, "
    "or load its weights (a state dict) into network code you have read"
)
#: The start of a ``torch.save`` file in the legacy (not zip) format: the pickled magic number.
LEGACY_TORCH_SAVE = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:]
#: MONAI transforms a bundle's preprocessing may keep besides monai.transforms.intensity.*:
#: they change types, not geometry.
TYPE_TRANSFORMS = {"EnsureType", "EnsureTyped", "CastToType", "CastToTyped", "ToTensor", "ToTensord"}


class ModelLoadError(ValueError):
    """A model file that is corrupt, of an unknown format, or does not fit its description."""


class UntrustedModelError(PermissionError):
    """Loading this model would run code from its source; pass ``trusted=True`` to allow it."""


# ---------------------------------------------------------------------- entry point
def load_model(
    source,
    description=None,
    trusted: bool = False,
    device="cpu",
    checkpoint=None,
    factory_kwargs: dict | None = None,
    image_shape=None,
) -> SegmentationModel:
    """Load a segmentation model or a classifier and wrap it for explanation.

    The kind (scores per voxel ``(N, K, *S)`` or per class ``(N, K)``) is the
    description's ``kind``, else found from a test pass; every format loads either.

    Parameters
    ----------
    source
        A path to a TorchScript file (``torch.jit.save``; usually ``.pt``/``.ts``), a
        ``torch.export`` program (``.pt2``), a MONAI bundle (folder or ``.zip`` with
        ``configs/`` and ``models/``), a factory ``"package.module:function"``, or an
        ``nn.Module`` object.
    description
        A :class:`~napari_pdcr.models.description.ModelDescription`, a dict of its
        fields or a path to a JSON description. Its fields override the description
        file found next to the model (``<stem>.pdcr.json`` / a bundle's ``pdcr.json``),
        which overrides what the format itself says (bundle metadata and inferer,
        export shapes); the rest is inferred from test passes.
    trusted
        Allow sources that run code when loaded: every model file (TorchScript,
        ``torch.export``, pickled modules, MONAI bundles) and factories. Only for sources
        you trust as you would trust a Python script.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``, ``"auto"`` or a ``torch.device``.
    checkpoint
        State dict file (``torch.save``) for a factory source; read with ``weights_only=True``.
    factory_kwargs
        Keyword arguments for the factory.
    image_shape
        Spatial shape of the images to be explained, when known: the test passes use it
        (else the description's window, else the smallest size that runs).

    Raises
    ------
    FileNotFoundError
        The file or folder does not exist.
    ModelLoadError
        Corrupt or unrecognised file, weights that do not fit, or a description the
        model contradicts.
    UntrustedModelError
        The source runs code and ``trusted`` is False.
    FloatingPointError
        The model returns NaN or infinite values on a test input.
    """
    target = resolve_device(device)
    if isinstance(source, SegmentationModel):
        raise TypeError("source is already a SegmentationModel; use it directly")
    if isinstance(source, nn.Module):
        loaded = _Loaded(source, None, f"python object {type(source).__name__}")
    elif isinstance(source, str) and FACTORY_PATTERN.match(source) and not Path(source).exists():
        loaded = _load_factory(source, checkpoint, factory_kwargs, trusted)
    else:
        if checkpoint is not None or factory_kwargs is not None:
            raise ValueError("checkpoint and factory_kwargs are for factory sources ('package.module:function')")
        loaded = _load_path(Path(source), trusted)

    if isinstance(loaded.network, nn.Module):
        loaded.network.eval()  # before any test pass: batch-norm statistics must not move
    given = ModelDescription.coerce(description)
    from_file = ModelDescription.from_file(loaded.description_file) if loaded.description_file else ModelDescription()
    wanted = loaded.format_description.updated(from_file).updated(given)
    try:
        resolved = complete_description(wanted, loaded.network, loaded.input_shape, image_shape)
    except ValueError as error:
        raise ModelLoadError(f"{loaded.source}: {error}") from None
    if loaded.input_shape is not None and resolved.kind != CLASSIFIER:  # a classifier's scores have no map to window
        resolved = _fit_fixed_shape(resolved, loaded.input_shape)

    preprocess = resolved.preprocess
    if preprocess == "bundle":
        if loaded.bundle_preprocessing is None:
            raise ModelLoadError("preprocess='bundle' needs a MONAI bundle with a 'preprocessing' config")
        preprocess = loaded.bundle_preprocessing
    model = SegmentationModel(
        network=loaded.network,
        spatial_dims=resolved.spatial_dims,
        in_channels=resolved.in_channels,
        activation=resolved.activation,
        divisible_by=resolved.divisible_by,
        preprocess=preprocess,
        name=resolved.name or loaded.name,
        sha256=loaded.sha256,
        source=loaded.source,
        sliding_window=resolved.sliding_window,
        description=resolved,
    )
    return model.to(target)


class _Loaded:
    """What a format loader found: the network and what the format itself says."""

    def __init__(self, network, sha256, source, name="model", description_file=None):
        self.network, self.sha256, self.source, self.name = network, sha256, str(source), name
        self.description_file = description_file
        self.format_description = ModelDescription()
        self.input_shape: tuple[int, ...] | None = None
        self.bundle_preprocessing = None


# ---------------------------------------------------------------------- files
def _load_path(path: Path, trusted: bool) -> _Loaded:
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        if not (path / "configs").is_dir():
            raise ModelLoadError(f"{path} is a folder but not a MONAI bundle (it has no configs/ folder)")
        return _load_bundle(path, trusted, hash_bundle(path), path)
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".onnx":
            raise ModelLoadError(f"{path}: ONNX models are not supported; export the PyTorch model with torch.jit.save or torch.export")
        raise ModelLoadError(
            f"{path} is not a TorchScript, torch.export, torch.save or MONAI bundle archive "
            "(not a complete zip file): it is corrupt (truncated download?) or of an unknown format"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    sha256 = hash_file(path)
    if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return _load_exported(path, sha256, trusted)
    if _is_torchscript(names):
        return _load_torchscript(path, sha256, trusted)
    if any(n.startswith("configs/") or "/configs/" in n for n in names):
        return _load_bundle_zip(path, trusted, sha256)
    if any(n.endswith("data.pkl") for n in names):
        return _load_pickle(path, trusted, sha256)
    raise ModelLoadError(f"{path} is a zip archive but not a PyTorch model or MONAI bundle")


def _named(path: Path, network, sha256) -> _Loaded:
    return _Loaded(network, sha256, path, name=path.stem, description_file=description_path_for(path))


def _untrusted(source, why: str) -> UntrustedModelError:
    """The refusal of a source that runs code when loaded: what it is, why, how to proceed."""
    return UntrustedModelError(f"{source} {why}: {TRUST_ADVICE}")


def _is_torchscript(names: list[str]) -> bool:
    """Whether a zip's member names are those of a TorchScript archive (``torch.jit.save``)."""
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _load_torchscript(path: Path, sha256: str, trusted: bool) -> _Loaded:
    # torch.jit.load's unpickler builds only torch and TorchScript types, but the archive's
    # TorchScript code runs: a class's __setstate__ during the load, and TorchScript can
    # call torch.save and torch.from_file (write any file). So a TorchScript file is a program.
    if not trusted:
        raise _untrusted(path, "is a TorchScript program, and loading it runs the code it holds, "
                               "which can write any of your files")
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError subclasses of many kinds
        raise ModelLoadError(f"could not read TorchScript model {path}: {first_line(error)}") from None
    return _named(path, network, sha256)


class ExportedNetwork:
    """A ``torch.export`` program as a callable ``(N, C, *S) -> (N, K, *S)``.

    Exported programs are specialised to the shapes they were exported with: a static
    batch size of 1 is run one image at a time. Not an ``nn.Module`` (an exported
    module cannot be switched to eval mode and its submodules cannot be hooked), so such
    a model supports region effects, not component effects.
    """

    def __init__(self, module, one_at_a_time: bool):
        self.module, self.one_at_a_time = module, one_at_a_time

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.one_at_a_time:
            return torch.cat([_first(self.module(item[None])) for item in batch])
        return _first(self.module(batch))

    def to(self, device) -> ExportedNetwork:
        self.module = self.module.to(device)
        return self


def _load_exported(path: Path, sha256: str, trusted: bool) -> _Loaded:
    # torch.export.load (torch 2.13) runs code from the archive in several ways: it reads the
    # sample inputs with torch.load(weights_only=True) and, when that fails, weights_only=False;
    # pickled weights and constants with weights_only=False; opaque constants with pickle.loads;
    # AOTInductor members as native libraries; and it parses the program's symbolic shapes
    # (JSON text) with sympy.sympify, which is eval. Checking the pickles would not make the
    # JSON safe, so an exported program is loaded only when trusted, like a pickled module.
    if not trusted:
        raise _untrusted(path, "is a torch.export program, and torch.export.load unpickles parts of it "
                               "and evaluates expressions from it, which can run any code the file holds")
    try:
        with open(path, "rb") as fh:  # torch.export.load accepts other suffixes only as a buffer
            program = torch.export.load(fh)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"could not read torch.export program {path}: {first_line(error)}") from None
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(user_inputs) != 1 or "val" not in user_inputs[0].meta:
        raise ModelLoadError(f"{path}: exported programs with one tensor input are supported, this one has {len(user_inputs)}")
    shape = tuple(user_inputs[0].meta["val"].shape)
    if len(shape) not in (4, 5):
        raise ModelLoadError(f"{path}: the exported input has shape {shape}; expected (N, C, H, W) or (N, C, D, H, W)")
    static = [isinstance(s, int) for s in shape]
    if static[0] and shape[0] != 1:
        raise ModelLoadError(f"{path}: exported with a fixed batch size of {shape[0]}; export with batch 1 or a dynamic batch")
    if not static[1]:
        raise ModelLoadError(f"{path}: the exported program has a dynamic channel count; export it with a fixed one")
    loaded = _named(path, ExportedNetwork(program.module(), one_at_a_time=static[0]), sha256)
    loaded.format_description = ModelDescription(
        spatial_dims=len(shape) - 2,
        in_channels=int(shape[1]),
        inferred=[f"spatial_dims={len(shape) - 2}, in_channels={shape[1]} (from the exported input shape)"],
    )
    if all(static[2:]):
        loaded.input_shape = tuple(int(s) for s in shape)
    return loaded


def _fit_fixed_shape(description: ModelDescription, input_shape: tuple[int, ...]) -> ModelDescription:
    """A program that accepts one spatial size only is applied by sliding windows of that size."""
    spatial = tuple(input_shape[2:])
    window = description.sliding_window
    if window is None:
        description.sliding_window = SlidingWindow(spatial)
        description.inferred.append(
            f"sliding_window roi_size={spatial} (the exported program accepts only this size; "
            "overlap 0.25 and constant blending are MONAI's defaults: set sliding_window to change them)"
        )
    elif window.window_size(spatial) != spatial:
        raise ModelLoadError(
            f"the exported program accepts only inputs of spatial size {spatial}, "
            f"but the description's sliding window is {window.window_size(spatial)}"
        )
    return description


def _load_pickle(path: Path, trusted: bool, sha256: str) -> _Loaded:
    """A ``torch.save`` file: a state dict (needs the network code) or a whole pickled module."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - weights_only refuses anything but tensors and containers
        if not isinstance(error, pickle.UnpicklingError):
            raise ModelLoadError(f"could not read {path}: {first_line(error)}") from None
        if not trusted:
            raise _untrusted(path, "is a whole pickled Python object (torch.save(model)), and unpickling "
                                   "it runs code from the file") from None
        content = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(content, nn.Module):
            raise ModelLoadError(f"{path} holds a {type(content).__name__}, not a torch.nn.Module") from None
        return _named(path, content, sha256)
    raise ModelLoadError(
        f"{path} holds only weights (a state dict), not the network: give the code that builds it, "
        f"e.g. load_model('package.module:build_network', checkpoint='{path}', trusted=True)"
        if isinstance(content, Mapping)
        else f"{path} holds a {type(content).__name__}, not a model"
    )


# ---------------------------------------------------------------------- factories
def _load_factory(spec: str, checkpoint, factory_kwargs: dict | None, trusted: bool) -> _Loaded:
    if not trusted:
        raise UntrustedModelError(
            f"building the network with {spec!r} imports and runs Python code; pass trusted=True "
            "only if you trust that code"
        )
    module_name, attribute = spec.split(":")
    try:
        factory = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"cannot import {module_name!r} for factory {spec!r}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(f"module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    network = factory(**(factory_kwargs or {}))
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(network).__name__}, not a torch.nn.Module")
    if checkpoint is None:
        return _Loaded(network, None, spec, name=attribute)
    path = Path(checkpoint)
    _load_weights(network, path)
    return _Loaded(network, hash_file(path), f"{spec} + {path}", name=path.stem, description_file=description_path_for(path))


def _not_torch_save(path: Path) -> str | None:
    """What ``path`` is instead of a ``torch.save`` file (zip or legacy format); None if it is one."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "is an incomplete zip archive (truncated download?)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if _is_torchscript(names):
            return "is a TorchScript program, not a state dict"
        return None if any(n.endswith("data.pkl") for n in names) else "is a zip archive but not a torch.save file"
    if head.startswith(b"\x93NUMPY"):
        return "is a NumPy array file (.npy), not a torch.save file"
    return None if LEGACY_TORCH_SAVE in head else "is not a file written by torch.save"


def _load_weights(network: nn.Module, path: Path) -> None:
    """Load a state dict file into ``network`` (``weights_only=True``; common wrappers unwrapped)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = _not_torch_save(path)
    if problem is not None:
        raise ModelLoadError(
            f"checkpoint {path} {problem}: give the file written by torch.save(model.state_dict(), path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False: never here
        raise ModelLoadError(
            f"checkpoint {path} holds Python objects besides tensors (a whole model or training state?), "
            "which napari-pdcr does not unpickle: save only the weights, torch.save(model.state_dict(), path)"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError subclasses of many kinds
        raise ModelLoadError(f"could not read checkpoint {path} as a state dict: {first_line(error)}") from None
    for key in ("state_dict", "model", "network"):  # checkpoints saved with training state
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        details = [line.strip() for line in str(error).splitlines()[1:]]
        raise ModelLoadError(f"checkpoint {path} does not fit the network: {_some(details)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {path} does not fit the network: missing {_some(result.missing_keys)}, "
            f"unexpected {_some(result.unexpected_keys)}"
        )


# ---------------------------------------------------------------------- MONAI bundles
def hash_bundle(root: Path) -> str:
    """sha256 over the files of a bundle folder's ``configs/`` and ``models/`` (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for sub in ("configs", "models") for p in (root / sub).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(bytes.fromhex(hash_file(path)))
    return digest.hexdigest()


def _untrusted_bundle(path) -> UntrustedModelError:
    return _untrusted(path, "is a MONAI bundle, and parsing its config runs arbitrary Python "
                            "('$' expressions and '_target_' objects)")


def _load_bundle_zip(path: Path, trusted: bool, sha256: str) -> _Loaded:
    if not trusted:
        raise _untrusted_bundle(path)
    with tempfile.TemporaryDirectory(prefix="pdcr-bundle-") as folder, zipfile.ZipFile(path) as archive:
        archive.extractall(folder)  # zipfile drops absolute paths and '..' (no writes outside)
        roots = sorted({p.parent.parent for p in Path(folder).rglob("configs/*")}, key=lambda p: len(p.parts))
        if not roots:
            raise ModelLoadError(f"{path} has an empty configs/ folder: it is not a complete MONAI bundle")
        loaded = _load_bundle(roots[0], trusted, sha256, path)
        if loaded.description_file is not None:  # the bundle's own pdcr.json: read it before the folder goes
            inside = ModelDescription.from_file(loaded.description_file)
            loaded.format_description = loaded.format_description.updated(inside)
    loaded.description_file = description_path_for(path)  # <stem>.pdcr.json beside the zip
    return loaded


def _load_bundle(root: Path, trusted: bool, sha256: str, shown_as) -> _Loaded:
    """Load a bundle folder: network from ``network_def`` + ``models/model.pt`` (or ``model.ts``)."""
    if not trusted:
        raise _untrusted_bundle(shown_as)
    from monai.bundle import ConfigParser

    config_file = next((root / "configs" / n for n in BUNDLE_CONFIGS if (root / "configs" / n).is_file()), None)
    if config_file is None:
        raise ModelLoadError(f"bundle {shown_as} has no configs/{' or configs/'.join(BUNDLE_CONFIGS)}")
    parser = ConfigParser()

    def read(method, file: Path) -> None:
        try:
            method(str(file))
        except Exception as error:  # noqa: BLE001 - json / yaml syntax errors, a config that is no mapping
            kind = "JSON" if file.suffix == ".json" else "YAML"
            raise ModelLoadError(
                f"bundle {shown_as}: configs/{file.name} is not a valid {kind} config "
                f"({first_line(error)}): correct the file or download the bundle again"
            ) from None

    read(parser.read_config, config_file)
    metadata = {}
    if (root / "configs" / "metadata.json").is_file():
        read(parser.read_meta, root / "configs" / "metadata.json")
        metadata = parser.get("_meta_", {}) or {}
    parser["bundle_root"] = str(root)

    weights = next((root / "models" / n for n in BUNDLE_WEIGHTS if (root / "models" / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"bundle {shown_as} has no models/{' or models/'.join(BUNDLE_WEIGHTS)}")
    if weights.suffix == ".ts":
        network = _load_torchscript(weights, sha256, trusted).network
    else:
        if "network_def" not in parser:
            raise ModelLoadError(f"bundle {shown_as}: {config_file.name} defines no 'network_def'")
        network = parser.get_parsed_content("network_def")
        _load_weights(network, weights)
    loaded = _Loaded(network, sha256, shown_as, name=Path(shown_as).stem, description_file=description_path_for(root))
    loaded.format_description = _bundle_description(parser, metadata)
    if "preprocessing" in parser:
        loaded.bundle_preprocessing = BundlePreprocessing.from_compose(parser.get_parsed_content("preprocessing"))
        loaded.format_description.preprocess = "bundle"
    return loaded


def _bundle_description(parser, metadata: dict) -> ModelDescription:
    """What a bundle's metadata, inferer and postprocessing say about the model."""
    found = ModelDescription()
    notes = found.inferred
    data_format = metadata.get("network_data_format", {})
    image = data_format.get("inputs", {}).get("image", {})
    if isinstance(image.get("num_channels"), int):
        found.in_channels = image["num_channels"]
    shape = image.get("spatial_shape")
    if isinstance(shape, list) and len(shape) in (2, 3):
        found.spatial_dims = len(shape)
        multiples = [int(m.group(1)) for s in shape if isinstance(s, str) and (m := re.match(r"^\s*(\d+)\s*\*\s*n\s*$", s))]
        if len(multiples) == len(shape):
            found.divisible_by = tuple(multiples)
    prediction = data_format.get("outputs", {}).get("pred", {})
    if isinstance(prediction.get("num_channels"), int):
        found.out_channels = prediction["num_channels"]
    if found.given():
        notes.append(f"from the bundle's metadata: {', '.join(f'{k}={v}' for k, v in found.given().items())}")

    if "inferer" in parser:
        inferer = parser.get_parsed_content("inferer")
        if type(inferer).__name__ == "SlidingWindowInferer":
            def plain(value):
                return float(value) if np.isscalar(value) else tuple(float(v) for v in value)

            found.sliding_window = SlidingWindow(
                roi_size=tuple(int(r) for r in inferer.roi_size),
                overlap=plain(inferer.overlap),
                mode=str(getattr(inferer.mode, "value", inferer.mode)),
                sigma_scale=plain(inferer.sigma_scale),
                batch_size=int(inferer.sw_batch_size),
            )
            notes.append(f"sliding window from the bundle's inferer: {found.sliding_window.describe()}")
    activation = _postprocessing_activation(parser.get("postprocessing"))
    if activation is not None:
        found.activation = activation
        notes.append(f"activation='{activation}' from the bundle's postprocessing")
    return found


def _postprocessing_activation(config) -> str | None:
    """'softmax' / 'sigmoid' if the (unparsed) postprocessing config has an Activations(d) transform."""
    def truthy(value) -> bool:
        return value is True or (isinstance(value, str) and value.strip("$ ").lower() == "true")

    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if str(item.get("_target_", "")).split(".")[-1] in ("Activations", "Activationsd"):
                if truthy(item.get("softmax")):
                    return "softmax"
                if truthy(item.get("sigmoid")):
                    return "sigmoid"
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
    return None


class BundlePreprocessing:
    """The intensity part of a MONAI bundle's preprocessing, applied to a ``(C, *S)`` array.

    Geometry and I/O transforms (loading, orientation, spacing, cropping, resizing) are
    left out: the explanation is computed on the image grid as given, so the image must
    already be in the model's space. ``dropped`` names what was left out.
    """

    def __init__(self, transforms: list, key: str, dropped: list[str]):
        self.transforms, self.key, self.dropped = transforms, key, dropped

    @classmethod
    def from_compose(cls, compose) -> BundlePreprocessing:
        from monai.transforms import MapTransform

        kept, dropped, key = [], [], "image"
        for transform in getattr(compose, "transforms", [compose]):
            name = type(transform).__name__
            if type(transform).__module__.startswith("monai.transforms.intensity") or name in TYPE_TRANSFORMS:
                kept.append(transform)
            else:
                dropped.append(name)
            if isinstance(transform, MapTransform) and key == "image" and "image" not in transform.keys:
                key = transform.keys[0]
        return cls(kept, key, dropped)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        from monai.transforms import MapTransform

        data = {self.key: array}
        for transform in self.transforms:
            if isinstance(transform, MapTransform):
                data = transform(data)
            else:
                data[self.key] = transform(data[self.key])
        value = data[self.key]
        out = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if out.shape != array.shape:
            raise ValueError(f"the bundle's preprocessing changed the image shape {array.shape} to {out.shape}")
        return out.astype(np.float32)

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.transforms) or "nothing"
        return f"bundle preprocessing [{names}]" + (f" (left out: {', '.join(self.dropped)})" if self.dropped else "")


# ---------------------------------------------------------------------- helpers
def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _some(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
