"""Manifest, reader, writer and sample-data contributions."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel
from test_napari_layers import make_explanation

from napari_pdcr._napari.layers import METADATA_KEY, add_explanation_layers
from napari_pdcr._napari.reader import get_reader, read_explanation
from napari_pdcr._napari.writer import write_explanation
from napari_pdcr.io.results import is_explanation_store, load_explanation, save_explanation


def test_manifest_declares_reader_writer_samples_and_widget():
    import npe2

    contributions = npe2.PluginManifest.from_distribution("napari-pdcr").contributions
    assert {s.key for s in contributions.sample_data} == {"colin27_slice", "colin27_volume"}
    assert "Region effects (ATE map)" in [w.display_name for w in contributions.widgets]
    assert contributions.readers[0].filename_patterns == ["*.zarr"]
    assert contributions.writers[0].filename_extensions == [".zarr"]
    assert contributions.writers[0].layer_types == ["image"]


def test_reader_claims_only_explanation_stores(tmp_path):
    store = tmp_path / "result.zarr"
    save_explanation(make_explanation(), store)
    other = tmp_path / "other.zarr"
    other.mkdir()
    assert get_reader(str(store)) is read_explanation
    assert get_reader([str(store)]) is read_explanation
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    assert get_reader([str(store), str(store)]) is None


def test_reader_restores_layers(tmp_path):
    explanation = make_explanation(spacing=(2.0, 1.5))
    explanation.provenance["target_layer"] = "lesion"
    store = save_explanation(explanation, tmp_path / "result.zarr")
    layer_data = read_explanation(str(store))
    assert [t for _, _, t in layer_data] == ["image", "labels", "labels"]
    ate, kwargs, _ = layer_data[0]
    np.testing.assert_array_equal(ate, explanation.ate)
    assert kwargs["name"] == "toy ATE: lesion"
    assert kwargs["contrast_limits"] == (-6.0, 6.0)
    assert kwargs["scale"] == (2.0, 1.5)
    assert kwargs["metadata"][METADATA_KEY]["parameters"] == explanation.parameters


def test_writer_saves_the_explanation_of_an_ate_layer(tmp_path):
    viewer = ViewerModel()
    explanation = make_explanation()
    ate = add_explanation_layers(viewer, explanation, show_prediction=False)[0]
    written = write_explanation(str(tmp_path / "saved"), ate.data, ate._get_state())
    assert written == [str(tmp_path / "saved.zarr")]
    assert is_explanation_store(written[0])
    loaded = load_explanation(written[0])
    np.testing.assert_array_equal(loaded.block_effects, explanation.block_effects)
    assert loaded.model_identity == explanation.model_identity


def test_writer_refuses_other_layers(tmp_path):
    viewer = ViewerModel()
    plain = viewer.add_image(np.zeros((4, 4)), name="plain")
    with pytest.raises(ValueError, match="not a napari-pdcr result"):
        write_explanation(str(tmp_path / "x.zarr"), plain.data, plain._get_state())
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.gui
def test_save_and_reopen_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    explanation = make_explanation()
    ate = add_explanation_layers(viewer, explanation)[0]
    viewer.layers.selection.active = ate
    path = tmp_path / "through_napari.zarr"
    viewer.layers.save(str(path), selected=True, plugin="napari-pdcr")
    assert is_explanation_store(path)

    reopened = make_napari_viewer()
    layers = reopened.open(str(path), plugin="napari-pdcr")
    assert [layer._type_string for layer in layers] == ["image", "labels", "labels"]
    np.testing.assert_array_equal(layers[0].data, explanation.ate)
    assert layers[0].metadata[METADATA_KEY]["model_identity"] == explanation.model_identity


@pytest.mark.gui
@pytest.mark.parametrize(
    ("key", "shape"),
    [("colin27_slice", (217, 181)), ("colin27_volume", (91, 109, 91))],
)
def test_sample_data_opens_with_layer_types_and_shapes(make_napari_viewer, key, shape):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-pdcr", key)
    assert [layer._type_string for layer in layers] == ["image", "labels"]
    assert all(layer.data.shape == shape for layer in layers)
    assert layers[0].data.dtype == np.float32
    assert set(np.unique(layers[1].data)) == {0, 1}
