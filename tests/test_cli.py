"""The command line ``napari-pdcr explain``: bad input ends in one line on stderr, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_pdcr import cli
from napari_pdcr.io import images
from napari_pdcr.io.results import load_explanation
from napari_pdcr.models.demo import demo_weights_path
from napari_pdcr.samples import load_sample

#: A budget that runs the 2D demo model on a 64x64 crop in about a second.
SMALL = ["--block", "32", "--screen", "1", "--draws", "2"]


@pytest.fixture(scope="module")
def brain_crop(tmp_path_factory) -> str:
    """A 64x64 crop of the Colin27 slice that holds the brain's left edge, as .npy."""
    sample = load_sample("colin27_slice")
    rows = np.flatnonzero(sample["mask"].any(axis=1))
    row = int((rows[0] + rows[-1]) // 2)
    path = tmp_path_factory.mktemp("images") / "brain.npy"
    np.save(path, sample["image"][row - 32 : row + 32, :64])
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)``: exit code, stdout, stderr."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single error line on stderr (fails on more lines or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("napari-pdcr: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_subprocess_error_is_one_line(tmp_path):
    text = tmp_path / "image.npy"
    text.write_text("1 2 3\n4 5 6\n")
    result = subprocess.run(
        [sys.executable, "-m", "napari_pdcr.cli", "explain", str(text), "--box-start", "0", "0",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "is not a NumPy .npy/.npz file" in line
    assert not (tmp_path / "out").exists()


def test_untrusted_pickled_module_is_refused(capsys, tmp_path, brain_crop):
    model = tmp_path / "whole.pt"
    torch.save(torch.nn.Conv2d(1, 1, 3), model)
    code, _, err = run(capsys, "explain", brain_crop, "--model", str(model), "--box-start", "0", "0",
                       "--output", str(tmp_path / "out"))
    assert code == 1
    line = one_error_line(err)
    assert "pickled" in line and "--trusted" in line


def test_output_that_is_a_file_is_refused_before_anything_is_loaded(capsys, tmp_path):
    output = tmp_path / "results"
    output.write_text("user data")
    start = time.perf_counter()
    # the image and the model do not exist either: the output is checked first
    code, _, err = run(capsys, "explain", str(tmp_path / "missing.npy"), "--model", str(tmp_path / "no.pt"),
                       "--box-start", "0", "0", "--output", str(output))
    assert time.perf_counter() - start < 5
    assert code == 1
    assert "--output" in one_error_line(err) and "is an existing file" in err
    assert output.read_text() == "user data"


def test_foreign_store_or_figure_in_output_is_refused_before_computing(capsys, tmp_path, brain_crop):
    store = tmp_path / "a" / "brain.zarr"
    store.mkdir(parents=True)
    (store / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "explain", brain_crop, "--model", str(tmp_path / "no.pt"),
                       "--box-start", "0", "0", "--output", str(tmp_path / "a"))
    assert code == 1
    assert "is not a napari-pdcr result store" in one_error_line(err)
    assert (store / "notes.txt").read_text() == "mine"

    figure = tmp_path / "b" / "brain.png"
    figure.parent.mkdir()
    figure.write_bytes(b"my figure")
    code, _, err = run(capsys, "explain", brain_crop, "--box-start", "0", "0", "--output", str(tmp_path / "b"))
    assert code == 1
    assert "brain.png exists" in one_error_line(err)
    assert figure.read_bytes() == b"my figure"


def test_image_folder_is_refused(capsys, tmp_path):
    folder = tmp_path / "scan.npy"
    folder.mkdir()
    code, _, err = run(capsys, "explain", str(folder), "--box-start", "0", "0", "--output", str(tmp_path / "o"))
    assert code == 1
    assert "is a folder, not an image file" in one_error_line(err)


def test_text_and_object_files_named_npy_are_refused_without_pickle_hint(capsys, tmp_path):
    text = tmp_path / "text.npy"
    text.write_text("0.1 0.2\n0.3 0.4\n")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for path, expected in ((text, "is not a NumPy .npy/.npz file"), (objects, "holds Python objects")):
        code, _, err = run(capsys, "explain", str(path), "--box-start", "0", "0", "--output", str(tmp_path / "o"))
        assert code == 1
        line = one_error_line(err)
        assert expected in line
        assert "allow_pickle" not in line


def test_3d_volume_to_2d_model_names_the_dimensionality(capsys, tmp_path):
    volume = tmp_path / "volume.npy"
    np.save(volume, np.zeros((16, 64, 64), np.float32))
    code, _, err = run(capsys, "explain", str(volume), "--box-start", "0", "0", "--output", str(tmp_path / "o"))
    assert code == 1
    line = one_error_line(err)
    assert "3D" in line and "2D" in line
    assert "channel" not in line


def test_factory_needs_a_checkpoint(capsys, tmp_path, brain_crop):
    code, _, err = run(capsys, "explain", brain_crop, "--model", "napari_pdcr.models.demo:ShallowCNN",
                       "--trusted", "--box-start", "0", "0", "--output", str(tmp_path / "o"))
    assert code == 1
    line = one_error_line(err)
    assert "--checkpoint" in line and "random weights" in line


def test_factory_with_checkpoint_and_description(capsys, tmp_path, brain_crop):
    description = tmp_path / "shallow.json"
    description.write_text('{"spatial_dims": 2, "in_channels": 1, "activation": "sigmoid", "name": "mine"}')
    code, out, err = run(capsys, "explain", brain_crop, "--model", "napari_pdcr.models.demo:ShallowCNN",
                         "--checkpoint", str(demo_weights_path("shallow2d")), "--description", str(description),
                         "--trusted", *SMALL, "--box-start", "16", "0", "--output", str(tmp_path / "o"))
    assert code == 0, err
    explanation = load_explanation(tmp_path / "o" / "brain.zarr")
    assert explanation.model_identity["name"] == "mine"
    assert explanation.model_identity["sha256"]


def test_model_options_that_do_not_fit_are_refused(capsys, tmp_path, brain_crop):
    cases = [
        (["--checkpoint", "w.pt"], "do not apply to the demo model"),
        (["--model", "unet"], "is neither a demo model"),
        (["--bank", "colin27_slices"], "--bank is for --intervention patch_bank"),
        (["--model", "torch.nn:Identity", "--checkpoint", str(tmp_path / "none.pt")], "is not an existing file"),
    ]
    for extra, expected in cases:
        code, _, err = run(capsys, "explain", brain_crop, *extra, "--box-start", "0", "0",
                           "--output", str(tmp_path / "o"))
        assert code == 1
        assert expected in one_error_line(err)


def test_unknown_intervention_lists_the_choices(capsys, tmp_path, brain_crop):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", brain_crop, "--intervention", "zeros", "--box-start", "0", "0"])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'patch_bank', 'zero', 'constant', 'mean', 'blur', 'noise'" in line


def test_patch_bank_from_bundled_sample_end_to_end(capsys, tmp_path, brain_crop):
    args = ["explain", brain_crop, "--intervention", "patch_bank", "--bank", "colin27_slices", *SMALL,
            "--box-start", "16", "0", "--output", str(tmp_path / "o")]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    explanation = load_explanation(tmp_path / "o" / "brain.zarr")
    assert explanation.parameters["intervention"]["name"] == "patch_bank"
    n_slices = len(load_sample("colin27_slices")["image"])
    assert explanation.provenance["patch_bank"].startswith(f"bundled sample colin27_slices: 10000 crops from {n_slices}")
    assert explanation.forward_passes > 0
    assert (tmp_path / "o" / "brain.png").stat().st_size > 0
    # a second run replaces its own earlier results
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "replacing the earlier results" in out


def test_patch_bank_without_bank_uses_the_bundled_default(capsys, tmp_path, brain_crop):
    code, out, err = run(capsys, "explain", brain_crop, "--intervention", "patch_bank", *SMALL,
                         "--box-start", "16", "0", "--output", str(tmp_path / "o"))
    assert code == 0, err
    assert "note: no --bank given: the patch bank is cut from the bundled sample colin27_slices" in out


def test_patch_bank_from_files_of_different_sizes(capsys, tmp_path, brain_crop):
    stack = load_sample("itk_slices")["image"]
    np.save(tmp_path / "stack.npy", stack[:3])
    np.savez(tmp_path / "one.npz", image=stack[5, :100, :90])
    code, out, err = run(capsys, "explain", brain_crop, "--intervention", "patch_bank", *SMALL,
                         "--bank", str(tmp_path / "stack.npy"), str(tmp_path / "one.npz"),
                         "--box-start", "16", "0", "--output", str(tmp_path / "o"))
    assert code == 0, err
    assert "crops from 4 images" in load_explanation(tmp_path / "o" / "brain.zarr").provenance["patch_bank"]


def test_bad_bank_sources_are_refused(capsys, tmp_path, brain_crop):
    text = tmp_path / "bank.npy"
    text.write_text("not an array")
    line_1d = tmp_path / "line.npy"
    np.save(line_1d, np.zeros(100, np.float32))
    cases = [
        (str(text), "bank file"),
        (str(line_1d), "takes 2D images"),
        ("colin28_slices", "neither an existing file nor a bundled sample"),
    ]
    for source, expected in cases:
        code, _, err = run(capsys, "explain", brain_crop, "--intervention", "patch_bank", "--bank", source,
                           *SMALL, "--box-start", "16", "0", "--output", str(tmp_path / "o"))
        assert code == 1
        assert expected in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_image_formats(tmp_path):
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.savez(tmp_path / "a.npz", image=image, spacing=np.array([0.5, 2.0]))
    array, spacing = images.read_image(tmp_path / "a.npz")
    assert array.dtype == np.float32 and np.array_equal(array, image)
    assert spacing == (0.5, 2.0)
    np.savez(tmp_path / "b.npz", x=image, y=image)
    with pytest.raises(images.ImageFileError, match="has no array named 'image' .it has x, y."):
        images.read_image(tmp_path / "b.npz")
    np.save(tmp_path / "c.npy", np.array([1.0, np.nan]))
    with pytest.raises(images.ImageFileError, match="NaN or infinite"):
        images.read_image(tmp_path / "c.npy")
    (tmp_path / "d.png").write_bytes(b"\x89PNG")
    with pytest.raises(images.ImageFileError, match="is not a supported image file"):
        images.read_image(tmp_path / "d.png")


def test_tiff_image(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    tifffile.imwrite(tmp_path / "a.tif", image)
    assert np.array_equal(images.read_image(tmp_path / "a.tif")[0], image)


def test_nifti_image_and_spacing(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    nibabel.save(nibabel.Nifti1Image(image, np.diag([0.5, 0.7, 1.0, 1.0])), tmp_path / "a.nii.gz")
    array, spacing = images.read_image(tmp_path / "a.nii.gz")
    assert np.array_equal(array, image) and spacing == (0.5, 0.7)
    assert images.file_stem(tmp_path / "a.nii.gz") == "a"


def test_nifti_without_nibabel_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now fails
    (tmp_path / "a.nii.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(images.ImageFileError, match="needs nibabel, which is not installed: pip install nibabel"):
        images.read_image(tmp_path / "a.nii.gz")


def test_interrupt_and_unexpected_errors(capsys, tmp_path, brain_crop, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "read_image", interrupted)
    code, _, err = run(capsys, "explain", brain_crop, "--box-start", "0", "0", "--output", str(tmp_path / "o"))
    assert code == 130
    assert one_error_line(err) == "napari-pdcr: error: interrupted"

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "read_image", broken)
    code, _, err = run(capsys, "explain", brain_crop, "--box-start", "0", "0", "--output", str(tmp_path / "o"))
    assert code == 1
    assert one_error_line(err).endswith("division by zero (unexpected ZeroDivisionError; run with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        cli.main(["explain", brain_crop, "--box-start", "0", "0", "--output", str(tmp_path / "o"), "--debug"])


def test_demo_checks_its_output_too(capsys, tmp_path):
    output = tmp_path / "results"
    output.write_text("user data")
    code, _, err = run(capsys, "demo", "--output", str(output))
    assert code == 1
    assert "--output" in one_error_line(err) and "is an existing file" in err
    assert output.read_text() == "user data"


def test_summary_checks_a_store_and_reports_damage_in_one_line(tmp_path, capsys):
    import json
    import shutil

    from test_napari_layers import make_explanation

    store = make_explanation().save(tmp_path / "result.zarr")
    code, out, _ = run(capsys, "summary", str(store))
    assert code == 0
    printed = json.loads(out)
    assert printed["kind"] == "region_explanation" and printed["summary"]["counts"]["negative"] == 2
    shutil.rmtree(store / "block_status")
    code, _, err = run(capsys, "summary", str(store))
    assert code == 1
    assert one_error_line(err).startswith("napari-pdcr: error: this result store is damaged: array 'block_status' is missing")
    code, _, err = run(capsys, "summary", str(tmp_path / "missing.zarr"))
    assert code == 1 and "does not exist" in one_error_line(err)
