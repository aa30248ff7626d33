"""Deletion / insertion curves: the true map of a synthetic model is the most faithful; edge
cases get clear errors; compare_methods returns maps, curves and the table."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import block_means, random_image, tap_model, torch_threads

from napari_pdcr import Blur, Cancelled, Faithfulness, Zero, compare_methods
from napari_pdcr.metrics.faithfulness import NO_RANKING, RANDOM
from napari_pdcr.regions import BlockGrid, box_region

BLOCK = 4
TAPS = [((0, 2), 5.0), ((2, 0), 4.0), ((-2, 0), 3.0), ((0, -2), 2.0), ((2, 2), 1.0)]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def synthetic():
    # bias chosen so that the region's probability is not saturated: soft outcomes follow every block
    model, net = tap_model(2, BLOCK, TAPS, activation="sigmoid", bias=(-8.0,))
    image = random_image((1, 32, 32), seed=1, low=0.2, high=1.0)
    region = box_region((32, 32), (12, 12), BLOCK)
    grid = BlockGrid.create((32, 32), BLOCK)
    # zero fill removes block b's contribution coef(b) * m(b): the true supporting map
    truth = grid.to_voxels(net.coefficients(region) * block_means(image, BLOCK))
    return model, image, region, truth


def metric(model, **options):
    return Faithfulness(model, fills={"zero": Zero()}, block_shape=BLOCK, n_steps=None, device="cpu", **options)


def test_the_true_map_has_the_lowest_deletion_and_highest_insertion_curve(synthetic):
    model, image, region, truth = synthetic
    rng = np.random.default_rng(0)
    shuffled = {f"shuffled {i}": (rng.permuted(truth.ravel()).reshape(truth.shape), "positive_supports")
                for i in range(3)}
    curves = metric(model).evaluate(image, region, {"truth": (truth, "positive_supports"), **shuffled})
    soft = curves.outcomes.index("soft_dice")
    deletion, insertion = curves.curves["truth"][0, 0, soft], curves.curves["truth"][1, 0, soft]
    assert deletion[0] == pytest.approx(1.0) and insertion[-1] == pytest.approx(1.0)
    for name in [*shuffled, RANDOM]:
        other = curves.curves[name]
        # the true ranking is the lowest possible deletion curve at every step (and highest insertion)
        assert (deletion <= other[0, 0, soft] + 1e-9).all()
        assert (insertion >= other[1, 0, soft] - 1e-9).all()
        assert curves.beats("truth", name)[:, 0, soft].all()
    # the true map reaches the fully ablated outcome once its five blocks are gone
    assert deletion[len(TAPS)] == pytest.approx(deletion[-1])


def test_an_inverted_map_is_worse_than_random(synthetic):
    model, image, region, truth = synthetic
    curves = metric(model, n_random=5).evaluate(image, region, {"inverted": (truth, "negative_supports")})
    assert not curves.beats("inverted", RANDOM)[:, 0, 1].any()


def test_ablation_effects_rank_by_their_negative_sign(synthetic):
    model, image, region, truth = synthetic
    curves = metric(model).evaluate(image, region, {"ate": (-truth, "negative_supports"),
                                                    "truth": (truth, "positive_supports")})
    np.testing.assert_allclose(curves.curves["ate"], curves.curves["truth"])


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((0,)), "is empty"),
    (np.ones((32, 32)), "same value on every block"),
    (np.full((32, 32), np.nan), "NaN or infinite"),
    (np.ones((16, 16)), r"has shape \(16, 16\)"),
])
def test_bad_maps_get_clear_errors_before_any_forward_pass(synthetic, bad, message):
    model, image, region, _ = synthetic
    passes = []
    with pytest.raises(ValueError, match=message):
        metric(model).evaluate(image, region, {"bad": (bad, "positive_supports")}, progress=passes.append)
    assert passes == []


def test_a_map_without_its_sign_convention_is_refused(synthetic):
    model, image, region, truth = synthetic
    with pytest.raises(ValueError, match="needs its sign convention"):
        metric(model).evaluate(image, region, {"truth": (truth, None)})


def test_an_outcome_of_zero_cannot_be_deleted(synthetic):
    model, image, region, truth = synthetic
    silent, _ = tap_model(2, BLOCK, TAPS, activation="sigmoid", bias=(-100.0,))
    with pytest.raises(ValueError, match="outcome in the target region is 0"):
        metric(silent).evaluate(image, region, {"truth": (truth, "positive_supports")}, reference=region)


def test_curves_do_not_depend_on_the_batch_size_and_can_be_cancelled(synthetic):
    model, image, region, truth = synthetic
    maps = {"truth": (truth, "positive_supports")}
    a = metric(model, batch_size=3).evaluate(image, region, maps)
    b = metric(model, batch_size=64).evaluate(image, region, maps)
    np.testing.assert_allclose(a.curves["truth"], b.curves["truth"])
    np.testing.assert_allclose(a.curves[RANDOM], b.curves[RANDOM])
    with pytest.raises(Cancelled):
        metric(model, batch_size=3).evaluate(image, region, maps, progress=lambda p: False)


def test_curves_in_3d_with_two_fills():
    model, _ = tap_model(3, BLOCK, [((0, 0, 2), 3.0), ((2, 0, 0), 2.0)], activation="sigmoid", bias=(-2.0,))
    image = random_image((1, 16, 16, 16), seed=4, low=0.2, high=1.0)
    region = box_region((16, 16, 16), (4, 4, 4), BLOCK)
    support = np.random.default_rng(1).random((16, 16, 16))
    bank = [random_image((1, 16, 16, 16), seed=5)]
    from napari_pdcr import PatchBank

    curves = Faithfulness(model, fills={"patch_bank": PatchBank(bank, size=50), "blur": Blur()}, block_shape=BLOCK,
                          n_steps=8, device="cpu").evaluate(image, region, {"map": (support, "positive_supports")})
    assert curves.curves["map"].shape == (2, 2, 2, 9)
    assert np.isfinite(curves.auc("map")).all()
    assert curves.fills == ("patch_bank", "blur")


def test_compare_methods_returns_maps_curves_and_the_table(synthetic):
    model, image, region, _ = synthetic
    bank = [random_image((1, 32, 32), seed=s) for s in (7, 8)]
    result = compare_methods(model, image, region, methods=["region_effects", "gradient_x_input", "rise"],
                             bank=bank, block_shape=BLOCK, n_steps=10, device="cpu")
    assert list(result.maps) == ["region_effects", "gradient_x_input", "rise"]
    assert [row["method"] for row in result.table] == [*result.maps, RANDOM]
    assert set(result.curves.fills) == {"patch_bank", "blur"}
    for row in result.table[:-1]:
        assert row["wall_s"] > 0 and row["forward_passes"] > 0
        assert 0 <= row["deletion auc (patch_bank, dice)"] <= 1.5
    for support in result.support_maps().values():
        assert support.shape == (32, 32) and np.abs(support).max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown method 'grad'"):
        compare_methods(model, image, region, methods=["grad"], bank=bank, device="cpu")


def test_a_constant_map_is_refused_by_default_or_scored_as_the_random_floor(synthetic):
    model, image, region, truth = synthetic
    maps = {"truth": (truth, "positive_supports"), "constant": (np.zeros((32, 32)), "positive_supports")}
    with pytest.raises(ValueError, match="constant_maps must be one of error, random"):
        metric(model, constant_maps="skip")
    with pytest.raises(ValueError, match="'constant' has the same value on every block"):
        metric(model).evaluate(image, region, maps)
    curves = metric(model, constant_maps="random").evaluate(image, region, maps)
    alone = metric(model, constant_maps="random").evaluate(image, region, {"truth": maps["truth"]})
    assert curves.unranked == {"constant": NO_RANKING} and alone.unranked == {}
    np.testing.assert_array_equal(curves.curves["constant"], curves.curves[RANDOM])
    np.testing.assert_array_equal(curves.curves["truth"], alone.curves["truth"])
    assert curves.forward_passes == alone.forward_passes  # a map without a ranking costs no forward pass
    assert not curves.beats("constant", RANDOM).any()
    rows = {row["method"]: row for row in curves.table()}
    assert (rows["constant"]["ranked"], rows["constant"]["note"]) == (False, NO_RANKING)
    assert rows["truth"]["ranked"] and rows["truth"]["note"] == ""


def test_compare_methods_runs_through_maps_that_rank_nothing(caplog):
    # the region reads only its own block: nothing outside it has an effect, every map is 0 there
    model, _ = tap_model(2, BLOCK, [((0, 0), 5.0)], activation="sigmoid")
    image = random_image((1, 32, 32), seed=1, low=0.2, high=1.0)
    region = box_region((32, 32), (12, 12), BLOCK)
    bank = [random_image((1, 32, 32), seed=s) for s in (7, 8)]
    with caplog.at_level("INFO", logger="napari_pdcr.studies.methods"):
        result = compare_methods(model, image, region, methods=["region_effects", "gradient_x_input"], bank=bank,
                                 block_shape=BLOCK, n_steps=5, device="cpu")
    outside = ~BlockGrid.create((32, 32), BLOCK).to_voxels(
        BlockGrid.create((32, 32), BLOCK).any_per_block(region)).astype(bool)
    assert np.all(result.maps["region_effects"].ate[outside] == 0)
    assert set(result.curves.unranked) == {"region_effects", "gradient_x_input"}
    assert [row["ranked"] for row in result.table] == [False, False, True]
    assert "region_effects has the same value on every block" in caplog.text
