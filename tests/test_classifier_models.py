"""The synthetic lesion task, the lesion classifiers (plain CNN, TW-style) and their shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LRP
from captum.attr._utils.lrp_rules import EpsilonRule
from scipy.stats import binomtest

from napari_pdcr.lesions import HELDOUT_SUBJECT, SHAPE, TRAIN_SUBJECT, lesion_split, make_lesion_set
from napari_pdcr.models.classifiers import LesionCNN, TWClassifier
from napari_pdcr.models.demo import (
    DEMO_MODELS,
    demo_weights_path,
    lesion_model_names,
    load_demo_model,
)
from napari_pdcr.samples import load_sample, sample_layers_lesions

CLASSIFIERS = [n for n in lesion_model_names() if DEMO_MODELS[n].kind == "classifier"]
UNETS = [n for n in lesion_model_names() if DEMO_MODELS[n].kind == "segmentation"]


@pytest.fixture(scope="module")
def heldout():
    return make_lesion_set(HELDOUT_SUBJECT, copies=2, seed=0)


# ---------------------------------------------------------------- the lesion task
def test_lesion_set_is_deterministic_from_its_seed():
    first, again, other = (make_lesion_set(TRAIN_SUBJECT, copies=2, seed=s) for s in (3, 3, 4))
    for name in ("images", "labels", "lesion_masks", "brain_masks", "slice_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.lesion_masks, other.lesion_masks)  # the seed matters
    # a draw does not depend on how many copies are asked for
    more = make_lesion_set(TRAIN_SUBJECT, copies=4, seed=3)
    np.testing.assert_array_equal(more.images[more.copy < 2], first.images)


def test_lesion_set_shapes_labels_and_masks(heldout):
    n = len(heldout)
    assert heldout.images.shape == (n, *SHAPE) and heldout.images.dtype == np.float32
    assert 0.0 <= heldout.images.min() and heldout.images.max() <= 1.0
    assert heldout.labels.tolist() == [0, 1] * (n // 2)  # balanced per slice
    areas = heldout.lesion_masks.sum(axis=(1, 2))
    assert (areas[heldout.labels == 0] == 0).all() and (areas[heldout.labels == 1] >= 10).all()
    assert not (heldout.lesion_masks & (1 - heldout.brain_masks)).any()  # lesions lie in brain tissue
    # the lesion changes the image there and only there (the negative copy differs by gamma only)
    positive = np.flatnonzero(heldout.labels == 1)[0]
    inside = heldout.lesion_masks[positive] > 0
    assert heldout.images[positive][inside].mean() > heldout.images[positive - 1][inside].mean() + 0.05


def test_second_subject_is_held_out():
    train, heldout = lesion_split(train_copies=2, heldout_copies=2)
    assert (train.subject, heldout.subject) == ("colin27", "itk")
    # no image of the held-out subject is among the training images
    flat_train = train.images.reshape(len(train), -1)
    for image in heldout.images[:6]:
        assert np.abs(flat_train - image.reshape(-1)).max(axis=1).min() > 0.1


def test_lesion_set_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown lesion subject"):
        make_lesion_set("nobody")
    with pytest.raises(ValueError, match="positive even integer"):
        make_lesion_set(TRAIN_SUBJECT, copies=3)


def test_lesion_sample_and_its_layers():
    sample = load_sample("lesion_slices")
    assert sample["image"].shape == sample["mask"].shape and sample["image"].shape[1:] == SHAPE
    assert sample["spacing"] == (2.0, 2.0)
    assert ((sample["mask"].sum(axis=(1, 2)) > 0) == (sample["labels"] == 1)).all()
    (image, image_kwargs, image_kind), (mask, _, mask_kind) = sample_layers_lesions()
    assert (image_kind, mask_kind) == ("image", "labels")
    np.testing.assert_array_equal(mask, sample["mask"])
    assert image_kwargs["scale"] == (2.0, 2.0)


# ---------------------------------------------------------------- the networks
def test_classifier_shapes_and_size():
    x = torch.rand(3, 1, *SHAPE)
    cnn = LesionCNN()
    assert cnn(x).shape == (3, 2)
    assert 100_000 < sum(p.numel() for p in cnn.parameters()) < 1_000_000
    tw = TWClassifier()
    logits, maps = tw.heatmaps(x)
    assert logits.shape == (3, 2) and maps.shape == (3, 2, *SHAPE)
    torch.testing.assert_close(logits, tw(x))


def test_tw_decoder_has_no_weights_of_its_own():
    tw = TWClassifier()
    assert {name for name, _ in tw.named_parameters()} == {f"encoder.{n}" for n, _ in LesionCNN().named_parameters()}


def _captum_lrp(encoder: LesionCNN, x: torch.Tensor, target: int, epsilon: float) -> torch.Tensor:
    for layer in encoder.layer_sequence():  # fresh rules per call: Captum's rules keep state
        if not isinstance(layer, torch.nn.ReLU):
            layer.rule = EpsilonRule(epsilon=epsilon)
    return LRP(encoder).attribute(x, target=target)[:, 0].detach()


@pytest.mark.parametrize("epsilon", [1e-3, 1e-6])
def test_tw_decoder_equals_captum_lrp_of_its_encoder(epsilon):
    torch.manual_seed(0)
    tw = TWClassifier(epsilon=epsilon)
    x = torch.rand(3, 1, 48, 32)
    with torch.no_grad():
        tw(torch.rand(8, 1, 48, 32) * 2)  # batch-norm running statistics that are not (0, 1)
        tw.encoder.classifier.weight.mul_(50.0)  # make the logits of the two classes differ clearly
    tw.eval()
    _, maps = tw.heatmaps(x)
    for target in (0, 1):
        reference = _captum_lrp(tw.encoder, x, target, epsilon)
        torch.testing.assert_close(maps[:, target].detach(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 0.1 * maps.abs().max()  # two different maps were compared


def test_tw_decoder_uses_the_encoder_weights():
    """Changing one encoder weight changes the decoder's map, and the map's loss has gradients on it."""
    torch.manual_seed(1)
    tw = TWClassifier()
    x = torch.rand(2, 1, 32, 32)
    _, before = tw.heatmaps(x)
    before.pow(2).sum().backward()
    first_conv = tw.encoder.features[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        first_conv.weight[0].mul_(-1.0)
        _, after = tw.heatmaps(x)
    assert (after - before.detach()).abs().max() > 1e-3 * before.abs().max()


# ---------------------------------------------------------------- the shipped models
@pytest.mark.parametrize("name", lesion_model_names())
def test_lesion_weights_are_small(name):
    assert demo_weights_path(name).stat().st_size < 700_000


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shipped_classifiers_classify_heldout_slices_above_chance(name, heldout):
    model = load_demo_model(name)
    assert model.kind == "classifier" and model.activation == "softmax"
    with torch.no_grad():
        logits = model(torch.from_numpy(heldout.images)[:, None])
    assert logits.shape == (len(heldout), 2)
    correct = int((logits.argmax(1).numpy() == heldout.labels).sum())
    n = len(heldout)
    # one-sided binomial test against guessing (p = 0.5): P(X >= correct) < 1e-3
    assert binomtest(correct, n, 0.5, alternative="greater").pvalue < 1e-3, f"{correct}/{n} correct"


@pytest.mark.parametrize("name", UNETS)
def test_shipped_unets_find_heldout_lesions(name, heldout):
    model = load_demo_model(name)
    positives = heldout.labels == 1
    with torch.no_grad():
        logits = model(torch.from_numpy(heldout.images[positives])[:, None])
    predicted = torch.sigmoid(logits)[:, 0].numpy() > 0.5
    truth = heldout.lesion_masks[positives] > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.3, f"pooled held-out Dice {dice:.2f}"
