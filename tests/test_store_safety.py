"""Saving never destroys user data, a killed save loses nothing, a damaged store says so (issue 10)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from napari.components import ViewerModel
from synthetic import random_image, tap_model, torch_threads

from napari_pdcr import PatchBank, RegionEffects, RegionExplanation, box_region
from napari_pdcr._napari.reader import get_reader, read_explanation
from napari_pdcr._napari.viewer import add_to_viewer
from napari_pdcr._napari.writer import write_explanation
from napari_pdcr.io import results
from napari_pdcr.io.results import DamagedStoreError, load_explanation, save_explanation

DAMAGED = "this result store is damaged: "


@pytest.fixture(scope="module")
def explanation() -> RegionExplanation:
    """A real (engine-made) explanation of a 32x32 image in 4x4 blocks, with a reference and extras."""
    with torch_threads(1):
        model, _ = tap_model(2, 4, [((-2, 1), 2.0), ((1, -2), -1.0)], activation="sigmoid", bias=(-1.0,), gain=(3.0,))
        bank = PatchBank([random_image((1, 32, 32), 40)], size=100, seed=9)
        ex = RegionEffects(model, bank, "soft_dice", block_shape=4, n_estimate=8, seed=1234, mode="exact").attribute(
            random_image((1, 32, 32), seed=3), box_region((32, 32), (12, 12), 8),
            reference=box_region((32, 32), (10, 10), 10), spacing=(0.5, 0.7),
        )
    ex.extras["component_effects"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    return ex


@pytest.fixture
def other(explanation) -> RegionExplanation:
    """A second result, told apart from ``explanation`` by its block effects."""
    return dataclasses.replace(explanation, block_effects=explanation.block_effects + 1.0, extras={})


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Everything at ``path``: each file's bytes, each folder as None (keys relative to ``path``)."""
    if not path.is_dir():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_same_result(loaded: RegionExplanation, expected: RegionExplanation):
    np.testing.assert_array_equal(loaded.block_effects, expected.block_effects)
    np.testing.assert_array_equal(loaded.target_region, expected.target_region)


# ---------------------------------------------------------------------------- what save() refuses


def user_folder(path: Path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "scans").mkdir()
    (path / "scans" / "scan.bin").write_bytes(bytes(range(256)))


def regular_file(path: Path):
    path.write_bytes(b"a file that happens to end in .zarr")


def zarr_image_store(path: Path):
    root = zarr.open_group(str(path), mode="w")
    root.create_array("image", data=random_image((16, 16), seed=1))
    root.attrs["description"] = "my image"


REFUSED = {
    "user folder": (user_folder, "is a folder that is not a napari-pdcr result store and was left untouched"),
    "regular file": (regular_file, "is a file, not a napari-pdcr result store, and was left untouched"),
    "zarr image store": (zarr_image_store, "is a zarr store that napari-pdcr did not write and was left untouched"),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("thing", list(REFUSED))
def test_save_never_replaces_what_napari_pdcr_did_not_write(tmp_path, explanation, thing, overwrite):
    make, message = REFUSED[thing]
    path = tmp_path / "result.zarr"
    make(path)
    before = snapshot(path)
    with pytest.raises(FileExistsError) as info:
        explanation.save(path, overwrite=overwrite)
    assert str(info.value) == (f"{path} {message}: save to a new path "
                               "(save() replaces only a previous napari-pdcr result store)")
    assert snapshot(path) == before
    assert hidden(tmp_path) == []
    if thing == "zarr image store":
        np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["image"][...], random_image((16, 16), seed=1))


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_keeps_a_result_store_that_holds_other_files(tmp_path, explanation, other, overwrite):
    path = tmp_path / "result.zarr"
    explanation.save(path)
    (path / "my notes.txt").write_text("written by the user into the store folder")
    (path / "block_effects" / "plot.png").write_bytes(b"\x89PNG")
    before = snapshot(path)
    with pytest.raises(FileExistsError) as info:
        other.save(path, overwrite=overwrite)
    assert str(info.value) == (f"{path} is a napari-pdcr result store that also holds other files "
                               "(block_effects/plot.png, my notes.txt) and was left untouched: "
                               "move them out or save to a new path")
    assert snapshot(path) == before


def test_save_keeps_the_folder_behind_a_symbolic_link(tmp_path, explanation):
    data = tmp_path / "data"
    user_folder(data)
    before = snapshot(data)
    link = tmp_path / "result.zarr"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(FileExistsError, match=re.escape(f"{link} is a symbolic link and was left untouched")):
        explanation.save(link, overwrite=True)
    assert link.is_symlink() and snapshot(data) == before


def test_save_replaces_only_a_previous_result_store(tmp_path, explanation, other):
    path = tmp_path / "result.zarr"
    assert explanation.save(path) == path
    assert other.save(path) == path  # default: a previous result is replaced
    assert_same_result(load_explanation(path), other)
    before = snapshot(path)
    with pytest.raises(FileExistsError) as info:
        explanation.save(path, overwrite=False)
    assert str(info.value) == (f"{path} already holds a napari-pdcr result: pass overwrite=True to replace it, "
                               "or save to a new path")
    assert snapshot(path) == before
    assert hidden(tmp_path) == []
    # a store of format 1 (before checksums) counts as a previous result too
    shutil.rmtree(path)
    write_format_1(explanation, path)
    save_explanation(other, path)
    assert_same_result(load_explanation(path), other)
    assert hidden(tmp_path) == []


def test_save_into_an_empty_folder(tmp_path, explanation):
    path = tmp_path / "result.zarr"
    path.mkdir()
    explanation.save(path, overwrite=False)
    assert_same_result(load_explanation(path), explanation)


def test_unsaveable_arrays_are_refused_before_anything_is_written(tmp_path, explanation):
    path = tmp_path / "result.zarr"
    with pytest.raises(ValueError) as info:
        save_explanation(dataclasses.replace(explanation, extras={"labels": np.array(["a", "b"])}), path)
    assert str(info.value) == ("array 'extras/labels' has dtype <U1, and a result store holds boolean or numeric "
                               "arrays only: convert it first (e.g. numpy.asarray(x, dtype=float))")
    with pytest.raises(ValueError) as info:
        save_explanation(dataclasses.replace(explanation, extras={"../escape": np.ones(2)}), path)
    assert str(info.value) == ("array name 'extras/../escape' cannot be saved in a result store: use letters, "
                               "digits, '_', '-' and '.' (groups separated by '/')")
    assert not path.exists() and hidden(tmp_path) == []


def test_napari_writer_refuses_other_things_and_replaces_a_result(tmp_path, explanation, other):
    viewer = ViewerModel()
    ate = add_to_viewer(viewer, explanation, show_prediction=False)[0]
    folder = tmp_path / "saved.zarr"
    user_folder(folder)
    before = snapshot(folder)
    with pytest.raises(FileExistsError, match=re.escape(f"{folder} is a folder that is not a napari-pdcr result")):
        write_explanation(str(tmp_path / "saved"), ate.data, ate._get_state())
    assert snapshot(folder) == before
    store = tmp_path / "result.zarr"
    save_explanation(other, store)
    assert write_explanation(str(store), ate.data, ate._get_state()) == [str(store)]
    assert_same_result(load_explanation(store), explanation)


# ---------------------------------------------------------------------------- a killed save

#: Saves ``other`` over the store at argv[1], pausing (to be killed) at the point argv[2].
KILLED_SAVE = r"""
import os, sys, time
from napari_pdcr.io import results

path, point = sys.argv[1], sys.argv[2]
explanation = results.load_explanation(path)
explanation.block_effects = explanation.block_effects + 1.0

def pause():
    print("paused", flush=True)
    time.sleep(120)

exchange = results._exchange
if point == "temporary written":
    def paused_exchange(a, b):
        pause()
        return exchange(a, b)
elif point == "swapped, old store not yet deleted":
    def paused_exchange(a, b):
        done = exchange(a, b)
        pause()
        return done
else:  # "between the two renames": a system that cannot swap folders
    replace = os.replace
    def paused_replace(src, dst):
        replace(src, dst)
        if ".old-" in os.path.basename(dst):
            pause()
    os.replace = paused_replace
    def paused_exchange(a, b):
        return False
results._exchange = paused_exchange
results.save_explanation(explanation, path)
"""


def kill_a_save(path: Path, point: str):
    """Run a save over ``path`` in a subprocess and SIGKILL it at ``point``."""
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), point],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line == "paused\n", process.communicate(timeout=60)[1]
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def can_swap(folder: Path) -> bool:
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return results._exchange(folder / "a", folder / "b")
    finally:
        (folder / "a").rmdir()
        (folder / "b").rmdir()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
@pytest.mark.parametrize("then", ["load", "save"])
@pytest.mark.parametrize("point", ["temporary written", "swapped, old store not yet deleted", "between the two renames"])
def test_a_killed_save_leaves_a_loadable_store_and_nothing_in_the_way(tmp_path, explanation, other, point, then):
    """After the kill, the store at the path loads (``then="load"``), or the next save replaces it
    (``then="save"``); either first clears what the killed save left."""
    if point != "between the two renames" and not can_swap(tmp_path):
        pytest.skip("this file system cannot swap folders")
    path = tmp_path / "result.zarr"
    explanation.save(path)
    kill_a_save(path, point)
    left = hidden(tmp_path)
    if point == "between the two renames":
        assert not path.exists()  # the window: only the backup holds the old store
        assert any(".old-" in name for name in left)
    else:
        assert path.is_dir()  # the store is at its path whenever the save dies
    assert any(".tmp-" in name for name in left)

    if then == "load":
        loaded = load_explanation(path)
        saved_by_the_killed_run = point == "swapped, old store not yet deleted"
        expected = dataclasses.replace(explanation, block_effects=explanation.block_effects + 1.0) if (
            saved_by_the_killed_run) else explanation
        assert_same_result(loaded, expected)
        assert loaded.extras.keys() == explanation.extras.keys()
        assert hidden(tmp_path) == []
    other.save(path, overwrite=True)
    assert hidden(tmp_path) == []  # cleared by the save itself (before any load)
    assert_same_result(load_explanation(path), other)


def test_a_running_save_keeps_its_temporary(tmp_path, explanation):
    """Only temporaries of processes that no longer run are cleared (this one runs)."""
    path = tmp_path / "result.zarr"
    running = tmp_path / f".result.zarr.tmp-{os.getpid()}-0123abcd"
    running.mkdir()
    explanation.save(path)
    load_explanation(path)
    assert hidden(tmp_path) == [running.name]


# ---------------------------------------------------------------------------- damaged stores


def edit_fields(path: Path, **changes):
    """Change (None: delete) fields of the store's root attributes, as a text editor would."""
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    fields = meta["attributes"]["napari_pdcr"]
    for key, value in changes.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    meta_file.write_text(json.dumps(meta))


def chunk_files(path: Path, name: str) -> list[Path]:
    return sorted(p for p in (path / name / "c").rglob("*") if p.is_file())


def delete_chunk(path):
    chunk_files(path, "block_effects")[0].unlink()


def truncate_chunk(path):
    chunk = chunk_files(path, "prediction")[0]
    chunk.write_bytes(chunk.read_bytes()[:5])


def rewrite(path, name, data, **options):
    """Rewrite array ``name`` with zarr itself (valid chunks, other content or encoding)."""
    zarr.open_group(str(path), mode="r+").create_array(name, data=data, overwrite=True, **options)


def forge_checksum(path, name):
    """Record the current content of ``name`` as its checksum (a consistent tamper)."""
    data = np.ascontiguousarray(zarr.open_group(str(path), mode="r")[name][...])
    arrays = json.loads((path / "zarr.json").read_text())["attributes"]["napari_pdcr"]["arrays"]
    arrays[name]["sha256"] = hashlib.sha256(data.data).hexdigest()
    edit_fields(path, arrays=arrays)


def status_code_nine(path):
    status = zarr.open_group(str(path), mode="r")["block_status"][...]
    status[0, 0] = 9
    rewrite(path, "block_status", status)
    forge_checksum(path, "block_status")


DAMAGE = {
    "deleted chunk": (delete_chunk, "array 'block_effects' is missing 1 of its 1 chunks"),
    "truncated chunk": (truncate_chunk, "array 'prediction' cannot be read (Zstd decompression error"),
    "missing array": (lambda p: shutil.rmtree(p / "block_status"), "array 'block_status' is missing"),
    "inconsistent block_shape": (
        lambda p: edit_fields(p, block_shape=[8, 4]),
        "array 'block_effects' has shape (8, 8), but block_shape [8, 4] on masks of shape (32, 32) makes a (4, 8) grid",
    ),
    "block_shape of another dimension": (
        lambda p: edit_fields(p, block_shape=[4, 4, 4]),
        "the field 'block_shape' [4, 4, 4] has 3 axes, but the masks (32, 32) have 2",
    ),
    "block_shape of the wrong type": (
        lambda p: edit_fields(p, block_shape="4x4"),
        "the field 'block_shape' is '4x4', not a list of positive integers",
    ),
    "base_outcome of the wrong type": (
        lambda p: edit_fields(p, base_outcome="high"), "the field 'base_outcome' is 'high', not a number",
    ),
    "parameters of the wrong type": (
        lambda p: edit_fields(p, parameters=[1, 2]), "the field 'parameters' is [1, 2], not a mapping",
    ),
    "spacing of the wrong sign": (
        lambda p: edit_fields(p, spacing=[0.5, -0.7]),
        "the field 'spacing' is [0.5, -0.7], not null or a list of positive numbers",
    ),
    "missing field": (lambda p: edit_fields(p, provenance=None), "the field 'provenance' is missing"),
    "altered bytes": (
        lambda p: rewrite(p, "block_effects", np.full((8, 8), 5.0, np.float32)),
        "array 'block_effects' does not match the checksum recorded when it was saved (its bytes were altered)",
    ),
    "edited fields": (
        lambda p: edit_fields(p, base_outcome=1.5),
        "its fields (parameters, provenance, ...) do not match the checksum recorded when they were saved",
    ),
    "array of another dtype": (
        lambda p: rewrite(p, "block_draws", np.zeros((8, 8), np.float64)),
        "array 'block_draws' is float64, not the int32 it was saved as",
    ),
    "array of another shape": (
        lambda p: rewrite(p, "target_region", np.zeros((16, 16), np.uint8)),
        "array 'target_region' has shape [16, 16], not the [32, 32] it was saved with",
    ),
    "codec napari-pdcr never writes": (
        lambda p: rewrite(p, "block_effects", load_explanation(p).block_effects, compressors=zarr.codecs.GzipCodec()),
        "array 'block_effects' uses codec 'gzip', which napari-pdcr never writes",
    ),
    "unknown status codes": (status_code_nine, "array 'block_status' holds codes [9] that are no NodeStatus"),
    "malformed record of arrays": (
        lambda p: edit_fields(p, arrays="all there"), "the record of its arrays ('arrays') is missing or malformed",
    ),
    "malformed format version": (
        lambda p: edit_fields(p, format_version="two"), "'format_version' is 'two', not a positive integer",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_named(tmp_path, explanation, kind):
    damage, problem = DAMAGE[kind]
    path = tmp_path / "result.zarr"
    explanation.save(path)
    damage(path)
    with pytest.raises(DamagedStoreError) as info:
        load_explanation(path)
    message = str(info.value)
    assert message.startswith(DAMAGED + problem), message
    assert message.endswith(f"({path}); restore it from a backup or run the explanation again")
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as one line


def test_the_reader_reports_the_damage(tmp_path, explanation):
    path = tmp_path / "result.zarr"
    explanation.save(path)
    truncate_chunk(path)
    assert get_reader(str(path)) is read_explanation  # claimed, so that napari shows why it fails
    with pytest.raises(DamagedStoreError, match=re.escape(DAMAGE["truncated chunk"][1])):
        read_explanation(str(path))


@pytest.mark.gui
def test_napari_shows_the_damage(make_napari_viewer, tmp_path, explanation):
    path = tmp_path / "result.zarr"
    explanation.save(path)
    delete_chunk(path)
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:  # noqa: B017 - napari wraps the reader's error
        viewer.open(str(path), plugin="napari-pdcr")
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any(DAMAGE["deleted chunk"][1] in text for text in chain), chain
    assert len(viewer.layers) == 0


# ---------------------------------------------------------------------------- stores of format 1


def write_format_1(explanation: RegionExplanation, path: Path):
    """A store laid out as napari-pdcr wrote it before checksums (format 1)."""
    root = zarr.open_group(str(path), mode="w")
    for name in ("block_effects", "block_standard_error", "block_draws", "block_status"):
        root.create_array(name, data=getattr(explanation, name))
    for name in ("target_region", "prediction", "reference"):
        root.create_array(name, data=getattr(explanation, name).astype(np.uint8))
    extras = root.create_group("extras")
    for name, array in explanation.extras.items():
        extras.create_array(name, data=array)
    fields = {
        "kind": "region_explanation", "format_version": 1, "block_shape": list(explanation.block_shape),
        "base_outcome": explanation.base_outcome, "parameters": explanation.parameters,
        "model_identity": explanation.model_identity, "provenance": explanation.provenance,
        "timings": explanation.timings, "forward_passes": explanation.forward_passes,
        "spacing": list(explanation.spacing), "log": explanation.log, "summary": explanation.summary(),
    }
    root.attrs["napari_pdcr"] = json.loads(json.dumps(fields, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def test_a_format_1_store_loads_with_a_warning_and_the_same_checks(tmp_path, explanation):
    path = tmp_path / "old.zarr"
    write_format_1(explanation, path)
    with pytest.warns(UserWarning, match="without checksums, so a missing or altered chunk cannot be detected"):
        loaded = load_explanation(path)
    assert_same_result(loaded, explanation)
    np.testing.assert_array_equal(loaded.reference, explanation.reference)
    np.testing.assert_array_equal(loaded.extras["component_effects"], explanation.extras["component_effects"])
    assert loaded.base_outcome == explanation.base_outcome and loaded.spacing == explanation.spacing

    for damage, problem in [DAMAGE["inconsistent block_shape"], DAMAGE["missing array"], DAMAGE["truncated chunk"]]:
        shutil.rmtree(path)
        write_format_1(explanation, path)
        damage(path)
        with pytest.raises(DamagedStoreError, match=re.escape(problem)):
            load_explanation(path)


def test_a_store_of_another_kind_or_none_is_not_damaged(tmp_path, explanation):
    path = tmp_path / "result.zarr"
    results.write_store(path, "future_kind", {"ate": np.ones(3, np.float32)}, {"note": "x"})
    with pytest.raises(ValueError) as info:
        load_explanation(path)
    assert not isinstance(info.value, DamagedStoreError)
    assert str(info.value).startswith(f"{path} holds a napari-pdcr 'future_kind' result, not ")
    kind, arrays, meta = results.read_store(path)
    assert kind == "future_kind" and meta == {"note": "x"}
    np.testing.assert_array_equal(arrays["ate"], np.ones(3, np.float32))
    assert get_reader(str(path)) is None
