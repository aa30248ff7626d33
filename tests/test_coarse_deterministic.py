"""The coarse-to-fine screen for deterministic interventions (mode="fast"): what it prunes, what it costs,
where it is an approximation, and that mode="exact" never uses it.

The model here reads the whole image, as deepbet does: every voxel's score is
``sum_b w[b] * mean(block b)``, so nothing is unreachable and the zero intervention on
block ``b`` changes the ``mean_logit`` outcome by exactly ``-w[b] * mean(block b)``; the
joint change of a group of blocks is the sum of theirs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic import block_means, random_image, torch_threads, wrap
from torch import nn

from napari_pdcr import NodeStatus, PatchBank, RegionEffects, box_region
from napari_pdcr.regions import BlockGrid

B = 4
SHAPE = {2: (32, 32), 3: (16, 16, 16)}  # grids of 8x8 and 4x4x4 blocks
REGION = {2: ((12, 12), 8), 3: ((4, 4, 4), 4)}  # target blocks (3..4, 3..4) in 2D, (1, 1, 1) in 3D
KW = dict(intervention="zero", outcome="mean_logit", block_shape=B, device="cpu")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


class GlobalBlockModel(nn.Module):
    """Scores ``sum_b w[b] * mean(block b)`` at every voxel: a receptive field that covers the image."""

    def __init__(self, weights: np.ndarray, block: int):
        super().__init__()
        self.block = block
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, x):
        pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        pooled = pool(x, self.block, self.block).mean(dim=1)  # (N, *G)
        signal = (pooled * self.weights).flatten(1).sum(dim=1)  # (N,)
        return signal.reshape(-1, 1, *[1] * (x.ndim - 2)).expand(-1, 1, *x.shape[2:])


def setting(dims, weights_at, image=None):
    """Model with weight ``w`` on each block of ``weights_at`` (``{grid index: w}``), an image and a region."""
    grid = BlockGrid.create(SHAPE[dims], B)
    weights = np.zeros(grid.shape)
    for index, w in weights_at.items():
        weights[index] = w
    model = wrap(GlobalBlockModel(weights, B), dims)
    image = random_image((1, *SHAPE[dims]), seed=3, low=0.2) if image is None else image
    start, size = REGION[dims]
    return model, image, box_region(SHAPE[dims], start, size), weights


def exact_effects(image, weights):
    return -weights * block_means(image, B)  # zero ablation of a linear model


SPARSE = {2: {(0, 0): 1.0, (1, 2): -0.5, (6, 0): 0.3}, 3: {(0, 0, 0): 1.0, (0, 0, 1): -0.5}}


@pytest.mark.parametrize("dims", [2, 3])
def test_fast_prunes_groups_without_effect_and_matches_exact_elsewhere(dims):
    model, image, region, weights = setting(dims, SPARSE[dims])
    exact = RegionEffects(model, mode="exact", **KW).attribute(image, region)
    fast_method = RegionEffects(model, mode="fast", **KW)
    cost = fast_method.estimate_cost(image, region)
    fast = fast_method.attribute(image, region)

    truth = exact_effects(image, weights)
    candidates = exact.block_status != NodeStatus.TARGET
    # the model reaches everything: exact mode estimates every candidate block, one pass each
    assert (exact.block_status[candidates] != NodeStatus.UNREACHABLE).all()
    np.testing.assert_allclose(exact.block_effects[candidates], np.where(np.abs(truth) >= 0.02, truth, 0)[candidates],
                               atol=1e-5)

    pruned = fast.block_status == NodeStatus.PRUNED_COARSE
    assert pruned.sum() > candidates.sum() / 2  # most groups have no effect and are pruned
    assert not pruned[truth != 0].any()  # no cancellation here: every block with an effect is kept
    assert (fast.block_effects[pruned] == 0).all() and (exact.block_effects[pruned] == 0).all()
    assert (fast.block_draws[pruned] == 1).all()  # one joint pass of its group
    assert np.isnan(fast.block_lower[pruned]).all()
    kept = candidates & ~pruned
    assert kept.any()
    np.testing.assert_array_equal(fast.block_effects[kept], exact.block_effects[kept])
    np.testing.assert_array_equal(fast.block_status[kept], exact.block_status[kept])
    np.testing.assert_array_equal(fast.block_status[~candidates], exact.block_status[~candidates])

    assert fast.parameters["coarse_levels"] == [4, 2] and exact.parameters["coarse_levels"] == []
    stages = fast.parameters["forward_passes_by_stage"]
    assert stages["coarse"] > 0 and stages["estimate"] == kept.sum()
    assert fast.forward_passes < exact.forward_passes
    assert cost.passes_if_pruned <= fast.forward_passes <= cost.passes
    assert exact.forward_passes <= cost.passes


def test_hierarchy_levels_and_a_single_level():
    """Two levels (4 then 2 blocks per axis) by default; one level when asked; the same map here."""
    model, image, region, _ = setting(2, SPARSE[2])
    two = RegionEffects(model, mode="fast", **KW)
    one = RegionEffects(model, mode="fast", **KW)
    one.coarse_depth_deterministic = 1
    a, b = two.attribute(image, region), one.attribute(image, region)
    assert a.parameters["coarse_levels"] == [4, 2] and b.parameters["coarse_levels"] == [2]
    np.testing.assert_array_equal(a.block_effects, b.block_effects)
    np.testing.assert_array_equal(a.block_status, b.block_status)
    # three of the four quadrants of 4x4 blocks have no effect: pruned with one pass each, not four
    assert a.parameters["forward_passes_by_stage"]["coarse"] < b.parameters["forward_passes_by_stage"]["coarse"]


def test_cancelling_effects_inside_a_group_are_the_approximation():
    """Two blocks of one 2x2 group with opposite effects of the same size: jointly zero, so the
    fast screen prunes both and reports 0 where exact mode reports -0.6 and +0.6. This is what
    mode="fast" trades for its passes (docs/benchmarks.md measures it on deepbet)."""
    image = random_image((1, *SHAPE[2]), seed=3, low=0.2)
    image[0, 0:4, 0:8] = 0.6  # blocks (0, 0) and (0, 1), one group at both levels
    model, image, region, weights = setting(2, {(0, 0): 1.0, (0, 1): -1.0}, image)
    exact = RegionEffects(model, mode="exact", **KW).attribute(image, region)
    fast = RegionEffects(model, mode="fast", **KW).attribute(image, region)
    pair = (np.array([0, 0]), np.array([0, 1]))
    np.testing.assert_allclose(exact.block_effects[pair], [-0.6, 0.6], atol=1e-5)
    assert (exact.block_status[pair] == NodeStatus.ESTIMATED).all()
    assert (fast.block_status[pair] == NodeStatus.PRUNED_COARSE).all()
    assert (fast.block_effects[pair] == 0).all()
    # with nothing else in the model, the whole map is pruned: the coarsest level's four groups
    assert (fast.block_status[fast.block_status != NodeStatus.TARGET] == NodeStatus.PRUNED_COARSE).all()


@pytest.mark.parametrize("mode", ["exact", "published", "sequential"])
def test_other_modes_never_screen_coarsely(mode):
    image = random_image((1, *SHAPE[2]), seed=3, low=0.2)
    image[0, 0:4, 0:8] = 0.6
    model, image, region, weights = setting(2, {(0, 0): 1.0, (0, 1): -1.0, (5, 6): 0.01}, image)
    result = RegionEffects(model, mode=mode, **KW).attribute(image, region)
    assert not (result.block_status == NodeStatus.PRUNED_COARSE).any()
    assert result.parameters["forward_passes_by_stage"]["coarse"] == 0 and result.parameters["coarse_levels"] == []
    candidates = result.block_status != NodeStatus.TARGET
    truth = exact_effects(image, weights)
    np.testing.assert_allclose(result.block_effects[candidates], np.where(np.abs(truth) >= 0.02, truth, 0)[candidates],
                               atol=1e-5)


def test_random_interventions_keep_one_level_of_n_screen_draws():
    model, image, region, _ = setting(2, SPARSE[2])
    bank = PatchBank([random_image((1, *SHAPE[2]), seed=s) for s in (7, 8)])
    assert RegionEffects(model, bank, mode="fast").coarse_levels(False) == (2,)
    assert RegionEffects(model, bank, mode="fast", n_screen=0).coarse_levels(False) == ()
    assert RegionEffects(model, "zero", mode="fast", n_screen=0).coarse_levels(True) == (4, 2)
    assert RegionEffects(model, "zero", mode="exact").coarse_levels(True) == ()


def test_cost_bound_when_everything_is_pruned():
    """A model whose output no block changes (but that reads every block): the run is the reach probe's
    first level plus the coarsest screen level's groups, exactly the estimate's ``passes_if_pruned``; the
    bound stays above it."""
    model, image, region, _ = setting(2, {})
    method = RegionEffects(model, mode="fast", **KW)
    cost = method.estimate_cost(image, region)
    result = method.attribute(image, region)
    assert (result.block_status[result.block_status != NodeStatus.TARGET] == NodeStatus.PRUNED_COARSE).all()
    assert result.forward_passes == cost.passes_if_pruned < cost.passes
    # the four quadrants of 4x4 blocks, probed for reach (every one reaches: finer reach levels are left to
    # the coarse screen, which tests the same groups) and then screened
    assert result.parameters["forward_passes_by_stage"]["coarse"] == 4
    assert result.parameters["forward_passes_by_stage"]["reach"] == 4
    exact = RegionEffects(model, mode="exact", **KW).attribute(image, region)
    assert exact.parameters["forward_passes_by_stage"]["reach"] == 4 + 16  # exact mode refines to 2x2 groups
    assert "where the coarse screen prunes everything" in cost.message()
    exact_cost = RegionEffects(model, mode="exact", **KW).estimate_cost(image, region)
    assert exact_cost.passes_if_pruned is None and "coarse" not in exact_cost.message()
    assert exact_cost.passes < cost.passes  # the coarse screen's passes are in the fast bound
