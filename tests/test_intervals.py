"""Issue 13: the stratified patch bank, heavy-tail-proof intervals, screened-out vs tested-zero, the sequential screen."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch
from synthetic import random_image, tap_model, torch_threads

from napari_pdcr import NodeStatus, Outcome, PatchBank, RegionEffects, RegionExplanation, box_region
from napari_pdcr.engine.blocks import InputBlocks
from napari_pdcr.engine.estimator import (
    BatchRunner,
    EstimatorSettings,
    NodeSet,
    drive,
    estimate_effects,
)
from napari_pdcr.engine.intervals import betting_interval
from napari_pdcr.regions import BlockGrid


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


B = 4
SHAPE = (32, 32)
TAPS = [((-2, 1), 2.0), ((0, 0), 1.0), ((2, -3), -1.5), ((1, -1), 0.5)]


def half_blank_sources(n: int = 3) -> list[np.ndarray]:
    """Sources whose left half is 0: about 45 % of 4x4 crops are the same all-zero patch."""
    sources = []
    for i in range(n):
        image = random_image((1, *SHAPE), seed=300 + i)
        image[:, :, : SHAPE[1] // 2] = 0
        sources.append(image)
    return sources


# ---------------------------------------------------------------------------- 1. stratified bank


def test_the_bank_collapses_identical_crops_into_weighted_patches():
    bank = PatchBank(half_blank_sources(), size=2000, seed=1)
    crops = bank.bank((B, B))
    patches, counts, member_patch = bank.unique_members((B, B))
    zero_members = int((crops.flatten(1) == 0).all(dim=1).sum())
    assert 0.3 * len(crops) < zero_members < 0.6 * len(crops)
    assert counts.sum() == len(crops) and len(patches) == len(counts) < len(crops)
    zero = int(np.flatnonzero((patches.flatten(1) == 0).all(dim=1).numpy())[0])
    assert counts[zero] == zero_members
    torch.testing.assert_close(patches[torch.from_numpy(member_patch)], crops)  # every member is its patch
    strata = bank.strata(crops[0], min_weight=0.05, max_fixed=10)
    assert len(strata.weights) == 1 and strata.weights[0] == pytest.approx(zero_members / len(crops))
    assert (strata.fixed == 0).all()
    rest = strata.sample_rest(500, np.random.default_rng(0))
    assert not (rest.flatten(1) == 0).all(dim=1).any()  # the rest never draws the heavy patch
    assert bank.strata(crops[0], min_weight=0.9, max_fixed=10) is None


def _block_estimates(stratify: bool, seeds: Sequence[int], n_estimate: int = 20):
    model, net = tap_model(2, B, TAPS)
    image = torch.from_numpy(random_image((1, *SHAPE), seed=5))
    region = box_region(SHAPE, (12, 12), 8)
    grid = BlockGrid.create(SHAPE, B)
    bank = PatchBank(half_blank_sources(), size=2000, seed=1)
    nodes = InputBlocks(model, image, grid, region, Outcome("mean_logit"), bank)
    blocks = np.flatnonzero(~grid.any_per_block(region).ravel())
    runs, passes = [], set()
    for seed in seeds:
        settings = EstimatorSettings(n_screen=0, n_estimate=n_estimate, tau=0.0, seed=seed, stratify=stratify)
        estimates = drive(estimate_effects(nodes, blocks, settings, BatchRunner(256)))
        runs.append(estimates.raw_mean[blocks])
        passes.add(estimates.forward_passes)
    # closed form (tests/synthetic.py): ATE(b) = coef(b) * (E[mean of a bank crop] - mean of block b)
    block_means = grid.mean_per_block(image[0].numpy().astype(np.float64)).ravel()
    truth = net.coefficients(region).ravel() * (float(bank.bank((B, B)).double().mean()) - block_means)
    return np.array(runs), truth[blocks], passes


def test_stratified_estimate_equals_plain_sampling_in_expectation_with_lower_variance():
    seeds = range(40)
    plain, truth, plain_passes = _block_estimates(False, seeds)
    stratified, truth_again, strat_passes = _block_estimates(True, seeds)
    np.testing.assert_array_equal(truth, truth_again)
    assert plain_passes == strat_passes  # the same forward passes: the heavy patch takes the place of draws
    for runs in (plain, stratified):  # unbiased: the mean over 40 seeds is within 4 of its standard errors
        error_of_mean = runs.std(axis=0, ddof=1) / np.sqrt(len(runs))
        assert (np.abs(runs.mean(axis=0) - truth) <= 4 * error_of_mean + 1e-6).all()
    affected = np.abs(truth) > 1e-6
    assert affected.sum() >= 6
    variance_plain, variance_strat = plain.var(axis=0)[affected], stratified.var(axis=0)[affected]
    assert (variance_strat <= variance_plain * 1.05).mean() >= 0.9  # lower block by block (5 % seed noise)
    assert variance_strat.sum() < 0.75 * variance_plain.sum()


def test_exact_mode_stratifies_and_published_mode_does_not():
    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=5)
    region = box_region(SHAPE, (12, 12), 8)
    bank = PatchBank(half_blank_sources(), size=2000, seed=1)
    runs = {mode: RegionEffects(model, bank, "mean_logit", block_shape=B, n_estimate=20, tau=0.0, mode=mode)
            for mode in ("published", "exact")}
    assert runs["exact"].parameters()["stratify"] and not runs["published"].parameters()["stratify"]
    exact = runs["exact"].attribute(image, region)
    published = runs["published"].attribute(image, region)
    estimated = exact.block_status == NodeStatus.ESTIMATED
    assert estimated.any()
    # the same estimand from other draws: close, not equal
    assert np.abs(exact.block_effects - published.block_effects)[estimated].max() > 0
    assert np.corrcoef(exact.block_effects[estimated], published.block_effects[estimated])[0, 1] > 0.9


# ---------------------------------------------------------------------------- 2. heavy-tailed intervals


class HeavyTailedNodes(NodeSet):
    """Dice-like outcomes in [0, 100]: node ``i``'s change is ``-drop`` with probability ``p[i]`` (rare, huge),
    else +-``small`` (equally likely). Its true ATE is ``-p[i] * drop``."""

    outcome_bounds = (0.0, 100.0)

    def __init__(self, p: Sequence[float], drop: float = 80.0, small: float = 0.5, base: float = 90.0):
        self.p, self.drop, self.small, self.base = np.asarray(p, float), drop, small, base

    @property
    def n_nodes(self) -> int:
        return len(self.p)

    def base_outcome(self) -> float:
        return self.base

    def sample(self, node, n_draws, rng):
        rare = rng.random(n_draws) < self.p[node]
        change = np.where(rare, -self.drop, np.where(rng.random(n_draws) < 0.5, self.small, -self.small))
        return torch.from_numpy(change)[:, None]

    def outcomes(self, nodes, replacements):
        return self.base + torch.stack(list(replacements))[:, 0].double()

    @property
    def true_ate(self) -> np.ndarray:
        return -self.p * self.drop


def test_intervals_cover_heavy_tailed_effects_where_mean_plus_minus_two_se_does_not():
    node_set = HeavyTailedNodes([0.01, 0.02, 0.03, 0.05, 0.08, 0.0])
    covered, covered_normal, n_runs = [], [], 150
    for seed in range(n_runs):
        settings = EstimatorSettings(n_screen=3, n_estimate=50, tau=0.02, seed=seed)
        estimates = drive(estimate_effects(node_set, range(node_set.n_nodes), settings, BatchRunner(512)))
        tested = estimates.status != NodeStatus.SCREENED_OUT
        assert tested.all()  # every draw changes the outcome by at least 0.5 > tau
        truth = node_set.true_ate
        covered.append((estimates.lower <= truth) & (truth <= estimates.upper))
        half = 1.96 * estimates.standard_error
        covered_normal.append(np.abs(estimates.raw_mean - truth) <= half)
        assert (estimates.lower <= estimates.raw_mean + 1e-9).all() and (estimates.raw_mean <= estimates.upper + 1e-9).all()
    coverage, coverage_normal = np.mean(covered), np.mean(covered_normal)
    assert coverage >= 0.9
    assert coverage_normal < 0.8  # the old interval misses whenever no rare draw was seen
    assert np.mean(covered, axis=0).min() >= 0.85  # and the new one holds node by node
    # a block whose mean rests on one or two rare draws is flagged
    settings = EstimatorSettings(n_screen=3, n_estimate=50, tau=0.02, seed=3)
    one = drive(estimate_effects(HeavyTailedNodes([0.02], small=0.0), [0], settings, BatchRunner(64)))
    if one.raw_mean[0] != 0:
        assert one.few_draws[0]


def test_betting_interval_is_exact_for_constant_draws_and_covers_a_uniform_mean():
    lower, upper = betting_interval(np.full((1, 400), 0.5))
    assert lower[0] < 0.5 < upper[0] and upper[0] - lower[0] < 0.05
    rng = np.random.default_rng(0)
    lower, upper = betting_interval(rng.uniform(0.2, 0.6, (400, 60)), time_uniform=False)
    assert 0.93 <= np.mean((lower <= 0.4) & (0.4 <= upper)) <= 1.0
    empty_lower, empty_upper = betting_interval(np.full((1, 3), np.nan))
    assert (empty_lower[0], empty_upper[0]) == (0.0, 1.0)


def test_the_observed_range_is_used_where_the_outcome_has_none():
    """mean_logit has no known range: the interval comes from the range the run saw and is still finite."""
    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=5)
    region = box_region(SHAPE, (12, 12), 8)
    ex = RegionEffects(model, PatchBank(half_blank_sources(), size=500), "mean_logit", block_shape=B,
                       n_estimate=30, tau=0.0).attribute(image, region)
    estimated = ex.block_status == NodeStatus.ESTIMATED
    assert np.isfinite(ex.block_lower[estimated]).all() and np.isfinite(ex.block_upper[estimated]).all()
    effects = ex.block_effects[estimated]
    assert ((ex.block_lower[estimated] <= effects + 1e-5) & (effects <= ex.block_upper[estimated] + 1e-5)).all()
    assert np.isnan(ex.block_lower[ex.block_status == NodeStatus.TARGET]).all()


# ---------------------------------------------------------------------------- 3. screened out vs tested zero


def test_the_result_tells_screened_out_from_tested_zero_and_stores_it(tmp_path):
    model, net = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=5)
    region = box_region(SHAPE, (12, 12), 8)
    ex = RegionEffects(model, PatchBank(half_blank_sources(), size=500), "mean_logit", block_shape=B,
                       n_estimate=30, tau=0.05, mode="published").attribute(image, region)
    coef = net.coefficients(region)
    no_effect = (coef == 0) & (ex.block_status != NodeStatus.TARGET)
    assert ex.screened_out[no_effect].all() and not ex.tested_zero[no_effect].any()  # every change 0 < tau
    assert (ex.block_draws[no_effect] == 3).all() and ex.block_few_draws[no_effect].all()
    assert ex.summary()["status_counts"]["screened_out"] == int(ex.screened_out.sum())
    path = ex.save(tmp_path / "r.zarr")
    back = RegionExplanation.load(path)
    for name in ("block_lower", "block_upper", "block_few_draws"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ex, name))
    np.testing.assert_array_equal(back.screened_out, ex.screened_out)


def test_a_store_without_intervals_still_loads(tmp_path):
    model, _ = tap_model(2, B, TAPS)
    ex = RegionEffects(model, "zero", "mean_logit", block_shape=B).attribute(
        random_image((1, *SHAPE), seed=5), box_region(SHAPE, (12, 12), 8))
    older = replace(ex, block_lower=None, block_upper=None, block_few_draws=None)
    back = RegionExplanation.load(older.save(tmp_path / "old.zarr"))
    assert not back.has_intervals and back.block_few_draws is None and back.summary()["few_draws"] is None
    np.testing.assert_array_equal(back.block_effects, ex.block_effects)


# ---------------------------------------------------------------------------- 4. sequential screen


def test_sequential_draws_go_on_while_the_interval_crosses_tau():
    node_set = HeavyTailedNodes([0.0, 0.5, 0.01, 0.02], small=0.5)
    runs = {}
    for se_target in (10.0, 0.1):
        settings = EstimatorSettings(n_screen=3, n_estimate=200, tau=0.02, seed=1, sequential=True, round_size=10,
                                     se_target=se_target)
        runs[se_target] = estimates = drive(estimate_effects(node_set, range(4), settings, BatchRunner(256)))
        draws, lower, upper = estimates.n_draws, estimates.lower, estimates.upper
        clear = ((lower > 0.02) | (upper < -0.02)) & (estimates.standard_error <= se_target)
        inside = (lower > -0.02) & (upper < 0.02)
        assert ((draws == 200) | clear | inside).all()  # a node stops before the cap only when decided
        assert draws[0] == 200  # +-0.5 around 0: the interval keeps crossing tau up to the cap
        assert estimates.forward_passes == draws.sum()
    # half the draws drop by 80: clear of tau after a few rounds, but precise only at the cap
    assert runs[10.0].n_draws[1] < 60 and runs[10.0].upper[1] < -0.02
    assert runs[0.1].n_draws[1] == 200


def test_sequential_mode_runs_through_region_effects():
    model, net = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=5)
    region = box_region(SHAPE, (12, 12), 8)
    bank = PatchBank(half_blank_sources(), size=2000, seed=1)
    method = RegionEffects(model, bank, "mean_logit", block_shape=B, n_estimate=60, tau=0.02, mode="sequential")
    assert method.parameters()["sequential"] and method.parameters()["stratify"]
    ex = method.attribute(image, region)
    tested = np.isin(ex.block_status, (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU))
    assert tested.any() and (ex.block_draws[tested] <= 60).all()
    assert (ex.block_draws[tested] < 60).any()  # clear effects stop early
    block_means = BlockGrid.create(SHAPE, B).mean_per_block(image[0].astype(np.float64))
    truth = net.coefficients(region) * (float(bank.bank((B, B)).double().mean()) - block_means)
    inside = (ex.block_lower[tested] - 1e-5 <= truth[tested]) & (truth[tested] <= ex.block_upper[tested] + 1e-5)
    assert inside.mean() >= 0.9
    with pytest.raises(ValueError, match="sequential"):
        RegionEffects(model, bank, "mean_logit", block_shape=B, mode="sequential").attribute(
            image, regions={"a": region, "b": box_region(SHAPE, (0, 0), 4)})


def _mixed_status_explanation() -> RegionExplanation:
    """A 64x48 map in 8x8 blocks: a screened-out band (rows 0-1), tested zeros (rows 2-3), estimates on few
    draws (row 4), an estimate on many draws (row 5, column 0); the target in the last rows."""
    grid = (8, 6)
    status = np.full(grid, NodeStatus.UNREACHABLE, np.int8)
    status[0:2] = NodeStatus.SCREENED_OUT
    status[2:4] = NodeStatus.BELOW_TAU
    status[4] = NodeStatus.ESTIMATED
    status[5, 0] = NodeStatus.ESTIMATED
    status[7] = NodeStatus.TARGET
    effects = np.where(status == NodeStatus.ESTIMATED, -3.0, 0.0).astype(np.float32)
    few = status == NodeStatus.SCREENED_OUT
    few[4] = True
    region = np.zeros((64, 48), bool)
    region[57:63, 10:30] = True
    return RegionExplanation(
        block_effects=effects, block_standard_error=np.zeros(grid, np.float32),
        block_draws=np.where(few, 3, 50).astype(np.int32), block_status=status, block_shape=(8, 8),
        target_region=region, prediction=region.copy(), reference=None, base_outcome=90.0,
        parameters={"tau": 0.02}, model_identity={"name": "toy"},
        block_lower=effects - 1, block_upper=effects + 1, block_few_draws=few,
    )


def test_status_layer_hatches_screened_out_blocks_and_leaves_tested_zeros_clear():
    from napari.components import ViewerModel

    from napari_pdcr._napari.layers import FEW_DRAWS_LABEL, SCREENED_OUT_LABEL, region_layer_data
    from napari_pdcr._napari.viewer import add_to_viewer

    ex = _mixed_status_explanation()
    data, kwargs, kind = region_layer_data(ex, show_prediction=False, show_block_status=True)[-1]
    assert kind == "labels" and data.shape == (64, 48) and kwargs["metadata"]["napari_pdcr"]["role"] == "block_status"
    assert (data[0:16] == SCREENED_OUT_LABEL).mean() > 0.2  # hatched: a quarter of the voxels
    assert (data[0:16] != FEW_DRAWS_LABEL).all()
    assert (data[16:32] == 0).all()  # tested and zero: clear
    assert (data[32:40] == FEW_DRAWS_LABEL).mean() > 0.2 and (data[40:48, :8] == 0).all()
    layers = add_to_viewer(ViewerModel(), ex, show_prediction=False, show_block_status=True)
    assert [layer.name for layer in layers] == ["toy ATE", "toy ATE screened out / few draws"]
    # an older result without the few-draws flag still gets the screened-out hatching
    old = replace(ex, block_lower=None, block_upper=None, block_few_draws=None)
    assert (region_layer_data(old, show_prediction=False, show_block_status=True)[-1][0] == FEW_DRAWS_LABEL).sum() == 0


@pytest.mark.gui
def test_screenshot_shows_grey_hatching_over_screened_out_blocks(make_napari_viewer, tmp_path):
    from imageio.v3 import imwrite

    from napari_pdcr._napari.viewer import add_to_viewer

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(np.full((64, 48), 0.2, np.float32), colormap="gray", contrast_limits=(0, 1))
    add_to_viewer(viewer, _mixed_status_explanation(), source_layer=image, show_prediction=False,
                  show_block_status=True)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    imwrite(tmp_path / "status.png", shot)
    rgb = shot[..., :3].astype(int)
    grey = (np.abs(rgb[..., 0] - rgb[..., 2]) < 12) & (rgb[..., 0] > 120)  # silver hatching over dark grey
    orange = (rgb[..., 0] > 150) & (rgb[..., 1] > 80) & (rgb[..., 2] < 80)
    assert grey.sum() > 200 and orange.sum() > 50, (grey.sum(), orange.sum())
