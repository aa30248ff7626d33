"""MiSuRe-style minimal sufficient region on synthetic models whose region needs known blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from synthetic import random_image, tap_model, torch_threads

from napari_pdcr import AttributionMap, Cancelled, Explanation, MiSuRe, compare_methods
from napari_pdcr.regions import BlockGrid, box_region

BLOCK = 4
#: the region (one block at grid cell (3, 3)) reads two blocks with weight 3 and a decoy with weight 0.5; with
#: bias -4 on an image of ones the region is predicted (logit 2.5) only while both weight-3 blocks are kept
TAPS = [((0, 3), 3.0), ((3, 0), 3.0), ((-2, -2), 0.5)]
NEEDED_BLOCKS = [(3, 6), (6, 3)]
REGION_BLOCK = (3, 3)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def synthetic():
    model, _ = tap_model(2, BLOCK, TAPS, activation="sigmoid", bias=(-4.0,))
    image = np.ones((1, 32, 32), np.float32)
    region = box_region((32, 32), (12, 12), BLOCK)
    return model, image, region


def region_dice(model, image: np.ndarray, keep: np.ndarray, region: np.ndarray) -> float:
    """Dice (0-1) in ``region`` of the prediction on ``image * keep`` (zero fill) against the unperturbed one."""
    with torch.no_grad():
        base = model(torch.from_numpy(image)[None])[0, 0].numpy() > 0
        masked = model(torch.from_numpy(image * keep.astype(np.float32))[None])[0, 0].numpy() > 0
    a, b = base[region], masked[region]
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


def block_mean(mask: np.ndarray, cell) -> float:
    return float(mask[tuple(slice(c * BLOCK, (c + 1) * BLOCK) for c in cell)].mean())


def test_the_minimal_region_contains_the_blocks_the_region_needs(synthetic):
    model, image, region = synthetic
    explanation = MiSuRe(model, cell_size=BLOCK, device="cpu").attribute(image, region)
    assert isinstance(explanation, AttributionMap) and explanation.attribution.shape == region.shape
    sufficient = explanation.extras["sufficient_mask"].astype(bool)
    for cell in NEEDED_BLOCKS:
        assert block_mean(sufficient, cell) > 0.9
    # the model does not read the region's own block: the minimal region leaves it out
    assert block_mean(sufficient, REGION_BLOCK) == 0
    # smaller than the dilated mask, and still sufficient (checked with the model itself)
    assert sufficient.sum() < 0.6 * explanation.extras["dilated_mask"].sum()
    assert region_dice(model, image, sufficient, region) >= 0.9
    # the map ranks the needed blocks first
    means = BlockGrid.create(region.shape, BLOCK).mean_per_block(explanation.attribution)
    top = {np.unravel_index(i, means.shape) for i in np.argsort(-means.ravel())[:2]}
    assert top == set(NEEDED_BLOCKS)


def test_the_dilation_stops_at_the_first_radius_that_passes(synthetic):
    model, image, region = synthetic
    method = MiSuRe(model, cell_size=BLOCK, dilation_step=1, n_iterations=2, device="cpu")
    explanation = method.attribute(image, region)
    radius = method.stages["radius"]
    distance = ndimage.distance_transform_edt(~region)
    np.testing.assert_array_equal(explanation.extras["dilated_mask"].astype(bool), distance <= radius)
    assert region_dice(model, image, distance <= radius, region) >= 0.9
    assert region_dice(model, image, distance <= radius - 1, region) < 0.9
    assert f"radius {radius}" in explanation.log[0]


def test_a_lower_threshold_stops_the_dilation_no_later(synthetic):
    model, _, region = synthetic
    image = random_image((1, 32, 32), seed=4, low=0.5, high=1.5)
    radii = [MiSuRe(model, dice_threshold=t, cell_size=BLOCK, n_iterations=1, device="cpu") for t in (0.5, 1.0)]
    for method in radii:
        method.attribute(image, region)
    assert radii[0].stages["radius"] <= radii[1].stages["radius"]


@pytest.mark.parametrize(("options", "message"), [
    ({"dice_threshold": 90}, "give 0.9 rather than 90"),
    ({"dice_threshold": 0}, "dice_threshold must be a finite number > 0"),
    ({"dice_threshold": float("nan")}, "dice_threshold must be a finite number"),
    ({"fill": "patches"}, "fill must be one of zero, mean, blur"),
    ({"dilation_step": 0}, "dilation_step must be a positive integer"),
    ({"cell_size": 2.5}, "cell_size must be a positive integer"),
    ({"n_iterations": 0}, "n_iterations must be a positive integer"),
    ({"learning_rate": -0.1}, "learning_rate must be a finite number > 0"),
    ({"l1_weight": -1}, "l1_weight must be a finite number >= 0"),
    ({"outcome": "mean_logit"}, "MiSuRe's sufficiency is a Dice"),
])
def test_bad_parameters_get_clear_errors(synthetic, options, message):
    with pytest.raises(ValueError, match=message):
        MiSuRe(synthetic[0], **options)


def test_a_region_of_the_wrong_shape_is_refused_before_any_forward_pass(synthetic):
    model, image, _ = synthetic
    with pytest.raises(ValueError, match="target region has shape"):
        MiSuRe(model, device="cpu").attribute(image, np.ones((8, 8), bool))


def test_a_run_can_be_cancelled_and_a_result_saved_with_its_masks(synthetic, tmp_path):
    model, image, region = synthetic
    with pytest.raises(Cancelled):
        MiSuRe(model, cell_size=BLOCK, device="cpu").attribute(image, region, progress=lambda p: False)
    explanation = MiSuRe(model, cell_size=BLOCK, n_iterations=5, device="cpu").attribute(image, region)
    loaded = Explanation.load(explanation.save(tmp_path / "misure.zarr"))
    np.testing.assert_array_equal(loaded.extras["sufficient_mask"], explanation.extras["sufficient_mask"])
    assert loaded.method == "misure" and loaded.sign == "positive_supports"


def test_misure_in_3d():
    taps = [((0, 0, 3), 3.0), ((3, 0, 0), 3.0)]
    model, _ = tap_model(3, BLOCK, taps, activation="sigmoid", bias=(-4.0,))
    image = np.ones((1, 16, 16, 28), np.float32)
    region = box_region(image.shape[1:], (0, 4, 4), BLOCK)
    explanation = MiSuRe(model, cell_size=BLOCK, n_iterations=60, device="cpu").attribute(image, region)
    sufficient = explanation.extras["sufficient_mask"].astype(bool)
    assert explanation.attribution.shape == image.shape[1:]
    assert region_dice(model, image, sufficient, region) >= 0.9
    for cell in [(0, 1, 4), (3, 1, 1)]:  # the two blocks the region reads
        assert sufficient[tuple(slice(c * BLOCK, (c + 1) * BLOCK) for c in cell)].mean() > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_misure_on_cuda_matches_the_cpu(synthetic):
    model, image, region = synthetic
    on_cpu = MiSuRe(model, cell_size=BLOCK, n_iterations=20, device="cpu").attribute(image, region)
    on_cuda = MiSuRe(model, cell_size=BLOCK, n_iterations=20, device="cuda").attribute(image, region)
    np.testing.assert_allclose(on_cuda.attribution, on_cpu.attribution, atol=1e-3)


def test_compare_methods_offers_misure_by_name(synthetic):
    model, image, region = synthetic
    result = compare_methods(model, image, region, methods=["misure", "gradient_x_input"], block_shape=BLOCK,
                             bank=[random_image((1, 32, 32), seed=s) for s in range(2)], n_steps=4, device="cpu")
    assert isinstance(result.maps["misure"], AttributionMap)
    assert [row["method"] for row in result.table] == ["misure", "gradient_x_input", "random"]
