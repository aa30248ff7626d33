"""Baseline methods (Seg-Grad-CAM, integrated gradients, gradient x input, occlusion, RISE)
on synthetic models whose supporting blocks are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import block_means, random_image, tap_model, torch_threads, wrap
from torch import nn

from napari_pdcr import (
    AttributionMap,
    Cancelled,
    Explanation,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    Rise,
    SegGradCam,
)
from napari_pdcr.methods.attribution import baseline_image
from napari_pdcr.methods.region_score import RegionScore
from napari_pdcr.metrics import support_map
from napari_pdcr.regions import BlockGrid, box_region

BLOCK = 4
#: (offset in blocks, weight): the region's score reads these blocks, nothing else
TAPS = [((0, 2), 5.0), ((2, 0), 4.0), ((-2, 0), 3.0), ((0, -2), 2.0), ((2, 2), 1.0)]
TAPS_3D = [((0, 0, 2), 3.0), ((2, 0, 0), 2.0), ((0, -2, 0), 1.0)]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def synthetic():
    model, net = tap_model(2, BLOCK, TAPS, activation="sigmoid", bias=(-3.0,))
    image = random_image((1, 32, 32), seed=1, low=0.2, high=1.0)
    region = box_region((32, 32), (12, 12), BLOCK)
    return model, net, image, region


def known_blocks(net, region, image) -> list[int]:
    """The blocks the region reads, strongest support (coefficient x block mean) first."""
    truth = net.coefficients(region) * block_means(image, BLOCK)
    return [int(b) for b in np.argsort(-truth.ravel())[: len(TAPS)]]


def top_blocks(explanation, spatial, k) -> list[int]:
    grid = BlockGrid.create(spatial, BLOCK)
    return [int(b) for b in np.argsort(-grid.mean_per_block(support_map(explanation)).ravel(), kind="stable")[:k]]


EXACT_METHODS = [
    (IntegratedGradients, {}),
    (GradientXInput, {}),
    (Occlusion, {"outcome": "mean_probability", "block_shape": BLOCK, "tau": 0.0}),
]


@pytest.mark.parametrize(("method", "options"), EXACT_METHODS)
def test_each_method_ranks_the_known_blocks_first(synthetic, method, options):
    model, net, image, region = synthetic
    explanation = method(model, device="cpu", **options).attribute(image, region)
    assert isinstance(explanation, AttributionMap)
    assert explanation.attribution.shape == region.shape and explanation.attribution.dtype == np.float32
    # a linear score: gradients and zero-baseline occlusion rank the read blocks exactly, in order
    assert top_blocks(explanation, region.shape, len(TAPS)) == known_blocks(net, region, image)


def test_rise_ranks_the_known_blocks_first_within_its_noise(synthetic):
    model, net, image, region = synthetic
    # weighted by the region logit: the probability of this model saturates near 1
    rise = Rise(model, n_masks=800, cell_size=BLOCK, outcome="mean_logit", device="cpu", batch_size=64)
    explanation = rise.attribute(image, region)
    expected = set(known_blocks(net, region, image)[:3])  # the three strongest taps (weights 5, 4, 3)
    assert expected <= set(top_blocks(explanation, region.shape, 6))
    assert explanation.forward_passes == 800


def test_rise_does_not_depend_on_the_batch_size(synthetic):
    model, _, image, region = synthetic
    a = Rise(model, n_masks=40, cell_size=8, device="cpu", batch_size=7).attribute(image, region)
    b = Rise(model, n_masks=40, cell_size=8, device="cpu", batch_size=40).attribute(image, region)
    np.testing.assert_allclose(a.attribution, b.attribution, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur"])
def test_integrated_gradients_is_complete_for_each_baseline(synthetic, baseline):
    model, _, image, region = synthetic
    explanation = IntegratedGradients(model, baseline=baseline, n_steps=64, device="cpu").attribute(image, region)
    score = RegionScore(model, region)
    x = torch.from_numpy(image)
    with torch.no_grad():
        expected = float(score(x[None]) - score(baseline_image(x, baseline)[None]))
    assert explanation.attribution.sum() == pytest.approx(expected, rel=1e-3, abs=1e-3)


class PatternNet(nn.Module):
    """``features``: the image at half resolution (average pooling, 1x1 convolution with weight 1);
    the head adds a positive weighted sum of the features to every voxel."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 1, 1, bias=False))
        with torch.no_grad():
            self.features[1].weight.fill_(1.0)

    def forward(self, x):
        f = self.features(x)
        total = (f * torch.linspace(0.5, 1.5, f.shape[-1])).flatten(1).sum(dim=1)
        return total.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]) - 20.0


def test_seg_grad_cam_shows_the_pattern_the_chosen_layer_carries():
    image = np.zeros((1, 32, 32), np.float32)
    image[0, 4:12, 18:30] = 1.0  # the known pattern
    model = wrap(PatternNet(), 2, activation="sigmoid", divisible_by=2)
    region = box_region((32, 32), (20, 4), 4)
    explanation = SegGradCam(model, layer="features", device="cpu").attribute(image, region)
    cam = explanation.attribution
    assert cam.shape == (32, 32)
    assert np.corrcoef(cam.ravel(), image[0].ravel())[0, 1] > 0.9
    assert image[0][np.unravel_index(np.argmax(cam), cam.shape)] == 1.0
    assert explanation.parameters["layer_used"] == "features"


def test_seg_grad_cam_defaults_to_the_bottleneck_and_rejects_unknown_layers():
    from monai.networks.nets import UNet

    unet = UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    model = wrap(unet, 2, activation="sigmoid", divisible_by=4)
    image = random_image((1, 32, 32), seed=2)
    method = SegGradCam(model, relu=False, device="cpu")
    explanation = method.attribute(image, box_region((32, 32), (8, 8), 6))
    assert explanation.parameters["layer_used"].startswith("bottleneck")
    assert explanation.attribution.shape == (32, 32) and np.abs(explanation.attribution).max() > 0
    with pytest.raises(ValueError, match="no component 'nowhere'"):
        SegGradCam(model, layer="nowhere")


def test_occlusion_in_exact_mode_is_the_published_map(synthetic):
    model, _, image, region = synthetic
    maps = [Occlusion(model, block_shape=BLOCK, tau=0.0, mode=mode, device="cpu").attribute(image, region)
            for mode in ("published", "exact")]
    np.testing.assert_allclose(maps[1].attribution, maps[0].attribution, atol=1e-5)
    assert maps[1].parameters["mode"] == "exact"
    with pytest.raises(ValueError, match="occlusion's mode must be one of published, exact"):
        Occlusion(model, mode="fast")


def test_bad_settings_get_clear_errors(synthetic):
    model = synthetic[0]
    with pytest.raises(ValueError, match="baseline must be one of zero, mean, blur"):
        IntegratedGradients(model, baseline="noise")
    with pytest.raises(ValueError, match="keep_probability"):
        Rise(model, keep_probability=1.0)
    with pytest.raises(ValueError, match="fill must be one of"):
        Occlusion(model, fill="patch")
    with pytest.raises(ValueError, match="target region has shape"):
        GradientXInput(model, device="cpu").attribute(synthetic[2], np.ones((8, 8), bool))


def test_a_run_can_be_cancelled(synthetic):
    model, _, image, region = synthetic
    with pytest.raises(Cancelled):
        Rise(model, n_masks=64, batch_size=8, device="cpu").attribute(image, region, progress=lambda p: False)


def test_attribution_maps_save_and_load(synthetic, tmp_path):
    model, _, image, region = synthetic
    explanation = GradientXInput(model, device="cpu").attribute(image, region, reference=region)
    loaded = Explanation.load(explanation.save(tmp_path / "map.zarr"))
    assert isinstance(loaded, AttributionMap)
    np.testing.assert_array_equal(loaded.attribution, explanation.attribution)
    np.testing.assert_array_equal(loaded.reference, region)
    assert (loaded.method, loaded.sign, loaded.base_score) == ("gradient_x_input", "positive_supports",
                                                                 explanation.base_score)


@pytest.mark.parametrize(("method", "options"), [
    (SegGradCam, {}),  # on a small 3D U-Net: the tap model has no layers
    (IntegratedGradients, {"n_steps": 8}),
    (GradientXInput, {}),
    (Occlusion, {"outcome": "mean_probability", "block_shape": BLOCK, "tau": 0.0}),
    (Rise, {"n_masks": 64, "cell_size": BLOCK}),
])
def test_each_method_works_in_3d(method, options):
    image = random_image((1, 16, 16, 16), seed=3, low=0.2, high=1.0)
    region = box_region((16, 16, 16), (4, 4, 4), BLOCK)
    if method is SegGradCam:
        from monai.networks.nets import UNet

        model = wrap(UNet(3, 1, 1, channels=(4, 8), strides=(2,), num_res_units=0), 3, activation="sigmoid",
                     divisible_by=2)
        options = {}
    else:
        model, _ = tap_model(3, BLOCK, TAPS_3D, activation="sigmoid", bias=(-2.0,))
    explanation = method(model, device="cpu", **options).attribute(image, region)
    assert explanation.attribution.shape == (16, 16, 16)
    assert np.isfinite(explanation.attribution).all() and np.abs(explanation.attribution).max() > 0
