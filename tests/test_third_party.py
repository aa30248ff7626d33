"""Third-party MONAI networks as live modules: description probing, stages and skips found by
tracing, region and component effects, the description's channel, the cost estimate.

Tiny untrained instances (seeded), tiny images, big blocks, the zero intervention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("einops")  # MONAI's UNETR / SwinUNETR need it
from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, SegResNet, SwinUNETR  # noqa: E402

from napari_pdcr import ComponentEffects, RegionEffects, box_region  # noqa: E402
from napari_pdcr.components import ComponentNodes, ZeroActivation, enumerate_components  # noqa: E402
from napari_pdcr.methods.region_effects import CostEstimate  # noqa: E402
from napari_pdcr.models.loading import ModelLoadError, load_model  # noqa: E402
from napari_pdcr.outcomes import Outcome  # noqa: E402

SIZE = {2: 64, 3: 32}


def build(name: str, dims: int, out_channels: int = 2):
    """A tiny untrained network and the spatial size it runs on."""
    torch.manual_seed(0)
    size = (SIZE[dims],) * dims
    if name == "BasicUNet":
        net = BasicUNet(dims, 1, out_channels, features=(4, 4, 8, 8, 16, 4))
    elif name == "AttentionUnet":
        net = AttentionUnet(dims, 1, out_channels, channels=(4, 8, 16), strides=(2, 2))
    elif name == "SegResNet":
        net = SegResNet(dims, init_filters=8, in_channels=1, out_channels=out_channels, blocks_down=(1, 1, 1), blocks_up=(1, 1))
    elif name == "UNETR":
        net = UNETR(1, out_channels, size, feature_size=4, hidden_size=24, mlp_dim=24, num_heads=2, spatial_dims=dims)
    else:  # SwinUNETR: five halvings, and two positions at 1/32 res for its instance norm
        size = (64,) * dims
        net = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=12, depths=(1, 1, 1, 1),
                        num_heads=(1, 1, 1, 1), spatial_dims=dims)
    return net, size


#: (encoder, decoder) module paths of every skip, finest first: the architectures' own wiring
WIRING = {
    "BasicUNet": [("conv_0", "upcat_1"), ("down_1", "upcat_2"), ("down_2", "upcat_3"), ("down_3", "upcat_4")],
    "AttentionUnet": [("model.0", "model.1"), ("model.1.submodule.0", "model.1.submodule.1")],
    "SegResNet": [("down_layers.0", "up_layers.1"), ("down_layers.1", "up_layers.0")],
    "UNETR": [("encoder1", "decoder2"), ("encoder2", "decoder3"), ("encoder3", "decoder4"), ("encoder4", "decoder5")],
    "SwinUNETR": [("encoder1", "decoder1"), ("encoder2", "decoder2"), ("encoder3", "decoder3"),
                  ("encoder4", "decoder4"), ("swinViT", "decoder5")],
}
CASES = [(name, dims) for name in WIRING for dims in (2, 3)]


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_monai_network_loads_decomposes_and_is_explained(name, dims):
    net, size = build(name, dims)
    model = load_model(net, description={"spatial_dims": dims, "in_channels": 1})
    assert model.description.example_shape is not None
    image = np.random.default_rng(0).uniform(size=(1, *size)).astype(np.float32)
    if name == "UNETR":  # a fixed img_size: applied by sliding windows of that size, with a note
        assert model.sliding_window is not None and model.sliding_window.window_size(size) == size
        assert any("sliding_window" in note and "only" in note for note in model.description.inferred)

    skips = enumerate_components(model, "skips", example=image)  # in execution order
    skips = sorted(skips, key=lambda c: int(c.name.split()[1]))  # "skip k": finest first
    expected = WIRING[name]
    assert [c.path for c in skips] == [decoder for _, decoder in expected]
    assert all("-> " in c.name and c.part == "join" for c in skips)
    stages = enumerate_components(model, "stages", example=image)
    stage_paths = [c.path for c in stages]
    returns_a_list = {"swinViT"}  # its hidden states: no single tensor to intervene on, so no stage
    for encoder, decoder in expected:
        assert decoder in stage_paths and (encoder in stage_paths or encoder in returns_a_list)

    region = box_region(size, tuple(s // 4 for s in size), size[0] // 4)
    components = ComponentEffects(model, "zero", outcome="mean_logit", granularity="skips", device="cpu",
                                  batch_size=2).attribute(image, region)
    assert len(components.ate) == len(expected) and np.isfinite(components.ate).all()
    assert np.any(np.abs(components.raw_mean) > 0)  # zeroing a skip changes the logits somewhere

    block = size[0] // 2
    regions = RegionEffects(model, "zero", outcome="mean_logit", block_shape=block, device="cpu",
                            batch_size=4).attribute(image, region)
    assert regions.block_effects.shape == tuple(s // block for s in size)
    assert np.isfinite(regions.block_effects).all()


def test_traced_skip_replaces_only_the_concatenated_tensor():
    """Zeroing BasicUNet's finest skip equals zeroing the encoder tensor UpCat receives (its
    ``x_e`` argument), while the deeper path keeps the real encoder output."""
    net, size = build("BasicUNet", 2)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1})
    x = torch.from_numpy(np.random.default_rng(1).uniform(size=(1, *size)).astype(np.float32))
    region = box_region(size, (16, 16), 16)
    skip = next(c for c in enumerate_components(model, "skips", example=x) if c.name.startswith("skip 1 "))
    assert skip.path == "upcat_1"
    nodes = ComponentNodes(model, x, [skip], region, Outcome("mean_logit"), ZeroActivation())
    traced = float(nodes.outcomes([0], [torch.zeros(skip.shape)])[0])

    def zero_skip_argument(module, args):
        return args[0], torch.zeros_like(args[1])

    handle = net.upcat_1.register_forward_pre_hook(zero_skip_argument)
    try:
        with torch.inference_mode():
            manual = float(nodes.scoring(nodes.scoring.region_scores(x[None]))[0])
    finally:
        handle.remove()
    assert traced == pytest.approx(manual, abs=1e-5)
    assert abs(traced - nodes.base_outcome()) > 1e-4


def test_swin_names_are_clean_and_its_blocks_are_channels_last():
    net, size = build("SwinUNETR", 2)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1})
    image = np.random.default_rng(0).uniform(size=(1, *size)).astype(np.float32)
    blocks = enumerate_components(model, "blocks", example=image)
    names = [c.name for c in blocks]
    assert not any("vi t" in n or " 0 blocks 0" in n for n in names), names
    swin_blocks = [c for c in blocks if c.module_type == "BasicLayer" or "layers 1 blocks" in c.name]
    assert swin_blocks and all(c.channels_last for c in swin_blocks)
    layer = swin_blocks[0]
    channels = enumerate_components(model, "channels", layer=layer.path, example=image)
    assert len(channels) == 12  # feature_size: the last axis, not the image rows
    assert channels[0].shape == (*layer.shape[:-1], 1)
    region = box_region(size, (16, 16), 16)
    result = ComponentEffects(model, "zero", outcome="mean_logit", components=channels[:2], device="cpu").attribute(
        image, region)
    assert np.isfinite(result.ate).all() and np.any(np.abs(result.raw_mean) > 0)


def test_probe_sizes_fit_the_model():
    # SwinUNETR runs from 64 on (32 is too small): the search finds it, and divisibility 32
    net, _ = build("SwinUNETR", 2)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1})
    assert model.description.example_shape == (64, 64)
    assert model.divisible_by == 32
    # the image's own shape is tried first
    net, _ = build("BasicUNet", 2)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1}, image_shape=(48, 80))
    assert model.description.example_shape == (48, 80)
    # a fixed-size transformer, bigger image: sliding windows of its img_size
    torch.manual_seed(0)
    unetr = UNETR(1, 2, (32, 32), feature_size=4, hidden_size=24, mlp_dim=24, num_heads=2, spatial_dims=2)
    model = load_model(unetr, description={"spatial_dims": 2, "in_channels": 1})
    assert model.sliding_window.window_size((48, 48)) == (32, 32)
    image = np.random.default_rng(0).uniform(size=(1, 48, 48)).astype(np.float32)
    assert model(torch.from_numpy(image)[None]).shape == (1, 2, 48, 48)


def test_description_channel_reaches_the_outcome_and_is_checked_at_load():
    net, size = build("BasicUNet", 2, out_channels=3)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1, "channel": 1})
    image = np.random.default_rng(0).uniform(size=(1, *size)).astype(np.float32)
    region = box_region(size, (16, 16), 16)
    result = RegionEffects(model, "zero", block_shape=32, device="cpu").attribute(image, region)
    assert result.parameters["outcome"]["channel"] == 1
    net, _ = build("BasicUNet", 2, out_channels=3)
    with pytest.raises(ModelLoadError, match="channel 5 does not exist"):
        load_model(net, description={"spatial_dims": 2, "in_channels": 1, "channel": 5})


def test_cost_estimate_bounds_the_run_and_says_what_to_do():
    net, size = build("BasicUNet", 2)
    model = load_model(net, description={"spatial_dims": 2, "in_channels": 1})
    image = np.random.default_rng(0).uniform(size=(1, *size)).astype(np.float32)
    region = box_region(size, (16, 16), 16)
    method = RegionEffects(model, "zero", outcome="mean_logit", block_shape=16, device="cpu")
    cost = method.estimate_cost(image, region)
    assert cost.n_blocks == 16 - 1 and cost.seconds_per_pass > 0
    result = method.attribute(image, region)
    assert result.forward_passes <= cost.passes
    long = CostEstimate(n_blocks=500, passes=1200, seconds_per_pass=1.0, mode="exact")
    assert long.message().startswith("at most about 20 minutes") and "choose fast mode or larger blocks" in long.message()
    assert "choose larger blocks" in CostEstimate(500, 1200, 1.0, "fast").message()
    assert "choose" not in CostEstimate(10, 20, 0.1, "exact").message()
    with pytest.raises(ValueError, match="target region"):
        method.estimate_cost(image, np.zeros(size, bool))
