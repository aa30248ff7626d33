"""One plot style: one symmetric limit, one red and one blue for every chart and map."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from napari_pdcr import ComponentExplanation
from napari_pdcr.components import Component
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.plotting import EFFECT_CMAP, plot_block_counts, plot_components, symmetric_limit
from napari_pdcr.plotting.style import NEGATIVE_COLOR, POSITIVE_COLOR, ZERO_COLOR

matplotlib.use("Agg")


@pytest.mark.parametrize(
    ("values", "limit"),
    [
        ([-2.0, 0.5, 1.0], 2.0),
        ([0.0, 0.0], 1.0),  # all zero: a valid scale, not a degenerate one
        ([], 1.0),
        ([np.nan, -3.0, np.inf], 3.0),  # only finite values count
        ([np.nan, np.inf], 1.0),
    ],
)
def test_symmetric_limit(values, limit):
    assert symmetric_limit(np.array(values)) == limit


def test_the_napari_layers_use_the_one_limit():
    from napari_pdcr._napari import layers
    from napari_pdcr.plotting import style

    assert layers.symmetric_limit is style.symmetric_limit


def test_colours_are_those_of_the_effect_colormap():
    cmap = matplotlib.colormaps[EFFECT_CMAP]
    np.testing.assert_allclose(cmap(0.1)[:3], to_rgb(NEGATIVE_COLOR), atol=2 / 255)
    np.testing.assert_allclose(cmap(0.9)[:3], to_rgb(POSITIVE_COLOR), atol=2 / 255)


def test_napari_ate_colormap_ends_in_the_same_red_and_blue():
    from napari_pdcr._napari.layers import effect_colormap

    low, high = effect_colormap().map(np.array([0.0, 1.0]))
    np.testing.assert_allclose(low[:3], to_rgb(NEGATIVE_COLOR), atol=1e-6)
    np.testing.assert_allclose(high[:3], to_rgb(POSITIVE_COLOR), atol=1e-6)


def component_result() -> ComponentExplanation:
    components = [Component(f"c{i}", f"net.{i}", "stage", "Conv2d") for i in range(3)]
    return ComponentExplanation(
        components=components,
        ate=np.array([-0.5, 0.3, 0.0]),
        standard_error=np.array([0.05, 0.05, 0.01]),
        raw_mean=np.array([-0.5, 0.3, 0.01]),
        n_draws=np.array([10, 10, 3], np.int32),
        status=np.array([NodeStatus.ESTIMATED, NodeStatus.ESTIMATED, NodeStatus.SCREENED_OUT], np.int8),
        base_outcome=90.0,
        target_region=np.ones((4, 4), bool),
    )


def test_component_chart_and_block_counts_use_the_style_colours():
    ax = plot_components(component_result())
    faces = {bar.get_y(): bar.get_facecolor() for bar in ax.patches}
    edges = {bar.get_y(): bar.get_edgecolor() for bar in ax.patches}
    top, middle, bottom = sorted(faces, reverse=True)  # by |ATE|: c0, c1, then the zero c2
    np.testing.assert_allclose(faces[top][:3], to_rgb(NEGATIVE_COLOR))
    np.testing.assert_allclose(faces[middle][:3], to_rgb(POSITIVE_COLOR))
    assert faces[bottom][3] == 0 and np.allclose(edges[bottom][:3], to_rgb(ZERO_COLOR))

    class Counts:
        def counts(self):
            return {"negative": 2, "zero": 1, "positive": 1}

    ax = matplotlib.figure.Figure().add_subplot()
    plot_block_counts(Counts(), ax)
    colours = [bar.get_facecolor()[:3] for bar in ax.patches]
    np.testing.assert_allclose(colours, [to_rgb(c) for c in (NEGATIVE_COLOR, ZERO_COLOR, POSITIVE_COLOR)])


def test_result_plot_is_the_plotting_chart():
    result = component_result()
    ax = result.plot(top=2)
    ticks = sorted(zip(ax.get_yticks(), (label.get_text() for label in ax.get_yticklabels()), strict=True))
    assert [name for _, name in ticks] == ["c1", "c0"]  # the two largest |ATE|, the largest on top
