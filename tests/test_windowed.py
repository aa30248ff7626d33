"""Sliding-window models: the window restriction is exact, OOM backs off, devices resolve clearly."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from napari_pdcr import RegionEffects, box_region
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.engine.windowed import WindowedInputBlocks
from napari_pdcr.interventions import make_intervention
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.devices import available_devices, resolve_device, set_cpu_threads
from napari_pdcr.models.sliding_window import SlidingWindow
from napari_pdcr.outcomes import Outcome
from napari_pdcr.regions import BlockGrid


@pytest.fixture(scope="module")
def network():
    """A small random 3D U-Net (2 output channels), eval mode."""
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch").eval()


def windowed_model(network, roi=10, overlap=0.25, mode="constant") -> SegmentationModel:
    window = SlidingWindow(roi, overlap, mode, batch_size=64)
    return SegmentationModel(network, 3, 1, activation="softmax", divisible_by=4, sliding_window=window)


def volume(shape=(16, 18, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, *shape), dtype=np.float32)


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode"),
    [
        ((16, 18, 12), 10, 0.25, "constant"),
        ((16, 18, 12), 10, (0.5, 0.25, 0.0), "gaussian"),
        ((16, 9, 12), (10, 12, 8), 0.25, "gaussian"),
    ],
)
def test_window_blend_equals_monai_sliding_window_inference(network, shape, roi, overlap, mode):
    """Region scores of intervened images from cached + re-run windows equal MONAI's full pass
    (per-axis overlap; the last case is smaller than the window on one axis: MONAI pads)."""
    model = windowed_model(network, roi, overlap, mode)
    x = torch.from_numpy(volume(shape))
    region = box_region(shape, (5, 3, 4), (4, 4, 3))
    grid = BlockGrid.create(shape, 4)
    nodes = WindowedInputBlocks(model, x, grid, region, Outcome("mean_logit", channel=1), make_intervention("zero"))
    blocks = [0, 7, grid.n_blocks // 2, grid.n_blocks - 1]
    replacements = [torch.rand(1, *(s.stop - s.start for s in grid.slices(b))) for b in blocks]
    batch = x.expand(len(blocks), *x.shape).clone()
    for i, (b, rep) in enumerate(zip(blocks, replacements, strict=True)):
        batch[(i, slice(None), *grid.slices(b))] = rep
    region_index = torch.from_numpy(np.flatnonzero(region))
    with torch.inference_mode():
        full = sliding_window_inference(torch.cat([x[None], batch]), nodes.layout.roi_size, 64, model.forward_network, overlap, mode)
    expected = full.flatten(2)[:, :, region_index]
    assert torch.allclose(nodes.base_region_scores, expected[:1], rtol=0, atol=1e-5)
    scores = nodes.intervened_region_scores([(b,) for b in blocks], [(r,) for r in replacements])
    assert torch.allclose(scores, expected[1:], rtol=0, atol=1e-5)
    # several blocks at once (coarse screening intervenes on groups of blocks)
    together = x[None].clone()
    for b, rep in zip(blocks, replacements, strict=True):
        together[(0, slice(None), *grid.slices(b))] = rep
    with torch.inference_mode():
        full = sliding_window_inference(together, nodes.layout.roi_size, 64, model.forward_network, overlap, mode)
    jointly = nodes.intervened_region_scores([blocks], [replacements])
    assert torch.allclose(jointly, full.flatten(2)[:, :, region_index], rtol=0, atol=1e-5)
    assert nodes.window_evaluations < (1 + len(blocks)) * nodes.layout.n_windows


def test_windowed_effects_equal_full_inference(network):
    """RegionEffects with the window restriction ("exact") == the reference ("published"),
    which runs MONAI's sliding_window_inference on every intervened volume."""
    model = windowed_model(network, roi=10, mode="gaussian")
    image = volume((12, 22, 12), seed=1)
    region = box_region(image.shape[1:], (4, 2, 4), 4)
    settings = dict(intervention="noise", outcome=Outcome("soft_dice", channel=1), block_shape=4,
                    n_screen=0, n_estimate=2, tau=0.0, device="cpu", batch_size=16)
    exact = RegionEffects(model, mode="exact", **settings).attribute(image, region)
    reference = RegionEffects(model, mode="published", **settings).attribute(image, region)
    assert exact.base_outcome == pytest.approx(reference.base_outcome, abs=1e-9)
    np.testing.assert_allclose(exact.block_effects, reference.block_effects, atol=1e-4)
    unreachable = exact.block_status == NodeStatus.UNREACHABLE
    assert unreachable.any()  # windows far from the region were never run ...
    # ... and indeed change nothing (to float32 rounding of a percent-scale outcome: the published run's
    # windows are batched differently with one torch thread, 4e-8 there)
    assert np.all(np.abs(reference.block_effects[unreachable]) < 1e-5)
    info = exact.parameters["sliding_window"]
    assert info["windows_over_region"] < info["windows_per_pass"]
    full_cost = reference.forward_passes * info["windows_per_pass"]
    assert info["window_evaluations"] < full_cost / 4
    assert np.array_equal(exact.prediction, reference.prediction)


class FlakyMemory:
    """A network that raises a (fake) CUDA out-of-memory error for batches above ``limit`` windows."""

    def __init__(self, network, limit):
        self.network, self.limit, self.failures = network, limit, 0

    def __call__(self, batch):
        if len(batch) > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {len(batch)} windows")
        return self.network(batch)


def test_out_of_memory_backs_off_in_windowed_path(network):
    image = volume((12, 18, 10))
    region = box_region(image.shape[1:], (4, 6, 4), 4)
    settings = dict(intervention="zero", outcome=Outcome("mean_logit", channel=1), block_shape=4,
                    device="cpu", batch_size=16, tau=0.0)
    plain = RegionEffects(windowed_model(network), **settings).attribute(image, region)
    flaky = FlakyMemory(network, limit=16)
    model = SegmentationModel(flaky, 3, 1, activation="softmax", divisible_by=4,
                              sliding_window=SlidingWindow(10, 0.25, batch_size=4))
    backed_off = RegionEffects(model, **settings).attribute(image, region)
    assert flaky.failures > 0
    assert any("sliding-window batch reduced to" in line for line in backed_off.log)
    np.testing.assert_allclose(backed_off.block_effects, plain.block_effects, atol=1e-5)


def test_sliding_window_settings_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow(16, overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        SlidingWindow(16, mode="linear")
    with pytest.raises(ValueError, match="does not match"):
        SlidingWindow((16, 16)).layout((20, 20, 20))


def test_device_resolution():
    assert resolve_device("auto") == torch.device(available_devices()[0])
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if "cuda" not in available_devices():
        with pytest.raises(RuntimeError, match="not available: .*CUDA"):
            resolve_device("cuda")
        with pytest.warns(RuntimeWarning, match="running on the CPU instead"):
            assert resolve_device("cuda", fallback=True) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_device("cuda:99")


def test_cpu_threads():
    before = torch.get_num_threads()
    assert set_cpu_threads(1) == before
    assert torch.get_num_threads() == 1
    set_cpu_threads(before)
    with pytest.raises(ValueError, match="positive integer"):
        set_cpu_threads(0)
