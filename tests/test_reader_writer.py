"""Manifest, reader, writer and sample-data contributions."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from napari.components import ViewerModel
from test_napari_layers import make_explanation

from napari_pdcr._napari.layers import METADATA_KEY
from napari_pdcr._napari.reader import get_reader, read_explanation
from napari_pdcr._napari.viewer import add_to_viewer
from napari_pdcr._napari.writer import write_explanation
from napari_pdcr.io.results import is_explanation_store, load_explanation, save_explanation


def test_manifest_declares_reader_writer_samples_and_widget():
    import npe2

    contributions = npe2.PluginManifest.from_distribution("napari-pdcr").contributions
    assert {s.key for s in contributions.sample_data} == {"colin27_slice", "colin27_volume", "lesion_slices"}
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
    ate = add_to_viewer(viewer, explanation, show_prediction=False)[0]
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
    ate = add_to_viewer(viewer, explanation)[0]
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
def test_open_result_in_one_step_while_napari_keeps_other_zarr_stores(make_napari_viewer, qtbot, tmp_path):
    """The dock's Open result… opens a store with this reader; napari's plain ``viewer.open`` cannot (it
    forces napari's own reader, napari/components/viewer_model.py ``open(plugin='napari')``) and
    still opens other zarr stores as images."""
    import zarr
    from napari.utils.notifications import notification_manager

    from napari_pdcr._napari.widget import RegionEffectsWidget

    explanation = make_explanation()
    path = save_explanation(explanation, tmp_path / "result.zarr")
    viewer = make_napari_viewer()
    with pytest.raises(ValueError):  # napari's own reader on a result store: if this passes one day, update the guide
        viewer.open(str(path))
    widget = RegionEffectsWidget(viewer)
    layers = widget.open_result(path)
    assert [layer.name for layer in layers] == [layer.name for layer in viewer.layers]
    assert [layer._type_string for layer in layers] == ["image", "labels", "labels"]
    np.testing.assert_array_equal(layers[0].data, explanation.ate)
    qtbot.waitUntil(widget.save_button.isEnabled, timeout=10_000)  # the Results tab shows it (plots drawn in a thread)
    np.testing.assert_array_equal(widget.result.ate, explanation.ate)

    other = tmp_path / "plain.zarr"
    zarr.save_array(str(other), np.arange(12, dtype=np.float32).reshape(3, 4))
    start = len(notification_manager.records)
    assert widget.open_result(other) == []
    assert any("is not one" in str(n.message) for n in notification_manager.records[start:])
    image = viewer.open(str(other))[0]  # napari's reader still opens it
    np.testing.assert_array_equal(np.asarray(image.data), np.arange(12).reshape(3, 4))


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


def make_component_explanation():
    """A hand-made component result: two components, one estimated, one screened out."""
    from napari_pdcr import ComponentExplanation, NodeStatus
    from napari_pdcr.components import Component

    region = np.zeros((64, 48), bool)
    region[8:24, 8:24] = True
    return ComponentExplanation(
        components=[Component(name="encoder 1", path="model.0", kind="stage", module_type="Conv2d"),
                    Component(name="decoder 1", path="model.1", kind="stage", module_type="Conv2d")],
        ate=np.array([-4.0, 0.0]), standard_error=np.array([0.5, 0.0]), raw_mean=np.array([-4.0, 0.01]),
        n_draws=np.array([50, 3], np.int32), status=np.array([NodeStatus.ESTIMATED, NodeStatus.SCREENED_OUT], np.int8),
        base_outcome=91.0, target_region=region, model_identity={"name": "toy", "sha256": "ab"},
        parameters={"method": "component_effects", "intervention": {"name": "zero"}},
    )


def test_component_results_round_trip_through_the_store_and_the_reader(tmp_path):
    from napari_pdcr import ComponentExplanation, Explanation

    result = make_component_explanation()
    store = result.save(tmp_path / "components.zarr")
    assert is_explanation_store(store) and get_reader(str(store)) is read_explanation
    back = Explanation.load(store)
    assert isinstance(back, ComponentExplanation) and back.table() == result.table()
    assert back.model_identity == result.model_identity and back.names == result.names
    (outline, kwargs, kind), = read_explanation(str(store))
    assert kind == "labels" and kwargs["name"] == "toy components target"
    assert isinstance(kwargs["metadata"][METADATA_KEY]["explanation"], ComponentExplanation)
    # the writer saves a component result's layer again, in the same format
    again = write_explanation(str(tmp_path / "again"), outline, kwargs)[0]
    assert load_explanation(again).table() == result.table()


def test_a_region_result_keeps_its_related_component_result(tmp_path):
    region = make_explanation()
    region.related["components"] = make_component_explanation()
    layer_data = read_explanation(str(save_explanation(region, tmp_path / "run.zarr")))
    restored = layer_data[0][1]["metadata"][METADATA_KEY]["explanation"].related["components"]
    assert restored.table() == region.related["components"].table()


def test_a_damaged_component_store_says_so(tmp_path):
    from napari_pdcr import DamagedStoreError

    store = make_component_explanation().save(tmp_path / "components.zarr")
    shutil.rmtree(store / "status")
    with pytest.raises(DamagedStoreError, match="this result store is damaged: array 'status' is missing"):
        read_explanation(str(store))


def make_attribution_map(sign="positive_supports"):
    """A hand-made gradient map: one supporting (+3) and one hurting (-1) patch."""
    from napari_pdcr import AttributionMap

    attribution = np.zeros((32, 24), np.float32)
    attribution[2:6, 2:6] = 3.0
    attribution[20:24, 16:20] = -1.0
    region = np.zeros((32, 24), bool)
    region[12:16, 10:14] = True
    return AttributionMap(attribution=attribution, target_region=region, prediction=region.copy(), reference=None,
                          method="gradient_x_input", sign=sign, units="region logit sum per voxel", base_score=2.5,
                          model_identity={"name": "toy", "sha256": "0" * 64}, provenance={"target_layer": "lesion"})


def colour_at(kwargs, value) -> np.ndarray:
    """The RGBA the layer's colormap gives ``value`` (within its contrast limits)."""
    low, high = kwargs["contrast_limits"]
    return kwargs["colormap"].map(np.array([(value - low) / (high - low)]))[0]


@pytest.mark.parametrize("sign", ["positive_supports", "negative_supports"])
def test_an_attribution_store_reopens_with_supporting_values_red(tmp_path, sign):
    from napari_pdcr import AttributionMap
    from napari_pdcr.plotting.style import NEGATIVE_COLOR, POSITIVE_COLOR

    explanation = make_attribution_map(sign)
    explanation.extras["image"] = np.ones((32, 24), np.float32)
    store = save_explanation(explanation, tmp_path / "map.zarr")
    assert get_reader(str(store)) is read_explanation
    layer_data = read_explanation(str(store))
    assert [t for _, _, t in layer_data] == ["image", "image", "labels"]
    values, kwargs, _ = layer_data[1]
    np.testing.assert_array_equal(values, explanation.attribution)  # the method's own values, not flipped
    assert kwargs["name"] == "toy gradient_x_input: lesion"
    assert kwargs["contrast_limits"] == (-3.0, 3.0)
    entry = kwargs["metadata"][METADATA_KEY]
    assert entry["role"] == "attribution" and isinstance(entry["explanation"], AttributionMap)
    assert entry["explanation"].sign == sign
    supporting = 3.0 if sign == "positive_supports" else -3.0
    from matplotlib.colors import to_rgb

    np.testing.assert_allclose(colour_at(kwargs, supporting)[:3], to_rgb(NEGATIVE_COLOR), atol=0.02)  # red
    np.testing.assert_allclose(colour_at(kwargs, -supporting)[:3], to_rgb(POSITIVE_COLOR), atol=0.02)  # blue
    assert colour_at(kwargs, 0.0)[3] == 0  # zero stays transparent
    # the layer saves again through the writer, the same map
    again = load_explanation(write_explanation(str(tmp_path / "again"), values, kwargs)[0])
    np.testing.assert_array_equal(again.attribution, explanation.attribution)
    assert again.sign == sign
