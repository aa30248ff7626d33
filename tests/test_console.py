"""The console / script function ``napari_pdcr.console.explain`` (headless)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_pdcr import RegionExplanation, centered_box
from napari_pdcr._napari.inputs import region_mask
from napari_pdcr._napari.layers import METADATA_KEY
from napari_pdcr.console import explain
from napari_pdcr.jobs import component_at, default_bank, split_sources
from napari_pdcr.samples import load_sample

#: A budget that runs the 2D demo model in a few seconds on 2 CPU cores.
SMALL = {"intervention": "zero", "block_shape": 32}


@pytest.fixture(scope="module")
def slice_2d():
    return load_sample("colin27_slice")


def test_console_import_is_qt_free():
    code = (
        "import sys, napari_pdcr.console;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy')"
        " or m.startswith('napari._qt')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explain_arrays(slice_2d):
    region = centered_box(slice_2d["image"].shape, (70, 60), 12)
    result = explain(slice_2d["image"], region, model="unet2d", **SMALL)
    assert isinstance(result, RegionExplanation)
    assert result.ate.shape == slice_2d["image"].shape
    assert result.parameters["block_shape"] == 32
    assert result.model_identity["name"] == "unet2d"
    assert result.counts()["negative"] > 0  # zeroing brain next to the region lowers its Dice
    assert result.provenance["source_layer"] is None


def test_explain_layers_adds_result_layers(slice_2d):
    viewer = ViewerModel()
    image = viewer.add_image(slice_2d["image"], name="t1", scale=(1.5, 1.5), translate=(5, 5))
    labels = np.zeros(slice_2d["image"].shape, np.uint8)
    labels[60:72, 50:62] = 2
    labels[150:160, 100:110] = 1
    viewer.add_labels(labels, name="regions", scale=(1.5, 1.5), translate=(5, 5))
    result = explain("t1", "regions", viewer=viewer, label=2, **SMALL)
    assert result.target_region.sum() == 144
    assert result.spacing == (1.5, 1.5)
    assert result.provenance["target_layer"] == "regions #2"
    ate = viewer.layers["unet2d ATE: regions #2"]
    np.testing.assert_allclose(ate.scale, image.scale)
    np.testing.assert_allclose(ate.translate, image.translate)
    assert ate.metadata[METADATA_KEY]["explanation"] is result


def test_patch_bank_default_leaves_out_the_explained_slice(slice_2d):
    bank, where = default_bank(slice_2d["image"][None], 2)
    assert where == "bundled sample colin27_slices"
    sources = split_sources(bank, 2, 1)
    assert any(np.array_equal(s[0], slice_2d["image"]) for s in sources)  # the sample is one of them...
    region = centered_box(slice_2d["image"].shape, (70, 60), 12)
    result = explain(slice_2d["image"], region, block_shape=32, n_screen=1, n_estimate=2)
    note = result.provenance["patch_bank"]
    assert "colin27_slices" in note and "explained image left out" in note  # ...and is left out
    assert f"from {len(sources) - 1} images" in note


def test_shapes_rectangle_and_connected_component():
    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((40, 50), np.float32), scale=(2.0, 2.0))
    shapes = viewer.add_shapes([np.array([[10.0, 20.0], [10.0, 40.0], [30.0, 40.0], [30.0, 20.0]])], shape_type="rectangle")
    mask = region_mask(shapes, image)  # world (2 mm pixels) -> image grid
    assert mask.shape == (40, 50)
    assert mask[5:16, 10:21].all() and mask.sum() == 11 * 11

    labels = np.zeros((20, 20), np.uint8)
    labels[2:5, 2:5] = 1
    labels[10:15, 10:15] = 1
    assert component_at(labels != 0, (12, 12)).sum() == 25
    with pytest.raises(ValueError, match="not inside"):
        component_at(labels != 0, (0, 0))


def test_explain_errors_are_sentences(slice_2d):
    empty = np.zeros(slice_2d["image"].shape, bool)
    with pytest.raises(ValueError, match="target region is empty"):
        explain(slice_2d["image"], empty, **SMALL)
    region = centered_box(slice_2d["image"].shape, (70, 60), 12)
    with pytest.raises(ValueError, match="explains 3D images"):
        explain(slice_2d["image"], region, model="unet3d", **SMALL)
    stack = np.stack([slice_2d["image"]] * 3)  # a stack of 2D slices, e.g. the bundled lesion sample
    with pytest.raises(ValueError, match=r"image is 3D: choose a 3D model \(for a stack of 2D slices, explain one slice"):
        explain(stack, np.stack([region] * 3), model="unet2d", **SMALL)
    with pytest.raises(TypeError, match="unknown parameter"):
        explain(slice_2d["image"], region, block_size=8)
    with pytest.raises(ValueError, match="pass viewer"):
        explain("t1", region)
