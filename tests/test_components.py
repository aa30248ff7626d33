"""Component effects: enumeration, interventions through forward hooks, the shared estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from synthetic import LocalConv, random_image, wrap
from torch import nn

from napari_pdcr import (
    Cancelled,
    ComponentEffects,
    ComponentExplanation,
    Explanation,
    NodeStatus,
    RegionEffects,
    RegionExplanation,
    box_region,
)
from napari_pdcr.components import (
    Component,
    ComponentNodes,
    NotAModuleError,
    enumerate_components,
    format_components,
)
from napari_pdcr.io.results import load_explanation, save_explanation
from napari_pdcr.outcomes import Outcome

SHAPE = (24, 24)
REGION = box_region(SHAPE, (8, 8), 8)


class SignalNet(nn.Module):
    """``logit = 10 * mean_c(signal(x) + idle(x) + weak(x)) - 5``.

    ``signal`` copies the image into 4 channels (it carries the whole signal), ``idle``
    always outputs zeros (no effect under any intervention), ``weak`` adds 1e-4 x the
    image (a negligible effect). There is no other module, so these are the stages.
    """

    def __init__(self):
        super().__init__()
        self.signal, self.idle, self.weak = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1)
        with torch.no_grad():
            for conv, gain in ((self.signal, 1.0), (self.idle, 0.0), (self.weak, 1e-4)):
                conv.weight.fill_(gain)
                conv.bias.zero_()

    def forward(self, x):
        return 10 * (self.signal(x) + self.idle(x) + self.weak(x)).mean(dim=1, keepdim=True) - 5


def signal_model():
    return wrap(SignalNet(), 2, activation="sigmoid", name="signal")


def bank(n=6, seed=10):
    return np.stack([random_image((1, *SHAPE), seed=seed + i) for i in range(n)])


IMAGE = random_image((1, *SHAPE), seed=1)


@pytest.mark.parametrize("intervention", ["zero", "resample", "mean", "noise"])
def test_the_component_that_carries_the_signal_has_the_largest_effect(intervention):
    method = ComponentEffects(signal_model(), intervention=intervention, outcome="mean_logit", n_estimate=20)
    result = method.attribute(IMAGE, REGION, bank_images=bank())
    assert result.names == ["signal (full res)", "idle (full res)", "weak (full res)"]
    effect = dict(zip([c.path for c in result.components], result.raw_mean, strict=True))
    assert effect["idle"] == 0.0  # exactly: idle's output is zero whatever replaces it
    assert abs(effect["weak"]) < 1e-3
    assert abs(effect["signal"]) > 0.5
    assert result.table()[0]["path"] == "signal"
    if intervention == "zero":
        # closed form: removing the signal lowers the mean logit by 10 * mean(x in region)
        expected = -10 * IMAGE[0][REGION].mean()
        assert result.ate[0] == pytest.approx(expected, rel=1e-5)
        assert result.n_draws[0] == 1  # deterministic: one exact draw
    assert result.status[1] in (NodeStatus.SCREENED_OUT, NodeStatus.BELOW_TAU)


def test_dice_outcome_and_ablation_of_the_signal():
    result = ComponentEffects(signal_model(), intervention="zero").attribute(IMAGE, REGION)
    assert result.base_outcome == 100.0  # the model's own prediction is the reference
    assert result.ate[0] == -100.0  # without the signal nothing is predicted
    assert list(result.ate[1:]) == [0.0, 0.0]


def test_resample_is_reproducible_with_a_seed():
    model = wrap(LocalConv(layers=3, width=4, seed=3), 2, activation="none")
    kwargs = dict(intervention="resample", outcome="mean_logit", n_estimate=8, n_screen=0)
    first = ComponentEffects(model, seed=7, **kwargs).attribute(IMAGE, REGION, bank_images=bank())
    again = ComponentEffects(model, seed=7, batch_size=3, **kwargs).attribute(IMAGE, REGION, bank_images=bank())
    other = ComponentEffects(model, seed=8, **kwargs).attribute(IMAGE, REGION, bank_images=bank())
    np.testing.assert_allclose(first.raw_mean, again.raw_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first.standard_error, again.standard_error, rtol=1e-5, atol=1e-7)
    assert not np.allclose(first.raw_mean, other.raw_mean)
    assert (first.standard_error > 0).all()  # the draws differ: resampling is stochastic


def test_resample_draws_the_components_own_activation_on_bank_images():
    model = wrap(LocalConv(layers=3, width=4, seed=3), 2, activation="none")
    components = enumerate_components(model, "stages", example=torch.from_numpy(IMAGE))
    images = bank(3)
    nodes = ComponentNodes(model, torch.from_numpy(IMAGE), components, REGION, Outcome("mean_logit"),
                           ComponentEffects(model).intervention, bank=torch.from_numpy(images))
    with torch.inference_mode():
        first_layer = model.network.net[0](torch.from_numpy(images))
    torch.testing.assert_close(nodes.bank_activations[0], first_layer)
    draws = nodes.sample(0, 5, np.random.default_rng(0))
    assert all(any(torch.equal(d, a) for a in first_layer) for d in draws)


@pytest.mark.parametrize("intervention", ["zero", "noise"])
def test_channels_in_one_batch_equal_one_at_a_time(intervention):
    model = wrap(LocalConv(layers=3, width=6, seed=2), 2, activation="none")
    kwargs = dict(intervention=intervention, outcome="mean_logit", n_estimate=3, n_screen=0, seed=3)
    batched = ComponentEffects(model, granularity="channels", layer="net 2", batch_size=64, **kwargs)
    single = ComponentEffects(model, granularity="channels", layer="net 2", batch_size=1, **kwargs)
    a, b = batched.attribute(IMAGE, REGION), single.attribute(IMAGE, REGION)
    assert len(a.components) == 6 and a.components[0].kind == "channel"
    assert a.parameters["batch_size"] == 64
    np.testing.assert_allclose(a.raw_mean, b.raw_mean, rtol=1e-5, atol=1e-6)
    assert np.abs(a.raw_mean).max() > 1e-3
    if intervention == "zero":  # deterministic: also the same as a run on each channel alone
        for k, component in enumerate(a.components):
            alone = ComponentEffects(model, components=[component], **kwargs).attribute(IMAGE, REGION)
            assert alone.raw_mean[0] == pytest.approx(a.raw_mean[k], rel=1e-5, abs=1e-6)


def test_torchscript_models_get_a_clear_message_and_region_effects_still_work():
    scripted = torch.jit.script(SignalNet())
    model = wrap(scripted, 2, activation="sigmoid")
    assert not model.is_module
    with pytest.raises(NotAModuleError, match=r"nn\.Module.*region effects \(RegionEffects\) still work"):
        ComponentEffects(model)
    with pytest.raises(TypeError, match="TorchScript"):
        enumerate_components(model)
    region = RegionEffects(model, intervention="zero", block_shape=8, mode="published").attribute(IMAGE, REGION)
    assert region.block_effects.shape == (3, 3)


def test_monai_unet_components_have_readable_names_and_skip_parts():
    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    model = wrap(net, 2, activation="sigmoid", divisible_by=4)
    example = torch.from_numpy(IMAGE)
    stages = enumerate_components(model, "stages", example=example)
    assert [c.name for c in stages] == [
        "encoder 1 (1/2 res)", "encoder 2 (1/4 res)", "bottleneck (1/4 res)",
        "decoder 2 (to 1/2 res)", "decoder 1 (output, full res)",
    ]
    assert stages[0].shape == (4, 12, 12)
    skips = enumerate_components(model, "skips", example=example)
    assert [c.name for c in skips] == ["skip 1 (1/2 res)", "skip 2 (1/4 res)"]
    assert [c.shape for c in skips] == [(4, 12, 12), (8, 6, 6)]  # only the concatenated encoder output
    blocks = enumerate_components(model, "blocks")
    assert "decoder 2 (to 1/2 res) / 0" in [c.name for c in blocks]
    listing = format_components(stages + skips)
    assert "encoder 2 (1/4 res)" in listing and "model.1.submodule.0" in listing
    channels = enumerate_components(model, "channels", layer="encoder 2", example=example)
    assert [c.name for c in channels][:2] == ["encoder 2 (1/4 res) ch 0", "encoder 2 (1/4 res) ch 1"]

    # the skip carries exactly encoder k's output; replacing it leaves the deeper path alone
    nodes = ComponentNodes(model, example, stages + skips, REGION, Outcome("mean_logit"),
                           ComponentEffects(model, "zero").intervention)
    torch.testing.assert_close(nodes.activations[5], nodes.activations[0])
    result = ComponentEffects(model, "zero", outcome="mean_logit", granularity="skips").attribute(IMAGE, REGION)
    assert np.all(np.isfinite(result.raw_mean)) and len(result.ate) == 2
    assert not net.model[0]._forward_hooks  # hooks are removed after the run


def test_explicit_components_by_path_and_unknown_names():
    model = signal_model()
    result = ComponentEffects(model, "zero", components=["weak", "signal"]).attribute(IMAGE, REGION)
    assert [c.path for c in result.components] == ["signal", "weak"]  # execution order
    with pytest.raises(KeyError, match="no component 'nothing'"):
        ComponentEffects(model, components=["nothing"]).attribute(IMAGE, REGION)
    with pytest.raises(ValueError, match="needs bank images"):
        ComponentEffects(model, "resample").attribute(IMAGE, REGION)
    with pytest.raises(ValueError, match="granularity"):
        ComponentEffects(model, granularity="layers")


def test_cancel_and_progress():
    model = signal_model()
    method = ComponentEffects(model, "noise", outcome="mean_logit", n_estimate=10, batch_size=2)
    seen = []
    with pytest.raises(Cancelled):
        method.attribute(IMAGE, REGION, progress=lambda p: seen.append(p.stage) or len(seen) < 3)
    assert seen[:2] == ["prepare", "screen"]
    assert not any(m._forward_hooks for m in model.network.modules())  # no hook left behind


def test_results_are_saved_with_a_region_explanation(tmp_path):
    model = signal_model()
    components = ComponentEffects(model, "zero").attribute(IMAGE, REGION)
    region = RegionEffects(model, intervention="zero", block_shape=8, mode="published").attribute(IMAGE, REGION)
    region.related["components"] = components
    save_explanation(region, tmp_path / "run.zarr")
    loaded = load_explanation(tmp_path / "run.zarr").related["components"]
    assert isinstance(loaded, ComponentExplanation)
    assert loaded.names == components.names
    np.testing.assert_array_equal(loaded.ate, components.ate)
    np.testing.assert_array_equal(loaded.target_region, REGION)
    assert loaded.parameters["intervention"] == {"name": "zero"}
    assert loaded.components[0] == components.components[0]
    alone = ComponentExplanation.load(components.save(tmp_path / "components.zarr"))
    assert alone.table() == components.table()
    assert isinstance(Explanation.load(tmp_path / "components.zarr"), ComponentExplanation)  # any kind
    with pytest.raises(ValueError, match="'component_explanation' result, not 'region_explanation'"):
        RegionExplanation.load(tmp_path / "components.zarr")


def test_plot_is_sorted_with_error_bars():
    import matplotlib

    matplotlib.use("Agg")
    result = ComponentEffects(signal_model(), "noise", outcome="mean_logit", n_estimate=10).attribute(IMAGE, REGION)
    ax = result.plot()
    top = max(zip(ax.get_yticks(), ax.get_yticklabels(), strict=True), key=lambda pair: pair[0])[1]
    assert top.get_text() == "signal (full res)"  # the largest |ATE| is drawn at the top
    assert ax.containers  # bars and error bars


def test_component_dataclass_round_trip():
    c = Component("skip 1 (1/2 res)", "model.1", "skip", "SkipConnection", part="skip", depth=1, shape=(4, 12, 12))
    assert Component.from_record(c.describe()) == c


def test_transformer_layers_of_the_vit_demo_architecture_are_components():
    from napari_pdcr.models.vit import ViTSegNet

    torch.manual_seed(0)
    model = wrap(ViTSegNet(dim=16, depth=2, heads=2, mlp_dim=32, width=4).eval(), 2, divisible_by=16)
    image = random_image((1, 32, 32), seed=3)
    stages = enumerate_components(model, "stages", example=torch.from_numpy(image))
    assert [c.name for c in stages][:5] == [
        "stem (full res)", "patch embedding (1/16 res)", "position encoding (1/16 res)", "transformer 0", "transformer 1",
    ]
    assert stages[3].shape == (4, 16)  # (tokens, dim): its "channels" are the 4 patch tokens
    region = box_region((32, 32), (8, 8), 8)
    result = ComponentEffects(model, "zero", outcome="mean_logit", granularity="channels",
                              layer="transformer 1").attribute(image, region)
    assert len(result.components) == 4 and np.isfinite(result.raw_mean).all()
