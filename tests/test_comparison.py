"""Strategy profiles and the model comparison on tiny models with known receptive fields."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from synthetic import LocalConv, random_image, wrap

from napari_pdcr import Cancelled, box_region
from napari_pdcr._napari.viewer import show_comparison
from napari_pdcr.studies.comparison import compare_models, strategy_profile

matplotlib.use("Agg")

SHAPE = (32, 32)
IMAGE = random_image((1, *SHAPE), seed=4)
REGION = box_region(SHAPE, (12, 12), 8)
MODELS = {
    # receptive field radius 2 px: only blocks next to the region can matter
    "local": wrap(LocalConv(layers=2, width=4, seed=1), 2, name="local"),
    # adds 20 x the image mean everywhere: every block matters
    "global": wrap(LocalConv(layers=2, width=4, seed=1, global_weight=20.0), 2, name="global"),
}
OPTIONS = dict(
    region_effects=dict(intervention="zero", block_shape=4, outcome="mean_logit", mode="published"),
    component_effects=dict(intervention="zero", outcome="mean_logit"),
    spacing=(1.0, 1.0),
    locality_distance=6.0,
)


@pytest.fixture(scope="module")
def comparison():
    return compare_models(MODELS, IMAGE, REGION, **OPTIONS)


def test_locality_separates_a_local_from_a_global_model(comparison):
    local, global_ = comparison.profiles
    assert local.locality == 1.0  # every effect of a 2-px receptive field lies next to the region
    assert global_.locality < 0.5
    assert local.half_effect_distance < global_.half_effect_distance
    assert local.locality_curve[-1] == pytest.approx(1.0) and np.all(np.diff(local.locality_curve) >= 0)
    assert local.fractions["zero"] > 0.5 > global_.fractions["zero"]
    for p in comparison.profiles:
        assert sum(p.fractions.values()) == pytest.approx(1.0)
        assert p.components is not None and len(p.components.components) == 2  # the two convolutions


def test_profile_matches_the_explanation(comparison):
    p = comparison.profiles[1]
    again = strategy_profile("global", p.explanation, locality_distance=6.0)
    assert again.locality == p.locality == p.explanation.locality(6.0)
    assert again.total_abs_effect == pytest.approx(np.abs(p.explanation.block_effects).sum())
    assert again.top_component is None and p.top_component[0].startswith("net ")


def test_table_markdown_and_figure(comparison, tmp_path):
    rows = comparison.table()
    assert [r["model"] for r in rows] == ["local", "global"]
    assert rows[0]["locality@6"] == 1.0
    text = comparison.to_markdown()
    assert text.count("\n") == 3 and "`global`" in text and "within 6 mm" in text
    fig = comparison.figure(IMAGE[0])
    fig.savefig(tmp_path / "comparison.png", dpi=60)
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert len(fig.axes) >= 6  # 2 maps, 2 component charts, curves, fractions (+ colorbar)


def test_cancel_stops_the_comparison():
    with pytest.raises(Cancelled):
        compare_models(MODELS, IMAGE, REGION, progress=lambda p: not p.stage.startswith("global"), **OPTIONS)


def test_show_comparison_in_grid_mode(comparison):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    image = viewer.add_image(IMAGE[0], name="image")
    added = show_comparison(viewer, comparison, image_layer=image)
    assert viewer.canvas.grid.enabled and viewer.canvas.grid.stride == 3
    assert list(viewer.layers)[:3] == added[:3]  # the first grid cell: image, map, target of "local"
    maps = [layer for layer in added if layer.name.endswith("ATE")]
    assert [m.name for m in maps] == ["local ATE", "global ATE"]
    assert maps[0].contrast_limits == maps[1].contrast_limits
    maps[0].contrast_limits = (-1.0, 1.0)
    assert maps[1].contrast_limits == [-1.0, 1.0]  # linked
