"""Files that would run code when loaded are refused unless trusted, at every entry point
(library, console, command line, widget), and bad checkpoints or bundle configs get the
project's own sentences (issues 10 and 18).

Every malicious file here is first shown to be live: loading it the plain way (torch,
numpy, pickle) creates a marker file. Then each entry point is shown to refuse it with
a sentence saying why and how to proceed, and the marker never appears.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pdcr.models.demo import ShallowCNN
from napari_pdcr.models.loading import ModelLoadError, UntrustedModelError, load_model

#: What each refusal names the file as, by kind of malicious model file.
WHAT = {"export": "is a torch.export program", "torchscript": "is a TorchScript program"}
#: The ways torch.export.load (torch 2.13) runs code from an archive, each a payload below.
EXPORT_PAYLOADS = ("sample inputs", "pickled weight", "opaque constant", "shape expression")
#: A valid ``torch.export`` sample-inputs value: the payload returns it after running.
SAMPLE_INPUTS = "((__import__('torch').zeros(1, 1, 16, 16),), {})"
FACTORY = "napari_pdcr.models.demo:ShallowCNN"


class Payload:
    """Unpickles to the value of ``expression`` after creating ``marker`` (it could run anything)."""

    def __init__(self, marker: Path, expression: str = "None"):
        self.marker, self.expression = marker, expression

    def __reduce__(self):
        return eval, (f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), {self.expression})[1]",)


class WritesOnLoad(torch.nn.Module):
    """A TorchScript network whose ``__setstate__``, run by ``torch.jit.load``, writes ``marker``."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 1, 3, 3))
        self.marker = marker

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, padding=1)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.marker, self.training = state
        torch.save(torch.ones(1), self.marker)  # TorchScript writes a file of its choice


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite_archive(source: Path, target: Path, change) -> Path:
    """Copy the zip ``source`` to ``target`` with ``change`` applied to its records (names below the root folder)."""
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    root = next(iter(members)).split("/")[0]
    records = {name[len(root) + 1 :]: data for name, data in members.items()}
    change(records)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(f"{root}/{name}", data)
    return target


def first_expression(node):
    """The first dict with an ``expr_str`` in a program's JSON (a symbolic shape)."""
    if isinstance(node, dict):
        if "expr_str" in node:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    return next((found for child in children if (found := first_expression(child)) is not None), None)


def malicious_export(folder: Path, marker: Path, how: str, name: str = "model.pt2") -> Path:
    """A real exported 2D network (1 -> 2 channels) whose archive runs a payload in the way ``how``."""
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    dynamic = how == "shape expression"  # symbolic shapes need a dynamic dimension
    example = torch.zeros(2 if dynamic else 1, 1, 16, 16)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    clean = folder / "clean.pt2"
    torch.export.save(torch.export.export(network, (example,), dynamic_shapes=shapes), clean)

    def change(records):
        if how == "sample inputs":
            records["data/sample_inputs/model.pt"] = saved(Payload(marker, SAMPLE_INPUTS))
        elif how == "pickled weight":
            config = json.loads(records["data/weights/model_weights_config.json"])
            config["config"]["0.bias"]["use_pickle"] = True
            records[f"data/weights/{config['config']['0.bias']['path_name']}"] = saved(Payload(marker, "torch.zeros(2)"))
            records["data/weights/model_weights_config.json"] = json.dumps(config).encode()
        elif how == "opaque constant":
            config = json.loads(records["data/constants/model_constants_config.json"])
            config["config"]["extra"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
            records["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
            records["data/constants/model_constants_config.json"] = json.dumps(config).encode()
        else:  # a symbolic shape in the program's JSON (no pickle at all)
            program = json.loads(records["models/model.json"])
            expression = first_expression(program)
            touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
            expression["expr_str"] = f"({touch}, {expression['expr_str']})[1]"
            records["models/model.json"] = json.dumps(program).encode()

    return rewrite_archive(clean, folder / name, change)


def malicious_torchscript(folder: Path, marker: Path, name: str = "model.pt") -> Path:
    path = folder / name
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), path)
    assert not marker.exists()  # saving runs nothing
    return path


def make_malicious(folder: Path, kind: str) -> tuple[Path, Path]:
    """(model file, marker) of a malicious model file of ``kind`` (see WHAT)."""
    marker = folder / f"marker-{kind}"
    if kind == "export":
        return malicious_export(folder, marker, "sample inputs"), marker
    return malicious_torchscript(folder, marker), marker


def assert_says_why_and_how(message: str, path: Path, what: str) -> None:
    """One sentence naming the file and why it is refused, and how to proceed."""
    assert "\n" not in message, message
    assert str(path) in message and what in message, message
    assert "run" in message and "code" in message, message
    assert "pass trusted=True" in message and "only if you trust where it came from" in message, message
    assert "state dict" in message, message  # the alternative to trusting the file


@pytest.fixture
def torch_export_log(caplog):
    """Silence torch's warning after its weights_only=False fallback: its format string lacks an
    argument, which pytest's log capture turns into an error (outside pytest it prints and goes on)."""
    caplog.set_level(logging.ERROR, logger="torch._export.serde.serialize")


# ---------------------------------------------------------------------- the payloads are live
@pytest.mark.usefixtures("torch_export_log")
@pytest.mark.parametrize("how", EXPORT_PAYLOADS)
def test_export_payload_is_live(tmp_path, how):
    """Plain ``torch.export.load`` runs each payload: the archives below are really malicious."""
    marker = tmp_path / "marker"
    path = malicious_export(tmp_path, marker, how)
    with open(path, "rb") as fh, contextlib.suppress(Exception):  # some payloads break the program after running
        torch.export.load(fh)
    assert marker.exists()


@pytest.mark.usefixtures("torch_export_log")
def test_sample_inputs_payload_leaves_a_working_model(tmp_path):
    """Nothing looks wrong after the attack: the program loads and runs normally."""
    marker = tmp_path / "marker"
    with open(malicious_export(tmp_path, marker, "sample inputs"), "rb") as fh:
        program = torch.export.load(fh)
    assert marker.exists()
    assert program.module()(torch.ones(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_torchscript_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    torch.jit.load(str(malicious_torchscript(tmp_path, marker)))
    assert marker.exists()


# ---------------------------------------------------------------------- library
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])  # the content decides the format, not the name
@pytest.mark.parametrize("how", EXPORT_PAYLOADS)
def test_load_model_refuses_an_exported_program_without_trust(tmp_path, how, suffix):
    marker = tmp_path / "marker"
    path = malicious_export(tmp_path, marker, how, name=f"model{suffix}")
    with pytest.raises(UntrustedModelError) as caught:
        load_model(path)
    assert not marker.exists()
    assert_says_why_and_how(str(caught.value), path, WHAT["export"])


@pytest.mark.parametrize("suffix", [".pt", ".ts", ".pt2"])
def test_load_model_refuses_a_torchscript_program_without_trust(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = malicious_torchscript(tmp_path, marker, name=f"model{suffix}")
    with pytest.raises(UntrustedModelError) as caught:
        load_model(path)
    assert not marker.exists()
    assert_says_why_and_how(str(caught.value), path, WHAT["torchscript"])


@pytest.mark.usefixtures("torch_export_log")
@pytest.mark.parametrize("kind", sorted(WHAT))
def test_trusted_loads_what_untrusted_refuses(tmp_path, kind):
    """The advice works: with trusted=True the same file loads (and, being trusted, runs its code)."""
    path, marker = make_malicious(tmp_path, kind)
    model = load_model(path, trusted=True, description={"spatial_dims": 2, "in_channels": 1})
    assert model.sha256 is not None and (model.spatial_dims, model.in_channels) == (2, 1)
    assert marker.exists()


# ---------------------------------------------------------------------- console, command line, widget
@pytest.fixture(params=sorted(WHAT))
def malicious(request, tmp_path) -> tuple[Path, Path, str]:
    """(model file, marker, what the refusal calls it) for each kind of malicious model file."""
    path, marker = make_malicious(tmp_path, request.param)
    return path, marker, WHAT[request.param]


def image_and_region() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    region = np.zeros((32, 32), bool)
    region[8:16, 8:16] = True
    return image, region


def test_console_refuses_without_trust(malicious):
    from napari_pdcr.console import explain

    path, marker, what = malicious
    image, region = image_and_region()
    with pytest.raises(UntrustedModelError) as caught:
        explain(image, region, model=str(path), intervention="zero")
    assert not marker.exists()
    assert_says_why_and_how(str(caught.value), path, what)


def test_command_line_refuses_without_trust(malicious, tmp_path, capsys):
    from napari_pdcr import cli

    path, marker, what = malicious
    image = tmp_path / "image.npy"
    np.save(image, image_and_region()[0])
    code = cli.main(["explain", str(image), "--model", str(path), "--box-start", "8", "8", "--box-size", "8",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert not marker.exists()
    assert what in err and "code" in err and "--trusted" in err and "Traceback" not in err, err


@pytest.mark.gui
def test_widget_refuses_without_trust(malicious, make_napari_viewer, qtbot):
    pytest.importorskip("qtpy")
    from napari.utils.notifications import notification_manager
    from test_napari_widget import dock, paint, wait_for_run

    path, marker, what = malicious
    viewer = make_napari_viewer()
    viewer.open_sample("napari-pdcr", "colin27_slice")
    widget = dock(viewer)
    paint(widget.brush_region(), [(70, 60)])
    widget.model_choice.setCurrentText("model file…")
    widget.model_path.setText(str(path))
    widget.intervention.setCurrentText("zero")
    assert not widget.trusted.isChecked()
    start = len(notification_manager.records)
    widget.run()
    wait_for_run(qtbot, widget)
    errors = [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]
    assert not marker.exists()
    assert any(str(path) in m and what in m and "trusted" in m for m in errors), errors
    assert widget.run_button.isEnabled() and "failed" in widget.progress.format()


# ---------------------------------------------------------------------- the other loading paths
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_pickled_input_image_runs_nothing(tmp_path, capsys, suffix):
    """Input images are read with allow_pickle=False: an object array is refused, not unpickled."""
    from napari_pdcr import cli

    marker = tmp_path / "marker"
    objects = np.array([Payload(marker), 1.0], dtype=object)
    image = tmp_path / f"image{suffix}"
    if suffix == ".npy":
        np.save(image, objects, allow_pickle=True)
    else:
        np.savez(image, image=objects)
    code = cli.main(["explain", str(image), "--box-start", "0", "--output", str(tmp_path / "out")])
    assert code != 0 and "Traceback" not in capsys.readouterr().err
    assert not marker.exists()
    loaded = np.load(image, allow_pickle=True)  # the plain way runs the payload: the file is live
    if suffix == ".npz":
        loaded["image"]
    assert marker.exists()


@pytest.mark.parametrize("variant", ["zarr v2 array with the pickle filter", "zarr v3 array with a pickle codec"])
def test_a_result_store_with_a_pickled_array_runs_nothing(tmp_path, variant):
    """Result stores are JSON and numeric arrays: zarr 3 has no pickle codec and ignores v2 nodes."""
    from test_napari_layers import make_explanation

    from napari_pdcr.io.results import load_explanation, save_explanation

    marker = tmp_path / "marker"
    chunk = pickle.dumps(np.array([Payload(marker)], dtype=object))
    store = tmp_path / "result.zarr"
    save_explanation(make_explanation(), store)
    node = store / "block_effects"
    metadata = json.loads((node / "zarr.json").read_text())
    shutil.rmtree(node)
    node.mkdir()
    if variant.startswith("zarr v2"):
        (node / ".zarray").write_text(json.dumps({
            "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": 0,
            "filters": [{"id": "pickle", "protocol": 5}], "order": "C", "dimension_separator": ".",
        }))
        (node / "0").write_bytes(chunk)
    else:
        metadata.update(shape=[1], chunk_grid={"name": "regular", "configuration": {"chunk_shape": [1]}},
                        codecs=[{"name": "numcodecs.pickle", "configuration": {"protocol": 5}}])
        (node / "zarr.json").write_text(json.dumps(metadata))
        (node / "c").mkdir()
        (node / "c" / "0").write_bytes(chunk)
    with pytest.raises(ValueError, match="block_effects"):
        load_explanation(store)
    assert not marker.exists()
    pickle.loads(chunk)  # the chunk itself is live
    assert marker.exists()


def test_a_torchscript_bundle_needs_trust(tmp_path):
    """A bundle's TorchScript weights are a program too: refused untrusted, before anything runs."""
    marker = tmp_path / "marker"
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text("{}")
    malicious_torchscript(root / "models", marker, name="model.ts")
    with pytest.raises(UntrustedModelError, match="is a MONAI bundle"):
        load_model(root)
    assert not marker.exists()


# ---------------------------------------------------------------------- checkpoints and bundle configs
def bad_checkpoint(folder: Path, kind: str) -> Path:
    path = folder / f"{kind.replace(' ', '_')}.pt"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("epoch 10: loss 0.12\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "numpy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((4, 4), np.float32))
    elif kind == "truncated":
        whole = saved(ShallowCNN().state_dict())
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 1, 3)), path)
    else:  # a pickled object besides tensors, carrying a payload
        path.write_bytes(saved({"state_dict": {}, "config": Payload(folder / "marker")}))
    return path


CHECKPOINT_PROBLEMS = {
    "random bytes": "is not a file written by torch.save",
    "text": "is not a file written by torch.save",
    "empty": "is not a file written by torch.save",
    "numpy": "is a NumPy array file (.npy), not a torch.save file",
    "truncated": "is an incomplete zip archive (truncated download?)",
    "torchscript": "is a TorchScript program, not a state dict",
    "pickled object": "holds Python objects besides tensors",
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_PROBLEMS))
def test_a_bad_checkpoint_gets_the_projects_own_sentence(tmp_path, kind):
    path = bad_checkpoint(tmp_path, kind)
    with pytest.raises(ModelLoadError) as caught:
        load_model(FACTORY, checkpoint=path, trusted=True)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} {CHECKPOINT_PROBLEMS[kind]}"), message
    assert "torch.save(model.state_dict(), path)" in message, message  # how to proceed
    assert "weights_only" not in message and "\n" not in message, message
    assert not (tmp_path / "marker").exists()


def test_a_legacy_format_checkpoint_still_loads(tmp_path):
    network = ShallowCNN()
    path = tmp_path / "legacy.pt"
    torch.save(network.state_dict(), path, _use_new_zipfile_serialization=False)
    model = load_model(FACTORY, checkpoint=path, trusted=True, description={"spatial_dims": 2, "in_channels": 1})
    image = torch.rand(1, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(model.network(image), network.eval()(image))


@pytest.mark.parametrize("file, text, kind", [
    ("inference.json", '{"network_def": {', "JSON"),
    ("inference.json", "[1, 2]", "JSON"),
    ("inference.yaml", "network_def: [1, 2\nb: :\n", "YAML"),
    ("metadata.json", "{not json", "JSON"),
])
def test_an_invalid_bundle_config_is_named(tmp_path, file, text, kind):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    if file == "metadata.json":
        (root / "configs" / "inference.json").write_text("{}")
    (root / "configs" / file).write_text(text)
    with pytest.raises(ModelLoadError) as caught:
        load_model(root, trusted=True)
    message = str(caught.value)
    assert message.startswith(f"bundle {root}: configs/{file} is not a valid {kind} config ("), message
    assert message.endswith("correct the file or download the bundle again") and "\n" not in message, message


def test_a_bundle_zip_with_an_empty_configs_folder_is_named(tmp_path):
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("configs/", "")
        zf.writestr("models/model.pt", saved({}))
    with pytest.raises(ModelLoadError, match="has an empty configs/ folder: it is not a complete MONAI bundle"):
        load_model(archive, trusted=True)
