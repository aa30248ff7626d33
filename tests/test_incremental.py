"""Incremental inference (engine/incremental.py) equals full inference, and falls back cleanly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from synthetic import random_image, torch_threads, wrap
from torch import nn

from napari_pdcr import PatchBank, RegionEffects, box_region
from napari_pdcr.engine.incremental import IncrementalForward
from napari_pdcr.models.demo import load_demo_model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


def block_batch(image: torch.Tensor, blocks: list[tuple[slice, ...]], draws: int = 2, seed: int = 0):
    """A batch with each block replaced by ``draws`` random fills, and the changed slices per item."""
    gen = torch.Generator().manual_seed(seed)
    batch = image[None].repeat(len(blocks) * draws, *([1] * image.ndim))
    changed = []
    for b, where in enumerate(blocks):
        for d in range(draws):
            i = b * draws + d
            shape = batch[(i, slice(None), *where)].shape
            batch[(i, slice(None), *where)] = torch.rand(shape, generator=gen)
            changed.append(where)
    return batch, changed


def border_blocks(spatial: tuple[int, ...], needed: tuple[slice, ...], size: int = 8) -> list[tuple[slice, ...]]:
    """Blocks at the low corner, the high corner (a partial block when the size is no multiple),
    one at the needed box's start, and a two-block-wide box (a group of blocks replaced together)."""
    low = tuple(slice(0, size) for _ in spatial)
    high = tuple(slice((n - 1) // size * size, n) for n in spatial)
    near = tuple(slice(s.start // size * size, s.start // size * size + size) for s in needed)
    pair = tuple(slice(size, 3 * size) if a == 0 else slice(0, size) for a in range(len(spatial)))
    return [low, high, near, pair]


def assert_incremental_equals_full(model, spatial: tuple[int, ...], needed: tuple[slice, ...], seed: int = 0):
    image = torch.from_numpy(random_image((1, *spatial), seed))
    incremental = IncrementalForward(model, image, needed)
    assert incremental.status == "on", incremental.status
    batch, changed = block_batch(image, border_blocks(spatial, needed), seed=seed)
    with torch.inference_mode():
        full = model(batch)
        fast = incremental.forward(batch, changed)
        base = model(image[None])
        # the draws of one block interleaved with others' (groups of rows that are not consecutive)
        order = list(range(0, len(batch), 2)) + list(range(1, len(batch), 2))
        shuffled = incremental.forward(batch[order], [changed[i] for i in order])
    assert incremental.status == "on", incremental.status  # the first-batch check passed
    inside = (slice(None), slice(None), *needed)
    assert fast.shape == full.shape
    scale = float(full[inside].abs().max())
    np.testing.assert_allclose(fast[inside].numpy(), full[inside].numpy(), rtol=0, atol=2e-5 * max(scale, 1.0))
    np.testing.assert_allclose(shuffled[inside].numpy(), full[order][inside].numpy(), rtol=0, atol=2e-5 * max(scale, 1.0))
    # the blocks do change the needed scores, so the test compares recomputed values
    assert float((full[inside] - base[inside]).abs().max()) > 1e-3


# the needed box: a region somewhere inside, and one touching the image's high corner
NEEDED_2D = [(slice(40, 72), slice(16, 48)), (slice(80, 100), slice(70, 90))]


@pytest.mark.parametrize("needed", NEEDED_2D)
@pytest.mark.parametrize("name", ["unet2d", "shallow2d"])
def test_demo_2d_models_equal_full_inference(name, needed):
    # 100 x 90 is no multiple of unet2d's 16: the padding at the high end is part of the test
    assert_incremental_equals_full(load_demo_model(name), (100, 90), needed)


def test_demo_unet2d_at_the_published_size():
    assert_incremental_equals_full(load_demo_model("unet2d"), (256, 256), (slice(112, 144), slice(40, 72)))


@pytest.mark.parametrize("needed", [(slice(10, 26), slice(12, 28), slice(8, 24)), (slice(30, 36), slice(36, 44), slice(0, 6))])
def test_demo_unet3d_equals_full_inference(needed):
    assert_incremental_equals_full(load_demo_model("unet3d"), (36, 44, 30), needed)


@pytest.mark.parametrize(
    "network, divisible_by",
    [
        (UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch", kernel_size=5), 4),
        (UNet(2, 1, 1, channels=(8, 16), strides=(3,), num_res_units=0, norm="batch", act="relu"), 3),
    ],
    ids=["monai-unet-k5", "monai-unet-stride3"],
)
def test_monai_networks_with_batch_norm_equal_full_inference(network, divisible_by):
    torch.manual_seed(0)
    model = wrap(network.eval(), 2, divisible_by=divisible_by)
    assert_incremental_equals_full(model, (70, 66), (slice(20, 40), slice(30, 50)))


class EveryLocalOp(nn.Module):
    """Each local op incremental inference knows, with awkward settings: padded max pooling, average pooling, dilation, 'same' padding, strided and transposed
    convolutions, nearest and linear upsampling, concatenation, addition, functional ops."""

    def __init__(self, dims: int):
        super().__init__()
        conv, transposed = (nn.Conv2d, nn.ConvTranspose2d) if dims == 2 else (nn.Conv3d, nn.ConvTranspose3d)
        pool_max, pool_avg = (nn.MaxPool2d, nn.AvgPool2d) if dims == 2 else (nn.MaxPool3d, nn.AvgPool3d)
        linear = "bilinear" if dims == 2 else "trilinear"
        self.stem = conv(1, 4, 3, padding="same", dilation=2)
        self.down = conv(4, 6, 3, stride=2, padding=1)
        self.pool = pool_max(3, stride=2, padding=1)
        self.avg = pool_avg(3, stride=1, padding=1)
        self.up_linear = nn.Upsample(scale_factor=2, mode=linear)
        self.up_transposed = transposed(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_nearest = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = conv(14, 2, 1)
        self.norm = nn.BatchNorm2d(6) if dims == 2 else nn.BatchNorm3d(6)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = self.norm(self.down(a))  # 1/2
        c = self.avg(self.pool(b))  # 1/4
        up = self.up_linear(c) + b  # 1/2
        d = self.up_transposed(nn.functional.leaky_relu(up))  # 1
        e = self.up_nearest(b)  # 1
        return self.head(torch.cat([a, d, e], dim=1))


@pytest.mark.parametrize("dims", [2, 3])
def test_every_local_op_equals_full_inference(dims):
    torch.manual_seed(1)
    network = EveryLocalOp(dims)
    network.norm.running_mean.uniform_(-0.5, 0.5)
    network.norm.running_var.uniform_(0.5, 2.0)
    spatial = (44, 36) if dims == 2 else (20, 28, 24)
    needed = tuple(slice(n // 3, n // 3 + 9) for n in spatial)
    assert_incremental_equals_full(wrap(network.eval(), dims, divisible_by=4), spatial, needed)


def test_region_effects_with_incremental_equal_those_without():
    model = load_demo_model("unet2d")
    sample = random_image((1, 64, 64), 3)
    image = (sample > 0.4).astype(np.float32) * sample
    region = box_region((64, 64), (24, 8), 16)
    bank = PatchBank([random_image((1, 64, 64), 5)], size=200, seed=0)
    runs = {
        flag: RegionEffects(model, intervention=bank, block_shape=8, n_screen=3, n_estimate=8, tau=1e-9,
                            mode="exact", device="cpu", seed=4, incremental=flag).attribute(image, region)
        for flag in (True, False)
    }
    assert runs[True].parameters["incremental"] == "on"
    assert runs[False].parameters["incremental"] == "not requested"
    np.testing.assert_allclose(runs[True].block_effects, runs[False].block_effects, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(runs[True].block_draws, runs[False].block_draws)
    assert np.abs(runs[True].block_effects).max() > 0.1  # the runs measured real effects


def test_published_mode_does_not_use_it_and_exact_mode_does():
    model = load_demo_model("shallow2d")
    image, region = random_image((1, 32, 32), 1), box_region((32, 32), (12, 12), 8)
    published = RegionEffects(model, block_shape=4, mode="published", device="cpu").attribute(image, region)
    exact = RegionEffects(model, block_shape=4, mode="exact", device="cpu").attribute(image, region)
    assert published.parameters["incremental"] == "not requested"
    assert exact.parameters["incremental"] == "on"
    np.testing.assert_allclose(exact.block_effects, published.block_effects, rtol=0, atol=1e-5)


class InstanceNormNet(nn.Module):
    """A convolution, instance normalisation (each voxel depends on the whole image), a convolution."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x):
        return self.layers(x)


def fallback_models():
    torch.manual_seed(0)
    script = torch.jit.script(InstanceNormNet().eval())
    return {
        "instance norm": (wrap(InstanceNormNet().eval(), 2), "InstanceNorm2d"),
        "torchscript": (wrap(script, 2), "TorchScript"),
        "transformer (vit2d)": (load_demo_model("vit2d"), "not (N, C, *S) feature maps"),
        # fx traces UpCat's `torch.jit.isinstance(x_e, torch.Tensor)` as False: a wrong graph
        "BasicUNet (untraceable control flow)": (
            wrap(BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4), norm="batch").eval(),
                 2, divisible_by=16),
            "the traced network fails",
        ),
    }


@pytest.mark.parametrize("kind", ["instance norm", "torchscript", "transformer (vit2d)", "BasicUNet (untraceable control flow)"])
def test_falls_back_to_full_inference_with_one_log_line(kind, caplog):
    model, reason = fallback_models()[kind]
    image = torch.from_numpy(random_image((1, 32, 32), 2))
    with caplog.at_level(logging.INFO, logger="napari_pdcr.engine.incremental"):
        incremental = IncrementalForward(model, image, (slice(8, 16), slice(8, 16)))
    assert not incremental.supported
    assert incremental.status.startswith("off: ") and reason in incremental.status
    assert incremental.status.endswith("full inference is used")
    lines = [r.getMessage() for r in caplog.records if r.name == "napari_pdcr.engine.incremental"]
    assert len(lines) == 1 and reason in lines[0] and "\n" not in lines[0]
    batch, changed = block_batch(image, [(slice(0, 8), slice(0, 8))])
    with torch.inference_mode():
        np.testing.assert_array_equal(incremental.forward(batch, changed).numpy(), model(batch).numpy())


def test_region_effects_on_an_unsupported_model_say_so_and_match_published():
    model = wrap(InstanceNormNet().eval(), 2)
    image, region = random_image((1, 32, 32), 1), box_region((32, 32), (12, 12), 8)
    exact = RegionEffects(model, block_shape=8, intervention="zero", device="cpu").attribute(image, region)
    published = RegionEffects(model, block_shape=8, intervention="zero", mode="published", device="cpu").attribute(image, region)
    assert exact.parameters["incremental"].startswith("off: op InstanceNorm2d")
    np.testing.assert_allclose(exact.block_effects, published.block_effects, rtol=0, atol=1e-5)


def test_first_batch_check_turns_it_off_when_the_cache_is_wrong(caplog):
    model = load_demo_model("shallow2d")
    image = torch.from_numpy(random_image((1, 32, 32), 2))
    incremental = IncrementalForward(model, image, (slice(8, 16), slice(8, 16)))
    assert incremental.supported
    last_conv = [node for node in incremental._nodes if node.op == "call_module"][-1]
    with torch.inference_mode():
        incremental._values[last_conv] += 1.0  # a stale cache: incremental scores would be wrong
    batch, changed = block_batch(image, [(slice(0, 8), slice(8, 16))])
    with caplog.at_level(logging.INFO, logger="napari_pdcr.engine.incremental"), torch.inference_mode():
        scores = incremental.forward(batch, changed)
        np.testing.assert_array_equal(scores.numpy(), model(batch).numpy())
    assert incremental.status == "off: its first batch did not reproduce full inference; full inference is used"
    assert any("did not reproduce" in r.getMessage() for r in caplog.records)


def test_bad_boxes_get_a_clear_error():
    model = load_demo_model("shallow2d")
    image = torch.from_numpy(random_image((1, 16, 16), 0))
    with pytest.raises(ValueError, match="leaves the input's spatial shape"):
        IncrementalForward(model, image, (slice(8, 20), slice(0, 4)))
    with pytest.raises(ValueError, match="one slice per spatial axis"):
        IncrementalForward(model, image, (slice(0, 4),))
    incremental = IncrementalForward(model, image, (slice(0, 4), slice(0, 4)))
    with pytest.raises(ValueError, match="give one per item"):
        incremental.forward(image[None].repeat(2, 1, 1, 1), [(slice(0, 4), slice(0, 4))])
