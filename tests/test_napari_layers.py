"""Result layers: colormap, limits, geometry and metadata (headless), and how they render (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_pdcr._napari.layers import (
    EFFECT_COLORMAP_NAME,
    METADATA_KEY,
    effect_colormap,
    explanation_from_layer,
    outline,
)
from napari_pdcr._napari.viewer import add_to_viewer
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
