"""Correctness of the region-effect engine against closed-form effects of synthetic models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from synthetic import (
    AbsoluteBlockModel,
    LocalConv,
    NaNRemoving,
    TapModel,
    block_means,
    random_image,
    receptive_blocks,
    tap_model,
    torch_threads,
    wrap,
)

from napari_pdcr import (
    Blur,
    CallableIntervention,
    Constant,
    ImageMean,
    Intervention,
    NodeStatus,
    Noise,
    Outcome,
    PatchBank,
    RegionEffects,
    box_region,
    explain_region,
)
from napari_pdcr.engine.reach import reachable_blocks
from napari_pdcr.regions import BlockGrid


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


B = 4  # block size of every test
TAU = 0.02

# Taps (grid offsets from the region's cells, weights). Region cells are (3..4, 3..4) in 2D.
TAPS_2D = [((-2, 1), 2.0), ((0, 0), 1.0), ((2, -3), -1.5), ((1, 3), 0.004)]
TAPS_3D = [((-2, 0, 1), 2.0), ((0, 0, 0), 1.0), ((1, -2, 0), -1.5), ((0, 2, 1), 0.004)]
SHAPE = {2: (32, 32), 3: (16, 16, 16)}
REGION = {2: ((13, 13), 6), 3: ((5, 5, 5), 5)}


def region_for(dims):
    start, size = REGION[dims]
    return box_region(SHAPE[dims], start, size)


def taps_for(dims):
    return TAPS_2D if dims == 2 else TAPS_3D


def target_blocks(region):
    return BlockGrid.create(region.shape, B).any_per_block(region)


def bank_sources(dims, channels=1, n=3, seed=100):
    return [random_image((channels, *SHAPE[dims]), seed + i) for i in range(n)]


def expected_map(expected, region, tau=TAU):
    """The published rule applied to exact effects: 0 on target blocks and below tau."""
    return np.where(target_blocks(region) | (np.abs(expected) < tau), 0.0, expected)


def check_statuses_deterministic(ex, expected, region, tau=TAU, coarse=False):
    """``coarse``: mode="fast", whose coarse screen may prune small blocks (tests/test_coarse_deterministic.py)."""
    status = ex.block_status
    tgt = target_blocks(region)
    assert (status[tgt] == NodeStatus.TARGET).all()
    assert (ex.block_effects[tgt] == 0).all() and (ex.block_draws[tgt] == 0).all()
    big = ~tgt & (np.abs(expected) >= tau * 1.01)
    small = ~tgt & (np.abs(expected) < tau * 0.99)
    assert (status[big] == NodeStatus.ESTIMATED).all()
    small_statuses = [NodeStatus.BELOW_TAU, NodeStatus.UNREACHABLE] + [NodeStatus.PRUNED_COARSE] * coarse
    assert np.isin(status[small], small_statuses).all()
    assert (ex.block_effects[small] == 0).all()


# ---------------------------------------------------------------------------- closed form, deterministic


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["published", "exact", "fast"])
def test_zero_ablation_is_exact(dims, mode):
    model, net = tap_model(dims, B, taps_for(dims), gain=(1.5,))
    image = random_image((1, *SHAPE[dims]), seed=1)
    region = region_for(dims)
    ex = RegionEffects(model, "zero", "mean_logit", block_shape=B, mode=mode).attribute(image, region)
    expected = -1.5 * net.coefficients(region) * block_means(image, B)
    np.testing.assert_allclose(ex.block_effects, expected_map(expected, region), atol=1e-5)
    check_statuses_deterministic(ex, expected, region, coarse=mode == "fast")
    evaluated = np.isin(ex.block_status, [NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU])
    assert (ex.block_draws[evaluated] == 1).all()  # deterministic: one draw is exact
    assert (ex.block_standard_error == 0).all()
    if mode == "published":  # nothing may be skipped
        assert not (ex.block_status == NodeStatus.UNREACHABLE).any()
    # voxel maps broadcast the block values
    assert ex.ate.shape == SHAPE[dims] and ex.ate.dtype == np.float32
    np.testing.assert_array_equal(ex.ate, BlockGrid.create(SHAPE[dims], B).to_voxels(ex.block_effects))
    assert ex.base_outcome == pytest.approx(1.5 * (net.coefficients(region) * block_means(image, B)).sum(), abs=1e-5)


def _blurred(image, sigma):
    from monai.networks.layers import GaussianFilter

    with torch.inference_mode():
        return GaussianFilter(image.ndim - 1, sigma)(torch.from_numpy(image)[None])[0].numpy()


@pytest.mark.parametrize(
    "intervention, replacement_mean",
    [
        (Constant(0.7), lambda img: np.full(block_means(img, B).shape, 0.7)),
        (ImageMean(), lambda img: np.full(block_means(img, B).shape, img.astype(np.float64).mean())),
        (Blur(1.5), lambda img: block_means(_blurred(img, 1.5), B)),
        (
            CallableIntervention(lambda o, n, rng: (o + 0.25)[None].repeat(n, *[1] * o.ndim), "plus", deterministic=True),
            lambda img: block_means(img, B) + 0.25,
        ),
    ],
    ids=["constant", "mean", "blur", "callable"],
)
@pytest.mark.parametrize("dims", [2, 3])
def test_deterministic_interventions_are_exact(intervention, replacement_mean, dims):
    model, net = tap_model(dims, B, taps_for(dims), in_channels=2)
    image = random_image((2, *SHAPE[dims]), seed=2)
    image[1] += 0.5  # channels with different means: ImageMean is per channel
    region = region_for(dims)
    ex = RegionEffects(model, intervention, "mean_logit", block_shape=B).attribute(image, region)
    expected = net.coefficients(region) * (replacement_mean(image) - block_means(image, B))
    np.testing.assert_allclose(ex.block_effects, expected_map(expected, region), atol=1e-5)
    check_statuses_deterministic(ex, expected, region)


def test_blur_matches_a_gaussian_filter():
    """The blurred copy is a Gaussian blur of the image (independent check of sigma)."""
    image = random_image((1, 32, 32), seed=3)
    blur = Blur(2.0)
    blur.prepare(torch.from_numpy(image))
    loc = (slice(12, 16), slice(16, 20))
    out = blur.sample(torch.from_numpy(image[(slice(None), *loc)]), 2, np.random.default_rng(0), loc)
    ref = gaussian_filter(image[0].astype(np.float64), 2.0, mode="constant")[loc]
    assert out.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=0.01)
    np.testing.assert_array_equal(out[0], out[1])


# ---------------------------------------------------------------------------- closed form, stochastic


def _check_stochastic(ex, expected, pop_sd, n_estimate, region, k=4.5):
    """Estimated blocks lie within k standard errors of the closed form; big blocks are estimated."""
    tgt = target_blocks(region)
    se_pop = pop_sd / np.sqrt(n_estimate)
    est = ex.block_status == NodeStatus.ESTIMATED
    assert est.any()
    err = np.abs(ex.block_effects - expected)
    assert (err[est] <= k * se_pop[est] + 1e-6).all(), (ex.block_effects[est], expected[est], se_pop[est])
    # blocks whose effect is far above tau must be estimated, with the full number of draws
    big = ~tgt & (np.abs(expected) > TAU + k * se_pop)
    assert big.any() and est[big].all()
    assert (ex.block_draws[big] == n_estimate).all()
    # blocks with no effect at all are exactly 0
    none = ~tgt & (expected == 0)
    assert (ex.block_effects[none] == 0).all()
    assert (ex.block_status[tgt] == NodeStatus.TARGET).all() and (ex.block_effects[tgt] == 0).all()


@pytest.mark.parametrize("dims, channels", [(2, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("mode", ["published", "exact"])
def test_patch_bank_matches_closed_form(dims, channels, mode):
    model, net = tap_model(dims, B, taps_for(dims), in_channels=channels)
    image = random_image((channels, *SHAPE[dims]), seed=4, low=0.2, high=1.4)  # brighter than the bank
    region = region_for(dims)
    bank = PatchBank(bank_sources(dims, channels), size=400, seed=1)
    n = 40
    ex = RegionEffects(model, bank, "mean_logit", block_shape=B, n_estimate=n, mode=mode).attribute(image, region)
    crops = bank.bank((B,) * dims).double().flatten(1).mean(dim=1).numpy()
    coef = net.coefficients(region)
    expected = coef * (crops.mean() - block_means(image, B))
    _check_stochastic(ex, expected, np.abs(coef) * crops.std(), n, region)
    # the reported standard error is close to the population one (chi with n-1 df: +-4 sd)
    est = ex.block_status == NodeStatus.ESTIMATED
    ratio = ex.block_standard_error[est] / (np.abs(coef[est]) * crops.std() / np.sqrt(n))
    assert ((ratio > 0.5) & (ratio < 1.5)).all(), ratio


def test_noise_and_random_callable_match_closed_form():
    model, net = tap_model(2, B, TAPS_2D)
    image = random_image((1, 32, 32), seed=5)
    region = region_for(2)
    coef, m = net.coefficients(region), block_means(image, B)
    n = 40
    ex = RegionEffects(model, Noise(mean=0.3, std=0.2), "mean_logit", block_shape=B, n_estimate=n).attribute(image, region)
    # the mean of B*B iid N(0.3, 0.2^2) voxels has sd 0.2 / B
    _check_stochastic(ex, coef * (0.3 - m), np.abs(coef) * 0.2 / B, n, region)

    uniform = CallableIntervention(lambda o, k, rng: rng.random((k, *o.shape), dtype=np.float32), "uniform")
    ex = RegionEffects(model, uniform, "mean_logit", block_shape=B, n_estimate=n).attribute(image, region)
    _check_stochastic(ex, coef * (0.5 - m), np.abs(coef) * np.sqrt(1 / 12) / B, n, region)


def test_noise_defaults_to_image_statistics():
    image = random_image((1, 32, 32), seed=6, low=2.0, high=4.0)
    noise = Noise()
    noise.prepare(torch.from_numpy(image))
    draws = noise.sample(torch.zeros(1, 8, 8), 200, np.random.default_rng(0), (slice(0, 8), slice(0, 8)))
    assert draws.shape == (200, 1, 8, 8) and draws.dtype == torch.float32
    assert float(draws.mean()) == pytest.approx(float(image.mean()), abs=0.02)
    assert float(draws.std()) == pytest.approx(float(image.std()), rel=0.05)


class Recording(Intervention):
    """Uniform replacement blocks; remembers every draw per block location."""

    name = "recording"

    def __init__(self):
        self.calls: dict[tuple, list[np.ndarray]] = {}

    def sample(self, original, n_draws, rng, location):
        draws = rng.random((n_draws, *original.shape), dtype=np.float32)
        key = tuple((s.start, s.stop) for s in location)
        self.calls.setdefault(key, []).append(draws)
        return torch.from_numpy(draws)


def test_estimate_is_the_sample_mean_and_se_of_fresh_draws():
    """The reported ATE and SE are the mean and standard error of the estimate-stage draws
    (fresh draws, not the screening ones), exactly."""
    model, net = tap_model(2, B, TAPS_2D, gain=(3.0,))
    image = random_image((1, 32, 32), seed=7)
    region = region_for(2)
    rec = Recording()
    ex = RegionEffects(model, rec, "mean_logit", block_shape=B, n_screen=3, n_estimate=25, mode="published").attribute(image, region)
    coef, m = net.coefficients(region), block_means(image, B)
    grid = BlockGrid.create((32, 32), B)
    checked = 0
    for b in np.flatnonzero(ex.block_status.ravel() == NodeStatus.ESTIMATED):
        key = tuple((s.start, s.stop) for s in grid.slices(int(b)))
        screen, estimate = rec.calls[key]
        assert screen.shape[0] == 3 and estimate.shape[0] == 25
        assert not np.array_equal(screen, estimate[:3])  # fresh draws
        cell = np.unravel_index(b, grid.shape)
        deltas = 3.0 * coef[cell] * (estimate.reshape(25, -1).astype(np.float64).mean(axis=1) - m[cell])
        assert ex.block_effects[cell] == pytest.approx(deltas.mean(), abs=1e-5)
        assert ex.block_standard_error[cell] == pytest.approx(deltas.std(ddof=1) / np.sqrt(25), rel=1e-4, abs=1e-6)
        assert ex.block_draws[cell] == 25
        checked += 1
    assert checked >= 2
    # screened-out blocks were drawn only n_screen times and report SE 0
    screened = ex.block_status == NodeStatus.SCREENED_OUT
    assert screened.any()
    assert (ex.block_draws[screened] == 3).all() and (ex.block_standard_error[screened] == 0).all()
    np.testing.assert_array_equal(ex.screened_out, screened)


# ---------------------------------------------------------------------------- the tau / screen rule


def test_tau_rule_deterministic_boundaries():
    """|ATE| >= tau is kept, |ATE| < tau is 0 (BELOW_TAU); blocks touching the target are TARGET."""
    image = np.full((1, 32, 32), 0.5, np.float32)
    region = region_for(2)
    tau = 0.5
    # constant 0 replacement: ATE(b) = -w * 0.5 for a tap of weight w (region is 4 cells, each tap once)
    taps = [((-2, 0), 0.9 * 2 * tau), ((-2, 2), 1.1 * 2 * tau), ((2, 0), -0.9 * 2 * tau), ((2, 2), -1.1 * 2 * tau), ((0, 0), 5.0)]
    model, net = tap_model(2, B, taps)
    ex = RegionEffects(model, "zero", "mean_logit", block_shape=B, tau=tau, mode="published").attribute(image, region)
    expected = -net.coefficients(region) * 0.5
    check_statuses_deterministic(ex, expected, region, tau)
    np.testing.assert_allclose(ex.block_effects, expected_map(expected, region, tau), atol=1e-6)
    assert (np.abs(ex.block_effects[ex.block_effects != 0]) >= tau).all()
    assert ((ex.block_status == NodeStatus.BELOW_TAU) & (expected != 0)).sum() >= 2  # the 0.9 tau blocks
    # a tap at offset 0 gives the region's own blocks a large effect, but they are TARGET
    assert (ex.block_status[target_blocks(region)] == NodeStatus.TARGET).all()


def test_screen_rule_stochastic():
    """Blocks whose every screening change is below tau are SCREENED_OUT (0, n_screen draws);
    a block whose changes are large but average to 0 passes the screen and ends BELOW_TAU."""
    image = np.full((1, 32, 32), 0.5, np.float32)
    region = region_for(2)
    big_tap, small_tap = ((-2, 0), 1.0), ((2, 2), 0.01)
    model, net = tap_model(2, B, [big_tap, small_tap])
    grid = BlockGrid.create((32, 32), B)

    def plus_minus(original, n, rng):  # +-0.4 alternately: every change is large, the mean is 0
        signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
        return original[None] + torch.from_numpy(signs).reshape(-1, *[1] * original.ndim) * 0.4

    alt = CallableIntervention(plus_minus, "plus_minus")
    ex = RegionEffects(model, alt, "mean_logit", block_shape=B, tau=0.05, n_screen=3, n_estimate=20, mode="published").attribute(image, region)
    coef = net.coefficients(region)
    big = np.abs(coef) > 0.1  # each of the 4 region cells takes a quarter of a tap
    small = (np.abs(coef) > 0) & (np.abs(coef) < 0.1)
    # big-tap blocks: changes of 0.1 per draw pass the screen; the mean of 20 alternating draws is 0
    assert big.sum() == 4 and small.sum() == 4
    assert (ex.block_status[big] == NodeStatus.BELOW_TAU).all()
    assert (ex.block_draws[big] == 20).all() and (ex.block_effects[big] == 0).all()
    # small-tap blocks: every change is 0.001 < tau -> screened out
    assert (ex.block_status[small] == NodeStatus.SCREENED_OUT).all()
    assert (ex.block_draws[small] == 3).all() and (ex.block_effects[small] == 0).all()
    # everything else (no effect at all) is screened out too; nothing is left unexplained
    rest = ~big & ~small & ~grid.any_per_block(region)
    assert (ex.block_status[rest] == NodeStatus.SCREENED_OUT).all()


# ---------------------------------------------------------------------------- exact accelerations


@pytest.mark.parametrize("dims", [2, 3])
def test_exact_mode_equals_published_and_skips_exactly_the_far_blocks(dims):
    net = LocalConv(dims, layers=2, seed=dims)
    model = wrap(net, dims)
    image = random_image((1, *SHAPE[dims]), seed=8)
    # region aligned so that its receptive field (radius 2) covers whole pairs of blocks
    region = box_region(SHAPE[dims], (12,) * dims if dims == 2 else (0,) * dims, 8 if dims == 2 else 4)
    bank = PatchBank(bank_sources(dims), size=300)
    kw = dict(intervention=bank, outcome="mean_logit", block_shape=B, n_estimate=12, tau=0.0)
    published = RegionEffects(model, mode="published", **kw).attribute(image, region)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-5)
    np.testing.assert_allclose(exact.block_standard_error, published.block_standard_error, atol=1e-5)
    tgt = target_blocks(region)
    far = ~tgt & ~receptive_blocks(region, 2, B)
    assert far.any()
    np.testing.assert_array_equal(exact.block_status == NodeStatus.UNREACHABLE, far)
    assert not (published.block_status == NodeStatus.UNREACHABLE).any()
    assert (exact.block_effects[far] == 0).all()
    assert exact.forward_passes < published.forward_passes
    assert exact.parameters["window"] is not None  # the model ran on a crop
    assert exact.log == []  # the reach proof and the window were verified


@pytest.mark.parametrize("shape", [(30, 27), (13, 15, 11)])
@pytest.mark.parametrize("mode", ["published", "exact"])
def test_zero_ablation_matches_brute_force_on_odd_sizes(shape, mode):
    """Image sizes that are not multiples of the block (smaller edge blocks) nor of the
    model's divisibility (padding): every block's effect equals zeroing it by hand."""
    dims = len(shape)
    model = wrap(LocalConv(dims, layers=2, seed=8), dims, activation="sigmoid", divisible_by=4)
    image = random_image((1, *shape), seed=26)
    region = box_region(shape, (5,) * dims, 6 if dims == 2 else 4)
    outcome = Outcome("soft_dice")
    ex = RegionEffects(model, "zero", outcome, block_shape=B, tau=0.0, mode=mode).attribute(image, region)
    grid = BlockGrid.create(shape, B)
    assert ex.block_effects.shape == grid.shape == tuple(-(-n // B) for n in shape)
    x = torch.from_numpy(image)
    index = torch.from_numpy(np.flatnonzero(region))

    def y(batch):
        with torch.inference_mode():
            scores = model(batch).flatten(2)[:, :, index]
        reference = outcome.predicted_mask(model(x[None]).flatten(2)[:, :, index], "sigmoid", 0)[0]
        return outcome(scores, reference, "sigmoid", 0).numpy()

    target = grid.any_per_block(region)
    batch = x.expand(grid.n_blocks, *x.shape).clone()
    for b in range(grid.n_blocks):
        batch[(b, slice(None), *grid.slices(b))] = 0
    expected = np.where(target.ravel(), 0.0, y(batch) - y(x[None])[0]).reshape(grid.shape)
    np.testing.assert_allclose(ex.block_effects, expected, atol=1e-4)
    assert (np.abs(expected[~target]) > 0).sum() >= 4


@pytest.mark.parametrize("outcome", ["dice", "mean_probability"])
def test_exact_mode_equals_published_for_thresholded_outcomes(outcome):
    net = LocalConv(2, layers=3, seed=11)
    model = wrap(net, 2, activation="sigmoid")
    image = random_image((1, 32, 32), seed=9)
    region = box_region((32, 32), (10, 9), 7)
    kw = dict(intervention=PatchBank(bank_sources(2), size=300), outcome=outcome, block_shape=B, n_estimate=10)
    published = RegionEffects(model, mode="published", **kw).attribute(image, region)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-4)
    assert exact.base_outcome == pytest.approx(published.base_outcome, abs=1e-6)
    # skipped blocks lie outside the receptive field (radius 3); none inside is skipped
    unreachable = exact.block_status == NodeStatus.UNREACHABLE
    assert unreachable.any() and not (unreachable & receptive_blocks(region, 3, B)).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_reachability_at_block_resolution_is_the_receptive_field(dims):
    model = wrap(LocalConv(dims, layers=2, seed=3), dims)
    x = torch.from_numpy(random_image((1, *SHAPE[dims]), seed=10))
    region = box_region(SHAPE[dims], (9,) * dims if dims == 2 else (5,) * dims, 5 if dims == 2 else 3)
    grid = BlockGrid.create(SHAPE[dims], B)
    candidates = ~grid.any_per_block(region)
    reach, passes = reachable_blocks(model, x, grid, region, candidates, group_levels=(4, 2, 1))
    np.testing.assert_array_equal(reach, candidates & receptive_blocks(region, 2, B))
    assert passes > 0
    # the default (coarser) levels are conservative: never less than the receptive field
    coarse, _ = reachable_blocks(model, x, grid, region, candidates)
    assert not (reach & ~coarse).any()


def test_global_model_skips_nothing():
    model = wrap(LocalConv(2, layers=2, seed=4, global_weight=3.0), 2)
    image = random_image((1, 32, 32), seed=11)
    region = region_for(2)
    kw = dict(intervention="zero", outcome="mean_logit", block_shape=B, tau=0.0)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    published = RegionEffects(model, mode="published", **kw).attribute(image, region)
    assert not (exact.block_status == NodeStatus.UNREACHABLE).any()
    assert exact.parameters["window"] is None and exact.parameters["n_reachable_blocks"] == exact.parameters["n_candidate_blocks"]
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-6)
    # every block changes the global mean: every candidate has a non-zero effect
    assert (exact.block_effects[~target_blocks(region)] != 0).all()


@pytest.mark.parametrize("global_weight", [0.0, 3.0])
def test_model_that_removes_nan_is_still_exact(global_weight):
    """NaN propagation proves nothing for a model that replaces NaN by 0; the engine must
    notice (not report every block as unreachable) and still give the published map."""
    model = wrap(NaNRemoving(LocalConv(2, layers=2, seed=7, global_weight=global_weight)), 2)
    image = random_image((1, 32, 32), seed=25)
    region = box_region((32, 32), (12, 12), 8)
    kw = dict(intervention="zero", outcome="mean_logit", block_shape=B, tau=0.0)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    published = RegionEffects(model, mode="published", **kw).attribute(image, region)
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-6)
    assert (exact.block_effects != 0).sum() == (published.block_effects != 0).sum() > 0
    assert any("NaN propagation does not hold" in line for line in exact.log)


def test_position_dependent_model_is_still_exact():
    """A model that reads a fixed absolute position is not translation-equivariant: the
    window crop must be rejected (or be harmless) and the map must stay exact."""
    src = (slice(20, 24), slice(24, 28))
    model = wrap(AbsoluteBlockModel(src, w=2.0), 2)
    image = random_image((1, 32, 32), seed=12)
    region = box_region((32, 32), (26, 26), 4)
    ex = RegionEffects(model, "zero", "mean_logit", block_shape=B, mode="exact").attribute(image, region)
    expected = np.zeros((8, 8))
    expected[5, 6] = -2.0 * image[0][src].astype(np.float64).mean()
    np.testing.assert_allclose(ex.block_effects, expected, atol=1e-5)


def test_fixed_input_size_model_falls_back_to_the_full_image():
    """A model that only accepts the full image size cannot run on a crop: the engine must use
    the full image (and say so), not fail."""
    from synthetic import FixedSizeModel

    model = wrap(FixedSizeModel(LocalConv(2, layers=2, seed=5), (32, 32)), 2)
    image = random_image((1, 32, 32), seed=13)
    region = box_region((32, 32), (12, 12), 8)
    kw = dict(intervention="zero", outcome="mean_logit", block_shape=B, tau=0.0)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    published = RegionEffects(model, mode="published", **kw).attribute(image, region)
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-6)
    assert exact.parameters["window"] is None
    assert any("full image" in line for line in exact.log)


# ---------------------------------------------------------------------------- reproducibility


def _bank_run(seed=0, batch_size=None, mode="exact", dims=2, **kw):
    model, _ = tap_model(dims, B, taps_for(dims))
    image = random_image((1, *SHAPE[dims]), seed=14)
    bank = PatchBank(bank_sources(dims), size=300, seed=3)
    return RegionEffects(
        model, bank, "mean_logit", block_shape=B, n_estimate=15, seed=seed, batch_size=batch_size, mode=mode, **kw
    ).attribute(image, region_for(dims))


def _assert_same(a, b):
    np.testing.assert_array_equal(a.block_effects, b.block_effects)
    np.testing.assert_array_equal(a.block_standard_error, b.block_standard_error)
    np.testing.assert_array_equal(a.block_draws, b.block_draws)
    np.testing.assert_array_equal(a.block_status, b.block_status)


def test_same_seed_same_map():
    _assert_same(_bank_run(seed=5), _bank_run(seed=5))


@pytest.mark.parametrize("mode", ["published", "fast"])
def test_batch_size_does_not_change_the_map(mode):
    runs = [_bank_run(batch_size=bs, mode=mode) for bs in (1, 7, 64)]
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])
    assert runs[0].parameters["batch_size"] == 1 and runs[2].parameters["batch_size"] == 64


def test_batch_size_does_not_change_a_conv_map():
    model = wrap(LocalConv(3, layers=2, seed=6), 3)
    image = random_image((1, 16, 16, 16), seed=15)
    region = region_for(3)
    kw = dict(intervention=PatchBank(bank_sources(3), size=100), outcome="mean_logit", block_shape=B, n_estimate=6, tau=0.0)
    a = RegionEffects(model, batch_size=3, **kw).attribute(image, region)
    b = RegionEffects(model, batch_size=32, **kw).attribute(image, region)
    np.testing.assert_allclose(a.block_effects, b.block_effects, atol=1e-6)


def test_different_seed_different_draws():
    a, b = _bank_run(seed=1), _bank_run(seed=2)
    est = (a.block_status == NodeStatus.ESTIMATED) & (b.block_status == NodeStatus.ESTIMATED)
    assert est.any()
    assert not np.array_equal(a.block_effects[est], b.block_effects[est])
    # ...but the same estimand: the maps agree within their standard errors
    se = np.sqrt(a.block_standard_error[est] ** 2 + b.block_standard_error[est] ** 2)
    assert (np.abs(a.block_effects[est] - b.block_effects[est]) <= 5 * se).all()
    assert a.provenance["seed"] == 1 and b.parameters["seed"] == 2


def test_patch_bank_is_reproducible_and_needs_matching_sources():
    sources = bank_sources(2)
    a, b = PatchBank(sources, size=50, seed=4), PatchBank(sources, size=50, seed=4)
    assert torch.equal(a.bank((4, 4)), b.bank((4, 4)))
    assert not torch.equal(a.bank((4, 4)), PatchBank(sources, size=50, seed=5).bank((4, 4)))
    assert a.bank((4, 4)).shape == (50, 1, 4, 4)
    # every crop is a crop of some source
    crop = a.bank((4, 4))[0, 0].numpy()
    windows = [np.lib.stride_tricks.sliding_window_view(s[0], (4, 4)) for s in sources]
    assert any((w == crop).all(axis=(-2, -1)).any() for w in windows)


# ---------------------------------------------------------------------------- outcomes


def _dice_setup(activation="sigmoid", **model_kw):
    """Region in cell (3..4, 3..4); every region voxel's logit is 50 * (m(src) - 0.5)."""
    taps = [((-2, 2), 1.0)]
    model, net = tap_model(2, B, taps, activation=activation, bias=(-25.0,), gain=(50.0,), **model_kw)
    image = random_image((1, 32, 32), seed=16, low=0.6, high=1.0)  # src mean > 0.5: predicted everywhere
    region = box_region((32, 32), (13, 12), (3, 4))  # inside cell (3, 3): reads block (1, 5) only
    # bank: crops from a dark (all < 0.4) and a bright (all > 0.6) source
    dark = random_image((1, 32, 32), 17, 0.0, 0.4)
    bright = random_image((1, 32, 32), 18, 0.6, 1.0)
    bank = PatchBank([dark, bright], size=400, seed=2)
    crop_means = bank.bank((B, B)).flatten(1).double().mean(dim=1).numpy()
    return model, net, image, region, bank, crop_means


def _src_cells(net, region):
    return np.abs(net.coefficients(region)) > 0


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_dice_matches_closed_form(mode):
    model, net, image, region, bank, crop_means = _dice_setup()
    p_dark = (crop_means <= 0.5).mean()
    assert 0.2 < p_dark < 0.8
    n = 60
    # no screen: with P(no change) = 0.47 per draw, 3 screening draws miss this -53 point
    # block 10% of the time (the published screen's false negatives); test the estimate
    kw = dict(block_shape=B, n_screen=0, n_estimate=n, mode=mode)
    ex = RegionEffects(model, bank, "dice", **kw).attribute(image, region)
    assert ex.base_outcome == 100.0  # the reference is the model's own prediction
    src = _src_cells(net, region)
    se = 100 * np.sqrt(p_dark * (1 - p_dark) / n)
    assert (np.abs(ex.block_effects[src] - (-100 * p_dark)) <= 4.5 * se).all()
    assert (ex.block_effects[~src] == 0).all()
    assert ex.prediction[region].all() and ex.reference is None

    # with a ground truth that is empty in the region, turning the prediction off *helps*
    empty = np.zeros((32, 32), bool)
    ex = RegionEffects(model, bank, "dice", **kw).attribute(image, region, reference=empty)
    assert ex.base_outcome == 0.0
    assert (np.abs(ex.block_effects[src] - 100 * p_dark) <= 4.5 * se).all()
    np.testing.assert_array_equal(ex.reference, empty)

    # zero ablation: every region voxel is switched off, Dice 100 -> 0, exactly
    ex = RegionEffects(model, "zero", "dice", block_shape=B).attribute(image, region)
    np.testing.assert_array_equal(ex.block_effects[src], -100.0)


def _soft_dice(p):
    # region: all voxels have probability p; the reference (own prediction) is all ones
    return 200 * p / (1 + p)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("temperature", [1.0, 40.0])
def test_soft_outcomes_match_closed_form(temperature):
    model, net, image, region, _, _ = _dice_setup()
    src = _src_cells(net, region)
    m = block_means(image, B)[src]
    z0, z1 = -25 + 50 * m, np.full_like(m, -25.0)  # before / after zero ablation
    t = temperature
    kw = dict(intervention="zero", block_shape=B, tau=0.0)
    ex = RegionEffects(model, outcome=Outcome("soft_dice", temperature=t), **kw).attribute(image, region)
    np.testing.assert_allclose(ex.block_effects[src], _soft_dice(_sigmoid(z1 / t)) - _soft_dice(_sigmoid(z0 / t)), atol=1e-3)
    ex = RegionEffects(model, outcome=Outcome("mean_probability", temperature=t), **kw).attribute(image, region)
    np.testing.assert_allclose(ex.block_effects[src], 100 * (_sigmoid(z1 / t) - _sigmoid(z0 / t)), atol=1e-3)
    ex = RegionEffects(model, outcome=Outcome("mean_logit", temperature=t), **kw).attribute(image, region)
    np.testing.assert_allclose(ex.block_effects[src], z1 - z0, atol=1e-3)  # logits ignore T


def test_dice_is_blind_to_temperature_soft_outcomes_are_not():
    model, _, image, region, bank, _ = _dice_setup()
    kw = dict(intervention=bank, block_shape=B, n_estimate=20, tau=0.0, mode="published")

    def run(kind, t):
        return RegionEffects(model, outcome=Outcome(kind, temperature=t), **kw).attribute(image, region)

    for kind, blind in [("dice", True), ("soft_dice", False), ("mean_probability", False), ("mean_logit", True)]:
        a, b = run(kind, 1.0), run(kind, 30.0)
        if blind:
            np.testing.assert_array_equal(a.block_effects, b.block_effects)
            assert a.base_outcome == b.base_outcome
        else:
            assert not np.allclose(a.block_effects, b.block_effects, atol=1e-2), kind
    # a low temperature moves a soft outcome towards the hard (thresholded) one
    hard, soft = run("dice", 1.0), run("soft_dice", 0.01)
    np.testing.assert_allclose(soft.block_effects, hard.block_effects, atol=1e-3)


def test_softmax_class_channel():
    """Three classes, logits ``bias_k + gain_k * m(src)``: mean probability and Dice of a chosen class."""
    taps = [((-2, 2), 1.0)]
    bias, gain = (0.0, 1.0, -2.0), (0.0, -1.0, 4.0)
    model, net = tap_model(2, B, taps, activation="softmax", bias=bias, gain=gain)
    image = random_image((1, 32, 32), seed=19, low=0.7, high=1.0)
    region = box_region((32, 32), (12, 12), 4)  # cell (3, 3): reads block (1, 5) only
    src = _src_cells(net, region)
    m = block_means(image, B)[src]

    def probs(s, t=1.0):
        z = (np.asarray(bias)[:, None] + np.asarray(gain)[:, None] * s[None]) / t
        e = np.exp(z - z.max(axis=0))
        return e / e.sum(axis=0)

    for t in (1.0, 3.0):
        ex = RegionEffects(model, "zero", Outcome("mean_probability", channel=2, temperature=t), block_shape=B, tau=0.0).attribute(image, region)
        np.testing.assert_allclose(ex.block_effects[src], 100 * (probs(0 * m, t)[2] - probs(m, t)[2]), atol=1e-4)
        assert (ex.block_effects[~src] == 0).all()
    # class 2 wins before (4m - 2 > 1 - m for m > 0.6) and loses after zero ablation: Dice 100 -> 0
    ex = RegionEffects(model, "zero", Outcome("dice", channel=2), block_shape=B).attribute(image, region)
    np.testing.assert_array_equal(ex.block_effects[src], -100.0)
    assert ex.prediction[region].all()
    # class 1 wins after the ablation; before, it is nowhere: Dice of an empty prediction
    # against an empty reference is 100, after it the prediction is non-empty: 0
    ex = RegionEffects(model, "zero", Outcome("dice", channel=1), block_shape=B).attribute(image, region)
    np.testing.assert_array_equal(ex.block_effects[src], -100.0)
    with pytest.raises(ValueError, match="choose the class"):
        RegionEffects(model, "zero", "dice", block_shape=B).attribute(image, region)


def test_explain_region_one_call():
    model, net = tap_model(2, B, TAPS_2D)
    image = random_image((1, 32, 32), seed=20)
    region = region_for(2)
    a = explain_region(model, image, region, intervention="zero", outcome="mean_logit", block_shape=B)
    b = RegionEffects(model, "zero", "mean_logit", block_shape=B).attribute(image, region)
    np.testing.assert_array_equal(a.block_effects, b.block_effects)
    assert a.parameters["intervention"] == {"name": "zero"} and a.parameters["outcome"]["kind"] == "mean_logit"


# ---------------------------------------------------------------------------- adaptive ("fast")


def test_adaptive_stops_early_where_the_variance_is_zero():
    model, net, image, region, _, _ = _dice_setup()
    dark = PatchBank([random_image((1, 32, 32), 21, 0.0, 0.4)], size=200)  # every draw switches the region off
    kw = dict(intervention=dark, outcome="dice", block_shape=B, n_estimate=50)
    fast = RegionEffects(model, mode="fast", **kw).attribute(image, region)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    src = _src_cells(net, region)
    np.testing.assert_array_equal(fast.block_effects[src], -100.0)
    np.testing.assert_array_equal(exact.block_effects[src], -100.0)
    assert (fast.block_draws[src] == 10).all()  # min_draws: one round, variance 0
    assert (exact.block_draws[src] == 50).all()
    assert fast.forward_passes < exact.forward_passes
    assert fast.parameters["adaptive"] is True and exact.parameters["adaptive"] is False


def test_adaptive_stays_within_tolerance_of_exact():
    model, net = tap_model(2, B, TAPS_2D, gain=(2.0,))
    image = random_image((1, 32, 32), seed=22, low=0.3, high=1.5)
    region = region_for(2)
    bank = PatchBank(bank_sources(2), size=400)
    se_target = 0.01
    kw = dict(intervention=bank, outcome="mean_logit", block_shape=B, n_estimate=60, se_target=se_target)
    fast = RegionEffects(model, mode="fast", **kw).attribute(image, region)
    exact = RegionEffects(model, mode="exact", **kw).attribute(image, region)
    est = fast.block_status == NodeStatus.ESTIMATED
    np.testing.assert_array_equal(est, exact.block_status == NodeStatus.ESTIMATED)
    # every estimated block either reached its SE target or used every draw
    draws, se = fast.block_draws[est], fast.block_standard_error[est]
    assert ((se <= se_target) | (draws == 60)).all()
    assert (draws >= 10).all() and (draws <= 60).all() and (draws % 10 == 0).all()
    assert (draws < 60).any()  # the low-variance blocks stopped early
    tol = 4.5 * np.sqrt(fast.block_standard_error**2 + exact.block_standard_error**2)
    assert (np.abs(fast.block_effects - exact.block_effects)[est] <= tol[est] + 1e-6).all()
    coef = net.coefficients(region)
    crops = bank.bank((B, B)).double().flatten(1).mean(dim=1).numpy()
    expected = 2.0 * coef * (crops.mean() - block_means(image, B))
    assert (np.abs(fast.block_effects - expected)[est] <= 4.5 * fast.block_standard_error[est] + 1e-6).all()


def test_tap_model_sanity():
    """The synthetic model is what the closed forms assume (a check of the test helper)."""
    net = TapModel(2, 4, [((1, 0), 2.0)], bias=(0.5,), gain=(3.0,))
    x = torch.from_numpy(random_image((1, 1, 16, 16), seed=23))
    out = net(x)
    m = block_means(x[0].numpy(), 4)
    assert out.shape == (1, 1, 16, 16)
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.5 + 3.0 * 2.0 * m[1, 0], abs=1e-5)
    assert float(out[0, 0, 15, 15]) == pytest.approx(0.5, abs=1e-6)  # the tap is beyond the border


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("intervention", ["zero", "mean", "blur", "noise", "bank"])
def test_cuda_matches_cpu(intervention):
    model, _ = tap_model(2, B, TAPS_2D)
    image = random_image((1, 32, 32), seed=24)
    region = region_for(2)
    chosen = PatchBank(bank_sources(2), size=100) if intervention == "bank" else intervention
    kw = dict(intervention=chosen, outcome="mean_logit", block_shape=B, n_estimate=10, mode="published")
    cpu = RegionEffects(model, device="cpu", **kw).attribute(image, region)
    gpu = RegionEffects(model, device="cuda", **kw).attribute(image, region)
    model.to("cpu")
    np.testing.assert_allclose(gpu.block_effects, cpu.block_effects, atol=1e-4)
