"""The shipped demo models load by name, run on their samples and segment held-out brains."""

import numpy as np
import pytest
import torch

from napari_pdcr.models import SegmentationModel
from napari_pdcr.models.demo import (
    DEMO_MODELS,
    demo_model_names,
    demo_weights_path,
    lesion_model_names,
    load_demo_model,
)
from napari_pdcr.samples import colin27_split, load_sample


def brain_masks(model: SegmentationModel, images: np.ndarray) -> np.ndarray:
    """Binary masks ``(N, *S)`` (probability > 0.5) for images ``(N, *S)`` in [0, 1]."""
    with torch.no_grad():
        probability = torch.sigmoid(model(torch.from_numpy(images[:, None])))[:, 0]
    return probability.numpy() > 0.5


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice pooled over all voxels of two binary arrays."""
    return 2.0 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum())


@pytest.fixture(scope="module")
def heldout_colin27():
    """Held-out Colin27 slices ``(N, 217, 181)`` and their masks (the training split's complement)."""
    _, heldout = colin27_split()
    stack = load_sample("colin27_slices")
    return stack["image"][heldout], stack["mask"][heldout]


def test_registry_names():
    assert demo_model_names() == list(DEMO_MODELS)
    assert {"unet2d", "unet3d"} <= set(demo_model_names())
    assert len({type(spec.build()) for spec in DEMO_MODELS.values()}) >= 3  # model families


@pytest.mark.parametrize("name", demo_model_names())
def test_weights_are_small_plain_state_dicts(name):
    path = demo_weights_path(name)
    assert path.stat().st_size < 2_000_000
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("name", [n for n in demo_model_names() if n not in lesion_model_names()])
def test_demo_model_loads_and_runs_on_its_sample(name):  # the lesion models: tests/test_classifier_models.py
    spec = DEMO_MODELS[name]
    model = load_demo_model(name)
    assert isinstance(model, SegmentationModel)
    assert (model.name, model.source) == (name, f"demo:{name}")
    assert (model.spatial_dims, model.in_channels, model.activation) == (
        spec.spatial_dims,
        1,
        "sigmoid",
    )
    assert model.is_module and not model.network.training
    assert model.sha256 == load_demo_model(name).sha256  # weights load identically
    sample = load_sample(spec.sample)
    assert sample["image"].ndim == spec.spatial_dims
    with torch.no_grad():
        scores = model(model.prepare_image(sample["image"][None])[None])
    assert scores.shape == (1, 1, *sample["image"].shape)
    assert torch.isfinite(scores).all()
    # a trained brain extractor: most of the sample's brain is found, and not the whole image
    predicted = torch.sigmoid(scores)[0, 0].numpy() > 0.5
    assert dice(predicted, sample["mask"]) > 0.5


def test_unknown_demo_model_lists_available():
    with pytest.raises(KeyError, match="unet2d"):
        load_demo_model("no-such-model")


def test_unet2d_heldout_dice(heldout_colin27):
    images, masks = heldout_colin27
    model = load_demo_model("unet2d")
    assert dice(brain_masks(model, images), masks) >= 0.9


def test_unet2d_works_on_slices_zero_padded_to_256(heldout_colin27):
    images, masks = heldout_colin27
    top, left = (256 - images.shape[1]) // 2, (256 - images.shape[2]) // 2
    padded = np.zeros((len(images), 256, 256), dtype=np.float32)
    padded[:, top : top + images.shape[1], left : left + images.shape[2]] = images
    prediction = brain_masks(load_demo_model("unet2d"), padded)
    inside = prediction[:, top : top + images.shape[1], left : left + images.shape[2]]
    assert dice(inside, masks) >= 0.9
    assert inside.sum() == prediction.sum()  # nothing predicted in the zero padding


def test_unet3d_segments_the_heldout_subject():
    itk = load_sample("itk_volume")
    prediction = brain_masks(load_demo_model("unet3d"), itk["image"][None])[0]
    assert dice(prediction, itk["mask"]) >= 0.85
