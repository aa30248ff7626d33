"""Parameters and inputs are checked where they enter, in the user's words, before any forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import TapModel, random_image, tap_model, torch_threads, wrap

from napari_pdcr import ComponentEffects, Outcome, PatchBank, RegionEffects, box_region
from napari_pdcr.engine.estimator import EstimatorSettings
from napari_pdcr.interventions import make_intervention
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.models.loading import load_model
from napari_pdcr.regions import BlockGrid, validate_reference
from napari_pdcr.validation import (
    finite_float,
    non_negative_int,
    optional_positive_int,
    positive_float,
    positive_int,
    value_range,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


B = 4
TAPS = [((0, 0), 1.0), ((1, -1), 0.5)]
REGION = box_region((32, 32), (12, 12), 8)


class CountingTapModel(TapModel):
    """A :class:`TapModel` that counts its forward passes."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def counting_model(channels: int = 1, **kwargs):
    """A 2D tap model with ``channels`` outputs and its network, which counts forward passes."""
    return tap_model(2, B, TAPS, bias=(0.0,) * channels, gain=(1.0,) * channels, cls=CountingTapModel, **kwargs)


def image():
    return random_image((1, 32, 32), seed=3)


def method(model=None, **kwargs):
    kwargs = {"intervention": "zero", "outcome": "mean_logit", "block_shape": B, **kwargs}
    return RegionEffects(model or counting_model()[0], **kwargs)


def fails_before_any_forward_pass(error, message, attribute_args=(), **kwargs):
    """Build the method and run it; the error must come with the model never run."""
    model, net = counting_model()
    with pytest.raises(error, match=message):
        method(model, **kwargs).attribute(*attribute_args)
    assert net.calls == 0


# ---------------------------------------------------------------------- shared checks
def test_integers_accept_numpy_integers_and_reject_bools_floats_and_strings():
    assert positive_int("n", np.int64(3)) == 3 and type(positive_int("n", np.int64(3))) is int
    assert non_negative_int("seed", 0) == 0
    with pytest.raises(ValueError, match=r"^n must be a positive integer; got 3\.0$"):
        positive_int("n", 3.0)
    with pytest.raises(ValueError, match=r"^n must be a positive integer; got True$"):
        positive_int("n", True)
    with pytest.raises(TypeError, match=r"^n must be a positive integer; got '3'$"):
        positive_int("n", "3")
    with pytest.raises(ValueError, match=r"^seed must be a non-negative integer; got -1$"):
        non_negative_int("seed", -1)


def test_finite_floats_and_ranges():
    assert finite_float("tau", np.float32(0.5), minimum=0) == 0.5
    assert finite_float("tau", 0, minimum=0) == 0.0
    with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0; got 0$"):
        finite_float("sigma", 0, minimum=0, strict=True)
    with pytest.raises(ValueError, match=r"^x must be a finite number; got inf$"):
        finite_float("x", float("inf"))
    assert positive_float("mb", 0.5) == 0.5 and optional_positive_int("batch_size", None) is None
    with pytest.raises(ValueError, match=r"^mb must be a finite number > 0; got -2$"):
        positive_float("mb", -2)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer; got 0$"):
        optional_positive_int("batch_size", 0)
    assert value_range("input_range", [0, 1]) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"input_range must be two finite numbers \(low, high\) with low < high; got \[1, 0\]"):
        value_range("input_range", [1, 0])
    with pytest.raises(TypeError, match="input_range must be two finite numbers"):
        value_range("input_range", 1.0)


# ---------------------------------------------------------------------- method parameters
def tiny_network_model():
    return wrap(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), r"^seed must be a non-negative integer; got -1$"),
        (dict(n_estimate=2.5), r"^n_estimate must be a positive integer; got 2\.5$"),
        (dict(n_estimate=3.0), r"^n_estimate must be a positive integer; got 3\.0$"),
        (dict(n_screen=True), r"^n_screen must be a non-negative integer; got True$"),
        (dict(tau=float("nan")), r"^tau must be a finite number >= 0; got nan$"),
        (dict(batch_size=0), r"^batch_size must be a positive integer; got 0$"),
        (dict(memory_budget_mb=0), r"^memory_budget_mb must be a finite number > 0; got 0$"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_parameters_of_both_methods_fail_at_construction(kwargs, message):
    model, net = counting_model()
    with pytest.raises(ValueError, match=message):
        method(model, **kwargs)
    with pytest.raises(ValueError, match=message):
        ComponentEffects(tiny_network_model(), **kwargs)
    assert net.calls == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(se_target=-1.0), r"^se_target must be a finite number >= 0; got -1\.0$"),
        (dict(block_shape=2.5), r"^block_shape must be a positive integer or 2 of them \(one per spatial axis\); got 2\.5$"),
        (dict(block_shape=(4, 4, 4)), r"^block_shape must be a positive integer or 2 of them .*; got \(4, 4, 4\)$"),
        (dict(mode="turbo"), r"^mode must be one of published, exact, fast, sequential; got 'turbo'$"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_region_effects_parameters_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        method(**kwargs)


def test_valid_edge_values_still_run():
    settings = EstimatorSettings(n_screen=0, n_estimate=np.int64(1), tau=0, seed=np.uint8(0), se_target=0)
    assert (settings.n_screen, settings.n_estimate, settings.tau, settings.seed) == (0, 1, 0.0, 0)
    assert type(settings.n_estimate) is int
    ex = method(n_screen=0, n_estimate=np.int32(1), tau=0.0, seed=0, block_shape=(32, 4)).attribute(image(), REGION)
    assert ex.block_effects.shape == (1, 8) and ex.parameters["n_estimate"] == 1


def test_estimator_settings_validate_their_own_fields():
    with pytest.raises(ValueError, match=r"^min_draws must be a positive integer; got 0$"):
        EstimatorSettings(min_draws=0)
    with pytest.raises(ValueError, match=r"^round_size must be a positive integer; got 1\.5$"):
        EstimatorSettings(round_size=1.5)


def test_outcome_and_intervention_parameters():
    with pytest.raises(ValueError, match=r"^channel must be a non-negative integer; got -1$"):
        Outcome("dice", channel=-1)
    with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0; got nan$"):
        Outcome("soft_dice", temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^threshold must be a probability between 0 and 1 \(exclusive\); got 1\.5$"):
        Outcome("dice", threshold=1.5)
    assert Outcome("dice", channel=np.int64(1)).describe()["channel"] == 1
    with pytest.raises(ValueError, match=r"^constant value must be a finite number; got nan$"):
        make_intervention("constant", value=float("nan"))
    with pytest.raises(ValueError, match=r"^blur sigma must be a finite number > 0; got 0$"):
        make_intervention("blur", sigma=0)
    with pytest.raises(ValueError, match=r"^noise std must be a finite number >= 0; got -1$"):
        make_intervention("noise", std=-1)
    with pytest.raises(TypeError, match=r"^outcome must be an Outcome or one of dice, soft_dice"):
        method(outcome=3)


# ---------------------------------------------------------------------- patch bank
def test_patch_bank_size_and_seed():
    sources = [random_image((1, 16, 16), seed=1)]
    with pytest.raises(ValueError, match=r"^patch bank size must be a positive integer; got 0$"):
        PatchBank(sources, size=0)
    with pytest.raises(ValueError, match=r"^patch bank seed must be a non-negative integer; got -1$"):
        PatchBank(sources, seed=-1)
    assert PatchBank(sources, size=1).bank((4, 4)).shape == (1, 1, 4, 4)


def test_patch_bank_source_without_a_channel_axis():
    with pytest.raises(
        ValueError,
        match=r"^patch-bank source 0 has shape \(217, 181\) but a 2D model needs \(C, H, W\) arrays: "
        r"add a channel axis \(source\[None\]\)$",
    ):
        PatchBank([np.zeros((217, 181), np.float32)])
    with pytest.raises(ValueError, match=r"add a channel axis \(sources\[:, None\] for a stack of slices\)"):
        PatchBank(np.zeros((3, 217, 181), np.float32))
    with pytest.raises(ValueError, match=r"^the patch-bank sources are one array of shape \(217, 181\)"):
        PatchBank(np.zeros((217, 181), np.float32))
    assert len(PatchBank(np.zeros((3, 217, 181), np.float32)[:, None]).sources) == 3


def test_patch_bank_that_cannot_serve_the_run_fails_before_any_forward_pass():
    small = PatchBank([random_image((1, 3, 3), seed=1)], size=10)
    fails_before_any_forward_pass(
        ValueError, r"no patch-bank source is large enough for blocks of shape \(4, 4\) \(the largest is \(3, 3\)\)",
        (image(), REGION), intervention=small,
    )
    three_channels = PatchBank([random_image((3, 16, 16), seed=1)], size=10)
    fails_before_any_forward_pass(ValueError, "model's input space", (image(), REGION), intervention=three_channels)


# ---------------------------------------------------------------------- inputs of a run
@pytest.mark.parametrize(
    "reference, message",
    [
        (np.repeat(np.arange(3), 32 * 32 // 3 + 1)[: 32 * 32].reshape(32, 32),
         r"^the reference mask has 3 distinct values \(0, 1, 2\): pass a binary mask, or choose a label "
         r"\(reference == label\)$"),
        (np.full((32, 32), 0.2),
         r"^the reference mask holds probabilities \(values between 0 and 1\): threshold it first "
         r"\(e\.g\. reference > 0\.5\)$"),
        (np.full((32, 32), 2.5), r"^the reference mask holds fractional values"),
        (np.ones((32, 32), np.uint8) + np.eye(32, dtype=np.uint8), r"has 2 distinct values \(1, 2\)"),
    ],
    ids=["labels", "probabilities", "fractional", "two-labels-no-background"],
)
def test_non_binary_reference_masks(reference, message):
    fails_before_any_forward_pass(ValueError, message, (image(), REGION, reference), outcome="dice")
    with pytest.raises(ValueError, match=message):
        ComponentEffects(tiny_network_model()).attribute(image(), REGION, reference)


def test_binary_reference_masks_of_any_dtype():
    for reference in (REGION, REGION.astype(np.uint8) * 255, REGION.astype(np.float32), np.zeros((32, 32))):
        np.testing.assert_array_equal(validate_reference(reference, (32, 32)), REGION if reference.any() else False)
    ex = method(outcome="dice").attribute(image(), REGION, REGION.astype(np.uint8) * 255)
    assert ex.parameters["reference"] == "given"


def test_region_covering_every_block():
    fails_before_any_forward_pass(
        ValueError,
        r"^the target region covers every block of the image: nothing is left to intervene on; "
        r"choose a smaller region or smaller blocks$",
        (image(), box_region((32, 32), (2, 2), 28)),
    )


def test_block_larger_than_the_image():
    fails_before_any_forward_pass(
        ValueError,
        r"^block_shape \(40, 40\) is larger than the image \(32, 32\): choose blocks smaller than the image$",
        (image(), REGION), block_shape=40,
    )


def test_bad_spacing_fails_before_the_run():
    fails_before_any_forward_pass(
        ValueError, r"^spacing must be 2 finite numbers > 0 \(one per spatial axis\); got \(1\.0,\)$",
        (image(), REGION, None, (1.0,)),
    )
    assert method().attribute(image(), REGION, spacing=(0.5, 2)).spacing == (0.5, 2.0)


def test_a_3d_volume_for_a_2d_model_is_called_3d():
    volume = random_image((16, 32, 32), seed=4)
    fails_before_any_forward_pass(
        ValueError,
        r"^model 'tap' expects a 2D image shaped \(C, H, W\) with C=1, but the image is 3D "
        r"\(shape \(16, 32, 32\)\): give a 2D image, or choose a 3D model$",
        (volume, REGION),
    )
    # a few leading entries are still channels
    fails_before_any_forward_pass(
        ValueError, r"^model 'tap' expects 1 input channel\(s\); the image has 3 \(shape \(3, 32, 32\)\)",
        (random_image((3, 32, 32)), REGION),
    )
    fails_before_any_forward_pass(
        ValueError, r"has no channel axis \(shape \(32, 32\)\): add one \(image\[None\]\)$", (image()[0], REGION)
    )


# ---------------------------------------------------------------------- input range
def test_image_far_outside_the_models_input_range():
    model, net = counting_model()
    model.input_range = (0.0, 1.0)
    eight_bit = np.round(image() * 255).astype(np.uint8)
    eight_bit[0, 0, :2] = 0, 255
    with pytest.raises(
        ValueError,
        match=r"^the image's values run from 0 to 255 but model 'tap' takes inputs in \[0, 1\]: scale it \(image / 255\)$",
    ):
        method(model).attribute(eight_bit, REGION)
    bright = image()
    bright[0, 0, 0] = 3.0
    with pytest.raises(ValueError, match=r"^the image's values run from 0\.\d+ to 3 .*: scale it \(image / 3\)$"):
        model.prepare_image(bright)
    centred = image()
    centred[0, 0, :2] = -3, 1
    with pytest.raises(ValueError, match=r"run from -3 to 1 but model 'tap' takes inputs in \[0, 1\]: rescale it into \[0, 1\]$"):
        model.prepare_image(centred)
    assert net.calls == 0
    # mild overshoot (e.g. interpolation ringing) is accepted
    assert float(model.prepare_image(image() * 1.4).max()) > 1.3
    assert method(model).attribute(eight_bit / 255.0, REGION).block_effects.shape == (8, 8)


def test_input_range_comes_from_the_description_and_the_demo_models():
    assert load_demo_model("shallow2d").input_range == (0.0, 1.0)
    network = TapModel(2, B, TAPS)
    described = {"spatial_dims": 2, "in_channels": 1, "divisible_by": B, "activation": "none", "input_range": [0, 1]}
    model = load_model(network, description=described)
    assert model.input_range == (0.0, 1.0) and model.description.input_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="takes inputs in \\[0, 1\\]"):
        model.prepare_image(image() * 255)
    with pytest.raises(ValueError, match=r"^input_range must be two finite numbers \(low, high\) with low < high; got \[1, 1\]$"):
        ModelDescription(input_range=[1, 1])


# ---------------------------------------------------------------------- devices
def test_moving_a_model_to_a_missing_device():
    model, _ = counting_model()
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(RuntimeError, match=rf"^device '{missing}' is not available: .+; use device='cpu' or 'auto'"):
        model.to(missing)
    assert model.device == torch.device("cpu")
    assert model.to("auto") is model


# ---------------------------------------------------------------------- the explained channel
def described_two_channel_model(**description):
    """A 2-output model loaded with ``description`` (out_channels inferred), and its counting network."""
    network = CountingTapModel(2, B, TAPS, bias=(0.0, 0.0), gain=(1.0, -1.0))
    model = load_model(
        network, description={"spatial_dims": 2, "in_channels": 1, "divisible_by": B, "activation": "sigmoid", **description}
    )
    network.calls = 0
    return model, network


def test_the_descriptions_channel_reaches_the_default_outcome():
    model, _ = described_two_channel_model(channel=1, temperature=2.0)
    region_method = RegionEffects(model, "zero", block_shape=B)
    assert (region_method.outcome.kind, region_method.outcome.channel, region_method.outcome.temperature) == ("dice", 1, 2.0)
    assert RegionEffects(model, "zero", Outcome("soft_dice"), block_shape=B).outcome.channel == 1
    assert RegionEffects(model, "zero", Outcome("soft_dice", channel=0), block_shape=B).outcome.channel == 0
    assert ComponentEffects(model).outcome.channel == 1
    ex = region_method.attribute(image(), REGION)
    assert ex.parameters["outcome"]["channel"] == 1


def test_the_channel_is_checked_against_the_known_outputs_before_any_forward_pass():
    model, network = described_two_channel_model()
    with pytest.raises(ValueError, match=r"^the model outputs 2 channels: choose the channel to explain \(channel=\.\.\.\)$"):
        RegionEffects(model, "zero", block_shape=B)
    with pytest.raises(ValueError, match=r"^channel 2 does not exist: the model outputs 2 channel\(s\)$"):
        ComponentEffects(model, outcome=Outcome("dice", channel=2))
    assert network.calls == 0


def test_block_grid_uses_the_same_block_shape_check():
    with pytest.raises(ValueError, match=r"^block_shape must be a positive integer or 3 of them"):
        BlockGrid.create((8, 8, 8), (2, 2))
    assert BlockGrid.create((8, 8), np.int64(4)).block_shape == (4, 4)


def test_console_and_widget_inputs_refuse_a_multi_label_reference_without_a_label():
    from napari_pdcr.jobs import reference_mask

    labels = np.zeros((8, 8), np.uint8)
    labels[:4] = 1
    labels[4:6] = 2
    with pytest.raises(ValueError, match=r"^the reference mask has 3 distinct values \(0, 1, 2\): pass a binary mask"):
        reference_mask(labels)
    np.testing.assert_array_equal(reference_mask(labels, label=2), labels == 2)
    np.testing.assert_array_equal(reference_mask(labels > 0), labels > 0)
