"""Models in every format round-trip through load_model; trust, mismatches and bad files fail clearly."""

import json
import shutil
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from napari_pdcr.models.base import SegmentationModel, hash_file, hash_module
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.models.loading import (
    ModelLoadError,
    UntrustedModelError,
    hash_bundle,
    load_model,
)

#: what the test network is, so that tests about other things skip the inference passes
KNOWN = {"spatial_dims": 3, "in_channels": 1, "divisible_by": 4}
UNET_KWARGS = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def small_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    network = UNet(**UNET_KWARGS).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a lost state dict shows
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return network


@pytest.fixture(scope="module")
def network():
    return small_unet()


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 1, 20, 24, 16, generator=torch.Generator().manual_seed(1))


def expected_scores(network, x):
    with torch.inference_mode():
        return network(x)


def run(model: SegmentationModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


# ---------------------------------------------------------------------- round trips
def test_torchscript_round_trip_with_inference_and_description_file(tmp_path, network, image):
    path = tmp_path / "brain.pt"
    torch.jit.save(torch.jit.script(network), path)
    model = load_model(path, trusted=True)
    assert (model.spatial_dims, model.in_channels, model.activation) == (3, 1, "softmax")
    assert model.divisible_by == 4  # two stride-2 levels
    assert model.sha256 == hash_file(path) and model.source == str(path) and model.name == "brain"
    assert any("spatial_dims=3" in note for note in model.description.inferred)
    assert model.identity()["sha256"] == hash_file(path)
    torch.testing.assert_close(run(model, image), expected_scores(network, image))

    settings = {"spatial_dims": 3, "in_channels": 1, "divisible_by": 4, "activation": "none", "channel": 1, "temperature": 2.0}
    (tmp_path / "brain.pdcr.json").write_text(json.dumps(settings))
    described = load_model(path, trusted=True)
    assert described.activation == "none" and described.description.channel == 1
    assert described.description.outcome("soft_dice").temperature == 2.0
    # fields given to load_model win over the file
    assert load_model(path, trusted=True, description={"activation": "sigmoid"}).activation == "sigmoid"


def test_traced_torchscript_with_another_suffix(tmp_path, network, image):
    path = tmp_path / "traced.ts"
    torch.jit.save(torch.jit.trace(network, image), path)
    model = load_model(path, trusted=True, description={"spatial_dims": 3, "in_channels": 1, "divisible_by": 4})
    torch.testing.assert_close(run(model, image), expected_scores(network, image))
    assert not model.is_module  # TorchScript: region effects only


def test_export_round_trip_dynamic_batch_and_fixed_size(tmp_path, network, image):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(network, (image.expand(2, -1, -1, -1, -1),), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "brain.pt2"
    torch.export.save(program, path)
    model = load_model(path, trusted=True)
    assert model.sha256 == hash_file(path)
    # a program specialised to 20x24x16 is applied by sliding windows of that size
    assert model.sliding_window is not None and model.sliding_window.window_size((20, 24, 16)) == (20, 24, 16)
    assert any("exported program accepts only" in note for note in model.description.inferred)
    torch.testing.assert_close(run(model, image), expected_scores(network, image))
    larger = torch.rand(2, 1, 26, 24, 30)
    with torch.inference_mode():
        reference = sliding_window_inference(larger, (20, 24, 16), 4, network, 0.25)
    torch.testing.assert_close(run(model, larger), reference)


def test_export_with_batch_one_runs_one_image_at_a_time(tmp_path, network, image):
    path = tmp_path / "single.pt2"
    torch.export.save(torch.export.export(network, (image,)), path)
    model = load_model(path, trusted=True, description={"sliding_window": {"roi_size": [20, 24, 16], "overlap": 0.5}})
    pair = torch.cat([image, image.flip(2)])
    torch.testing.assert_close(run(model, pair), expected_scores(network, pair))
    with pytest.raises(ModelLoadError, match="accepts only inputs of spatial size"):
        load_model(path, trusted=True, description={"sliding_window": {"roi_size": 16}})


def write_bundle(root, network) -> None:
    """A MONAI bundle folder: configs/inference.json + metadata.json, models/model.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    config = {
        "network_def": {"_target_": "monai.networks.nets.UNet", **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET_KWARGS.items()}},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 200, "b_min": 0.0, "b_max": 1.0, "clip": True},
            ],
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}, {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"network_data_format": {"inputs": {"image": {"num_channels": 1, "spatial_shape": ["4*n", "4*n", "4*n"]}}, "outputs": {"pred": {"num_channels": 2}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))


def check_bundle_model(model: SegmentationModel, network, image):
    assert model.activation == "softmax" and model.divisible_by == (4, 4, 4)
    window = model.sliding_window
    assert (window.roi_size, window.overlap, window.mode, window.batch_size) == ((16, 16, 16), 0.5, "gaussian", 2)
    raw = np.linspace(-50, 250, 8 * 8 * 8, dtype=np.float32).reshape(1, 8, 8, 8)
    prepared = model.prepare_image(raw).numpy()
    np.testing.assert_allclose(prepared, np.clip(raw / 200, 0, 1), atol=1e-6)  # ScaleIntensityRanged kept
    assert "LoadImaged" in repr(model.preprocess) and "left out" in repr(model.preprocess)
    with torch.inference_mode():
        reference = sliding_window_inference(image, 16, 2, network, 0.5, "gaussian")
    torch.testing.assert_close(run(model, image), reference)


def test_bundle_folder_needs_trust_and_round_trips(tmp_path, network, image):
    root = tmp_path / "brain_bundle"
    write_bundle(root, network)
    with pytest.raises(UntrustedModelError, match="arbitrary Python"):
        load_model(root)
    model = load_model(root, trusted=True)
    assert model.sha256 == hash_bundle(root)
    check_bundle_model(model, network, image)


def test_bundle_zip_round_trips(tmp_path, network, image):
    root = tmp_path / "src" / "brain_bundle"
    write_bundle(root, network)
    (root / "models" / "model.pt").unlink()  # TorchScript weights instead, and a description inside
    torch.jit.save(torch.jit.script(network), root / "models" / "model.ts")
    (root / "pdcr.json").write_text(json.dumps({"channel": 1, "temperature": 3.0}))
    archive = tmp_path / "brain_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.rglob("*"):
            zf.write(path, path.relative_to(root.parent))
    with pytest.raises(UntrustedModelError):
        load_model(archive)
    model = load_model(archive, trusted=True)
    assert model.sha256 == hash_file(archive)
    assert (model.description.channel, model.description.temperature) == (1, 3.0)
    check_bundle_model(model, network, image)


def test_factory_with_checkpoint(tmp_path, monkeypatch, network, image):
    (tmp_path / "pdcr_test_factory.py").write_text(textwrap.dedent("""
        from monai.networks.nets import UNet

        def build(width=4):
            return UNet(3, 1, 2, channels=(width, 8, 16), strides=(2, 2), num_res_units=1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "weights.pth"
    torch.save(network.state_dict(), checkpoint)
    with pytest.raises(UntrustedModelError, match="runs Python code"):
        load_model("pdcr_test_factory:build", checkpoint=checkpoint)
    model = load_model("pdcr_test_factory:build", checkpoint=checkpoint, trusted=True)
    assert model.sha256 == hash_file(checkpoint) and model.is_module
    torch.testing.assert_close(run(model, image), expected_scores(network, image))
    with pytest.raises(ModelLoadError, match="does not fit the network"):
        load_model("pdcr_test_factory:build", checkpoint=checkpoint, trusted=True, factory_kwargs={"width": 6})
    with pytest.raises(ModelLoadError, match="has no attribute"):
        load_model("pdcr_test_factory:missing", trusted=True)


def test_module_object_and_pickled_module(tmp_path, network, image):
    model = load_model(network, description=KNOWN)
    assert model.sha256 == hash_module(network) and model.is_module
    torch.testing.assert_close(run(model, image), expected_scores(network, image))
    pickled = tmp_path / "whole.pt"
    torch.save(network, pickled)
    with pytest.raises(UntrustedModelError, match="unpickling"):
        load_model(pickled)
    assert load_model(pickled, trusted=True, description=KNOWN).sha256 == hash_file(pickled)


# ---------------------------------------------------------------------- errors
def test_missing_corrupt_and_unknown_files(tmp_path, network):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(network), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(truncated)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07onnx")
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(tmp_path / "model.onnx")
    state = tmp_path / "state.pt"
    torch.save(network.state_dict(), state)
    with pytest.raises(ModelLoadError, match="only weights"):
        load_model(state)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="not a MONAI bundle"):
        load_model(tmp_path / "folder")
    shutil.copy(good, tmp_path / "renamed.pt2")  # the content decides, not the suffix
    assert load_model(tmp_path / "renamed.pt2", trusted=True).sha256 == hash_file(good)


def test_description_mismatches_are_reported(network):
    with pytest.raises(ModelLoadError, match="does not run on the given"):
        load_model(network, description={"in_channels": 2})
    with pytest.raises(ModelLoadError, match="does not run on the given"):
        load_model(network, description={"spatial_dims": 2, "in_channels": 1})
    with pytest.raises(ModelLoadError, match="says 3 output channel"):
        load_model(network, description={**KNOWN, "out_channels": 3})
    with pytest.raises(ModelLoadError, match="channel 5 does not exist"):
        load_model(network, description={**KNOWN, "channel": 5})
    with pytest.raises(ValueError, match="unknown model description field"):
        load_model(network, description={"spatial_dim": 3})
    model = load_model(network, description=KNOWN)
    with pytest.raises(ValueError, match="expects 1 input channel"):
        model.prepare_image(np.zeros((2, 8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expects a 3D image"):
        model.prepare_image(np.zeros((1, 8, 8), np.float32))


def test_ambiguous_and_non_finite_models():
    with pytest.raises(ModelLoadError, match="several kinds of input"):
        load_model(torch.nn.Identity())

    class NaNOut(torch.nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.raises(FloatingPointError, match="NaN"):
        load_model(NaNOut(), description={"spatial_dims": 2, "in_channels": 1})


def test_description_file_errors(tmp_path):
    bad = tmp_path / "bad.pdcr.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelDescription.from_file(bad)
    bad.write_text(json.dumps({"activation": "relu"}))
    with pytest.raises(ValueError, match="activation must be one of"):
        ModelDescription.from_file(bad)
    round_trip = ModelDescription(spatial_dims=3, sliding_window={"roi_size": [8, 8, 8]}, divisible_by=[2, 2, 2])
    assert ModelDescription.from_dict({k: v for k, v in round_trip.to_dict().items() if k != "inferred"}) == round_trip


def test_real_third_party_torchscript_deepbet_if_installed():
    """deepbet (PyPI, MIT) ships a TorchScript 3D brain-extraction network whose outputs are
    softmax probabilities: everything about it is inferred (skipped unless deepbet is installed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution("deepbet").files or []
    except PackageNotFoundError:
        pytest.skip("deepbet is not installed (pip install --no-deps deepbet)")
    path = next((f.locate() for f in files if str(f).replace("\\", "/").endswith("data/models/model.pt")), None)
    if path is None or not path.is_file():
        pytest.skip("deepbet's model.pt is not where its wheel puts it")
    model = load_model(path, trusted=True)
    assert (model.spatial_dims, model.in_channels, model.activation, model.divisible_by) == (3, 1, "none", 32)
    assert model.description.out_channels == 2

    # and it is explained: the bundled 2 mm head, 32^3 blocks, channel 1 (brain), a 16^3 region
    # centred on the edge of deepbet's own brain mask (inside the brain nothing moves it)
    from scipy.ndimage import binary_erosion

    from napari_pdcr import RegionEffects, box_region
    from napari_pdcr.engine.estimator import NodeStatus
    from napari_pdcr.samples import load_sample

    model = load_model(path, trusted=True, description={"channel": 1})
    image = load_sample("colin27_volume")["image"][None].astype(np.float32)
    with torch.inference_mode():
        brain = model(model.prepare_image(image)[None])[0, 1].numpy() > 0.5
    assert 0.1 < brain.mean() < 0.9  # a brain-sized mask in the head
    shape = np.array(brain.shape)
    edge = np.argwhere(brain & ~binary_erosion(brain))
    edge = edge[((edge >= 8) & (edge <= shape - 9)).all(axis=1)]
    centre = edge[np.argmin(np.linalg.norm(edge - shape / 2 - [0, 0, 20], axis=1))]
    region = box_region(brain.shape, tuple(int(v) - 8 for v in centre), 16)
    runs = {mode: RegionEffects(model, "zero", "mean_probability", block_shape=32, mode=mode).attribute(image, region)
            for mode in ("published", "exact")}
    published, exact = runs["published"], runs["exact"]
    # the exact accelerations give the published estimand on a real network (it reads the whole
    # volume: no block is unreachable, nothing is skipped)
    np.testing.assert_allclose(exact.block_effects, published.block_effects, atol=1e-3)
    assert not (exact.block_status == NodeStatus.UNREACHABLE).any()
    assert np.isfinite(exact.block_effects).all() and exact.forward_passes <= published.forward_passes + 40
    assert (np.abs(exact.block_effects) > exact.parameters["tau"]).sum() >= 3  # there is something to agree on
