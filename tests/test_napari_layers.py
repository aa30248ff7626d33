"""Result layers: colormap, limits, geometry and metadata (headless), and how they render (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_pdcr._napari.layers import (
    EFFECT_COLORMAP_NAME,
    METADATA_KEY,
    VOLUME_ALPHA,
    VOLUME_SUFFIX,
    effect_colormap,
    explanation_from_layer,
    outline,
)
from napari_pdcr._napari.viewer import add_to_viewer, view_in_3d
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.explanations.region import RegionExplanation


def make_explanation(spatial=(64, 48), block=8, spacing=(1.0, 1.0)) -> RegionExplanation:
    """A hand-made explanation: one strongly negative, one weakly negative and one positive block."""
    grid = tuple(-(-n // block) for n in spatial)
    effects = np.zeros(grid, np.float32)
    status = np.full(grid, NodeStatus.SCREENED_OUT, np.int8)
    centre = tuple(g // 2 for g in grid)
    status[centre] = NodeStatus.TARGET
    effects[(0,) * len(grid)] = -6.0
    effects[(1,) * len(grid)] = -1.0
    effects[tuple(g - 1 for g in grid)] = 4.0
    for index in [(0,) * len(grid), (1,) * len(grid), tuple(g - 1 for g in grid)]:
        status[index] = NodeStatus.ESTIMATED
    region = np.zeros(spatial, bool)
    region[tuple(slice(c * block + 1, c * block + 5) for c in centre)] = True
    prediction = np.zeros(spatial, bool)
    prediction[tuple(slice(4, n - 4) for n in spatial)] = True
    return RegionExplanation(
        block_effects=effects,
        block_standard_error=np.abs(effects) / 10,
        block_draws=np.full(grid, 3, np.int32),
        block_status=status,
        block_shape=(block,) * len(spatial),
        target_region=region,
        prediction=prediction,
        reference=None,
        base_outcome=97.5,
        parameters={"tau": 0.02, "block_shape": block, "intervention": {"name": "zero"}},
        model_identity={"name": "toy", "sha256": "0" * 64},
        provenance={"seed": 0},
        spacing=spacing,
    )


def test_colormap_negative_red_positive_blue_zero_transparent():
    cmap = effect_colormap()
    low, mid, high = cmap.map(np.array([0.0, 0.5, 1.0]))
    assert cmap.name == EFFECT_COLORMAP_NAME
    assert low[0] > 0.5 and low[0] > 2 * low[2]  # red
    assert high[2] > 0.5 and high[2] > 2 * high[0]  # blue
    assert mid[3] == 0.0  # transparent at zero
    assert (cmap.map(np.array([0.496, 0.504]))[:, 3] == 0).all()  # a transparent plateau, not a point
    small = cmap.map(np.array([0.49, 0.51]))
    assert small[0, 0] > small[0, 2] and small[1, 2] > small[1, 0]
    assert (small[:, 3] >= 0.5).all()  # small effects remain visible


def test_ate_layer_properties_headless():
    viewer = ViewerModel()
    source = viewer.add_image(np.zeros((64, 48), np.float32), scale=(0.5, 0.7), translate=(10, -3), name="img")
    explanation = make_explanation()
    layers = add_to_viewer(viewer, explanation, source_layer=source)
    ate = layers[0]
    assert [layer.name for layer in layers] == ["toy ATE", "toy ATE prediction"]
    assert ate.data.shape == (64, 48)
    assert ate.colormap.name == EFFECT_COLORMAP_NAME
    assert tuple(ate.contrast_limits) == (-6.0, 6.0)
    assert ate.blending == "translucent" and 0.5 <= ate.opacity <= 0.7
    assert ate.rendering == "translucent"
    np.testing.assert_allclose(ate.scale, (0.5, 0.7))
    np.testing.assert_allclose(ate.translate, (10, -3))
    entry = ate.metadata[METADATA_KEY]
    assert entry["role"] == "ate"
    assert entry["parameters"]["block_shape"] == 8
    assert entry["model_identity"]["name"] == "toy"
    assert entry["summary"]["counts"] == {"positive": 1, "negative": 2, "zero": explanation.block_effects.size - 4}
    assert explanation_from_layer(ate) is explanation
    assert explanation_from_layer(source) is None
    np.testing.assert_array_equal(layers[1].data, outline(explanation.prediction))


def test_options_and_geometry_without_source_layer():
    viewer = ViewerModel()
    explanation = make_explanation(spacing=(2.0, 3.0))
    explanation.provenance["target_layer"] = "tumour"
    layers = explanation.add_to_viewer(viewer, show_standard_error=True, show_prediction=False, show_target_region=True)
    se, ate, target = layers
    assert ate.name == "toy ATE: tumour"
    assert se.name == "toy ATE: tumour SE" and not se.visible
    assert target.metadata[METADATA_KEY]["role"] == "target_region"
    np.testing.assert_allclose(ate.scale, (2.0, 3.0))  # from the explanation's spacing
    explanation.provenance["source_layer"] = {"scale": [4.0, 4.0], "translate": [1.0, 2.0]}
    again = add_to_viewer(viewer, explanation, name="again", show_prediction=False)[0]
    np.testing.assert_allclose(again.scale, (4.0, 4.0))
    np.testing.assert_allclose(again.translate, (1.0, 2.0))
    assert again.name == "again"


def test_all_zero_map_gets_valid_limits_and_3d_rendering():
    explanation = make_explanation(spatial=(16, 24, 20), block=8, spacing=(2.0, 2.0, 2.0))
    explanation.block_effects[:] = 0
    viewer = ViewerModel()
    ate = add_to_viewer(viewer, explanation, show_prediction=False)[0]
    assert tuple(ate.contrast_limits) == (-1.0, 1.0)
    assert ate.data.shape == (16, 24, 20)
    assert ate.rendering == "translucent"  # not 'mip', which would hide negative effects


def test_volume_colormap_opacity_grows_with_the_effect():
    """In 3D every sample composites over those behind it: weak effects must stay see-through."""
    cmap = effect_colormap(volume=True)
    assert cmap.name == EFFECT_COLORMAP_NAME + VOLUME_SUFFIX
    positions = np.linspace(0, 1, 201)
    rgba = cmap.map(positions)
    alpha = rgba[:, 3]
    assert alpha[100] == 0 and (alpha[(positions > 0.495) & (positions < 0.505)] == 0).all()
    assert alpha[0] == pytest.approx(VOLUME_ALPHA) and alpha[-1] == pytest.approx(VOLUME_ALPHA)
    assert (np.diff(alpha[:100]) <= 1e-6).all() and (np.diff(alpha[101:]) >= -1e-6).all()  # grows with |effect|
    assert alpha[75] < 0.6 * VOLUME_ALPHA  # half the limit: about half the opacity, not the 2D map's 0.6-1.0
    assert rgba[0, 0] > 2 * rgba[0, 2] and rgba[-1, 2] > 2 * rgba[-1, 0]  # the same hues as in 2D
    flipped = effect_colormap(flipped=True, volume=True).map(np.array([0.0]))[0]
    assert flipped[2] > 2 * flipped[0]


def test_maps_take_the_3d_colormap_in_3d_rendering_and_back():
    viewer = ViewerModel()
    explanation = make_explanation(spatial=(16, 24, 20), block=8, spacing=(1.0,) * 3)
    ate = add_to_viewer(viewer, explanation, show_prediction=False)[0]
    assert ate.colormap.name == EFFECT_COLORMAP_NAME
    viewer.dims.ndisplay = 3  # napari's own 2D/3D button does this
    assert ate.colormap.name == EFFECT_COLORMAP_NAME + VOLUME_SUFFIX
    later = add_to_viewer(viewer, explanation, name="later", show_prediction=False)[0]  # added while in 3D
    assert later.colormap.name == EFFECT_COLORMAP_NAME + VOLUME_SUFFIX
    viewer.dims.ndisplay = 2
    assert ate.colormap.name == later.colormap.name == EFFECT_COLORMAP_NAME


def test_view_in_3d_shows_planes_through_the_region_and_the_outline_over_the_map():
    viewer = ViewerModel()
    explanation = make_explanation(spatial=(16, 24, 20), block=8, spacing=(1.0,) * 3)
    image = viewer.add_image(np.zeros((16, 24, 20), np.float32), name="img")
    other = viewer.add_image(np.zeros((5, 5, 5), np.float32), name="other")  # not the explained image
    ate, prediction, target = add_to_viewer(viewer, explanation, show_prediction=True, show_target_region=True)
    view_in_3d(viewer, explanation)
    assert viewer.dims.ndisplay == 3
    centre = [float(np.mean(axis)) for axis in np.nonzero(explanation.target_region)]
    for layer in (image, prediction):
        assert layer.depiction == "plane"
        np.testing.assert_allclose(layer.plane.position, centre)
        np.testing.assert_allclose(layer.plane.normal, (1, 0, 0))
    assert other.depiction == "volume" and ate.depiction == "volume"
    assert target.blending == prediction.blending == "translucent_no_depth"
    assert ate.colormap.name == EFFECT_COLORMAP_NAME + VOLUME_SUFFIX
    box = np.nonzero(explanation.target_region | (explanation.ate != 0))
    assert all(axis.min() <= c <= axis.max() + 1 for axis, c in zip(box, viewer.scene.camera.center, strict=True))
    with pytest.raises(ValueError, match="2D"):
        view_in_3d(viewer, make_explanation())


def test_colour_bar_labels_more_than_zero():
    """napari's colour bar labels vispy's round ticks inside the limits: limits just under a round number
    (+-1.9985, ticks at -2, 0, 2) left only "0"; the map's limits are rounded up so ticks of both signs show."""
    from vispy.visuals.axis import _get_ticks_talbot

    from napari_pdcr._napari.layers import colour_bar_limit

    def labelled(m, inches):
        ticks = _get_ticks_talbot(-m, m, inches, 2)
        return ticks[np.abs(ticks) <= m * 1.0001]

    assert len(labelled(1.9984883, 150 / 96)) == 1  # the case seen: only "0"
    rng = np.random.default_rng(0)
    for value in [1.9984883, 14.83, 0.3127, 2.13e-5, 9.999, 99.5, 163.98, *10 ** rng.uniform(-6, 3, 300)]:
        m = colour_bar_limit([value, -value / 3])
        assert value <= m <= value * 1.3, (value, m)
        for inches in (1.0, 150 / 96, 2.0):  # screens of 75-150 dpi
            ticks = labelled(m, inches)
            assert (ticks < 0).any() and (ticks > 0).any(), (value, m, inches, ticks)
    layer_limits = add_to_viewer(ViewerModel(), make_explanation(), show_prediction=False)[0].contrast_limits
    assert tuple(layer_limits) == (-6.0, 6.0)


def test_outline_is_in_plane_border():
    mask = np.zeros((3, 9, 9), bool)
    mask[:, 2:7, 2:7] = True
    border = outline(mask)
    assert border[1, 2, 4] and not border[1, 4, 4]
    assert border.sum() == 3 * 16


@pytest.mark.gui
def test_rendered_map_shows_red_and_blue(make_napari_viewer, tmp_path):
    """Screenshot of a viewer with a map: both signs are visible over the image."""
    from imageio.v3 import imwrite

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(np.full((64, 48), 0.5, np.float32), colormap="gray", contrast_limits=(0, 1))
    add_to_viewer(viewer, make_explanation(), source_layer=image, show_prediction=False)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    imwrite(tmp_path / "map.png", shot)
    rgb = shot[..., :3].astype(int)
    red = (rgb[..., 0] > rgb[..., 2] + 60).sum()
    blue = (rgb[..., 2] > rgb[..., 0] + 60).sum()
    assert red > 100 and blue > 100, (red, blue)


@pytest.mark.gui
def test_3d_view_shows_the_region_the_map_and_the_anatomy(make_napari_viewer, tmp_path):
    """Screenshot of the 3D view: the target region (lime), the map (red) and the image plane (grey) all show."""
    from imageio.v3 import imwrite

    viewer = make_napari_viewer(show=True)
    explanation = make_explanation(spatial=(32, 32, 32), block=8, spacing=(1.0,) * 3)
    explanation.block_effects[1:3, 1:3, 1:3] = -6.0  # strong blocks around the centred region
    image = viewer.add_image(np.full((32, 32, 32), 0.5, np.float32), colormap="gray", contrast_limits=(0, 1))
    add_to_viewer(viewer, explanation, source_layer=image, show_prediction=True, show_target_region=True)
    view_in_3d(viewer, explanation)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    imwrite(tmp_path / "view_3d.png", shot)
    rgb = shot[..., :3].astype(int)
    lime = ((rgb[..., 1] > 150) & (rgb[..., 0] < 120) & (rgb[..., 2] < 120)).sum()
    red = ((rgb[..., 0] > rgb[..., 2] + 40) & (rgb[..., 0] > rgb[..., 1] + 40)).sum()
    grey = ((np.ptp(rgb, axis=-1) < 12) & (rgb[..., 0] > 60)).sum()
    assert lime > 50 and red > 200 and grey > 200, (lime, red, grey)
