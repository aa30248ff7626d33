"""Classifiers as a model kind: loading, class outcomes, every method on a classifier, LRP, heatmaps as masks."""

import json
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from classifier_networks import (
    DISTRACTOR,
    GAIN,
    PATCH,
    PatchClassifier,
    patch_classifier,
    patch_image,
    patch_mask,
    small_cnn,
)
from torch import nn

from napari_pdcr.engine.estimator import drive
from napari_pdcr.engine.scoring import region_scoring
from napari_pdcr.explanations import AttributionMap
from napari_pdcr.explanations.attribution import NEGATIVE_SUPPORTS, POSITIVE_SUPPORTS
from napari_pdcr.methods import (
    GradientXInput,
    IntegratedGradients,
    Lrp,
    Occlusion,
    RegionEffects,
    Rise,
    SegGradCam,
)
from napari_pdcr.metrics.segmentation import dice_and_iou, heatmap_mask, pointing_hit, score_heatmap
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.description import ModelDescription
from napari_pdcr.models.loading import ModelLoadError, load_model
from napari_pdcr.outcomes import Outcome

#: class 1's logit on patch_image(): GAIN x 64 patch pixels x relu(1.0 - 0.5)
PATCH_LOGIT = GAIN * 64 * 0.5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scores_of(model: SegmentationModel, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(image)[None])


# ---------------------------------------------------------------------- the kind, in every loader
def test_module_is_found_to_be_a_classifier_and_runs_as_one():
    network = small_cnn(2)
    model = load_model(network)
    assert model.kind == "classifier" and model.is_classifier and model.description.kind == "classifier"
    assert any(note.startswith("kind='classifier'") for note in model.description.inferred)
    assert (model.spatial_dims, model.in_channels, model.activation) == (2, 1, "softmax")
    x = torch.rand(3, 1, 24, 40)
    torch.testing.assert_close(scores_of(model, x[0].numpy()), network(x[:1]))
    assert model.identity()["kind"] == "classifier"


def test_classifier_in_torchscript_export_factory_and_bundle(tmp_path, monkeypatch):
    network = small_cnn(2)
    x = torch.rand(1, 1, 32, 32)
    expected = network(x).detach()

    script = tmp_path / "classifier.pt"
    torch.jit.save(torch.jit.script(network), script)
    exported = tmp_path / "classifier.pt2"
    torch.export.save(torch.export.export(network, (x,)), exported)  # static 32 x 32: no sliding window for it
    (tmp_path / "pdcr_classifier_factory.py").write_text(textwrap.dedent("""
        from classifier_networks import SmallCnn

        def build():
            return SmallCnn(2, 1, 3)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "weights.pth"
    torch.save(network.state_dict(), checkpoint)

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    densenet = {"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                "init_features": 4, "growth_rate": 4, "block_config": [2, 2]}
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": densenet}))
    from monai.networks.nets import DenseNet
    torch.manual_seed(0)
    bundle_network = DenseNet(**{k: v for k, v in densenet.items() if k != "_target_"}).eval()
    torch.save(bundle_network.state_dict(), bundle / "models" / "model.pt")

    for source, options, reference in (
        (script, {}, expected),
        (exported, {}, expected),
        ("pdcr_classifier_factory:build", {"checkpoint": checkpoint}, expected),
        (bundle, {}, bundle_network(x).detach()),
    ):
        model = load_model(source, trusted=True, **options)
        assert model.kind == "classifier", source
        assert model.sliding_window is None, source
        torch.testing.assert_close(scores_of(model, x[0].numpy()), reference)


def test_kind_contradictions_and_bad_kinds_are_clear_errors():
    with pytest.raises(ModelLoadError, match=r"kind='segmentation' but the model returns scores of shape \(1, 3\).*"
                                             r"set kind='classifier'"):
        load_model(small_cnn(2), description={"kind": "segmentation"})
    segmenter = nn.Conv2d(1, 2, 3, padding=1)
    with pytest.raises(ModelLoadError, match="kind='classifier' but .* it segments; set kind='segmentation'"):
        load_model(segmenter, description={"kind": "classifier", "spatial_dims": 2})
    with pytest.raises(ValueError, match="kind must be one of segmentation, classifier"):
        ModelDescription.from_dict({"kind": "detector"})
    with pytest.raises(ValueError, match="cannot be applied by sliding windows"):
        ModelDescription(kind="classifier", sliding_window={"roi_size": [32, 32]})
    with pytest.raises(ModelLoadError, match="cannot be applied by sliding windows"):
        load_model(small_cnn(2), description={"sliding_window": {"roi_size": [32, 32]}})
    with pytest.raises(ValueError, match="contradicts the model's description"):
        SegmentationModel(small_cnn(2), 2, 1, kind="segmentation", description=ModelDescription(kind="classifier"))
    wrong = SegmentationModel(segmenter, 2, 1, activation="softmax", kind="classifier")
    with pytest.raises(ValueError, match=r"must return \(N, K\) class scores"):
        scores_of(wrong, np.zeros((1, 8, 8), np.float32))


# ---------------------------------------------------------------------- class outcomes
def test_class_outcomes_are_the_logit_the_probability_at_t_and_the_hard_outcome():
    model = patch_classifier()
    base = scores_of(model, patch_image())[:, :, None]
    values = {}
    for kind in ("mean_logit", "mean_probability", "dice"):
        for channel in (0, 1):
            scoring = region_scoring(model, np.array([5, 6]), Outcome(kind, channel=channel, temperature=2.0))
            values[kind, channel] = scoring.set_base(base)
    assert values["mean_logit", 1] == pytest.approx(PATCH_LOGIT)
    assert values["mean_logit", 0] == pytest.approx(-PATCH_LOGIT)
    assert values["mean_probability", 1] == pytest.approx(100 / (1 + np.exp(-2 * PATCH_LOGIT / 2.0)))
    assert (values["dice", 1], values["dice", 0]) == (100.0, 0.0)  # class 1 is predicted, class 0 is not


def test_region_effects_explain_every_block_of_a_classifier_without_a_region():
    model = patch_classifier()
    for kind, drop in (("dice", -100.0), ("mean_logit", -PATCH_LOGIT)):
        explanation = RegionEffects(model, intervention="zero", outcome=kind, device="cpu").attribute(patch_image())
        expected = np.zeros((4, 4), np.float32)
        expected[1, 2] = drop  # zeroing the patch's block removes the class's evidence; no other block counts
        np.testing.assert_allclose(explanation.block_effects, expected, atol=1e-5)
        assert not explanation.target_region.any() and explanation.prediction.all()
        assert explanation.parameters["n_candidate_blocks"] == 16  # every block, no reach acceleration


def test_an_outcome_sweep_of_a_classifier_shares_its_draws():
    model = patch_classifier()
    outcomes = [Outcome("mean_probability", temperature=t) for t in (1.0, 4.0)]
    sweep = RegionEffects(model, intervention="zero", device="cpu")
    explanations = drive(sweep.iter_attribute_outcomes(patch_image(), None, outcomes))
    for explanation, t in zip(explanations, (1.0, 4.0), strict=True):
        assert explanation.base_outcome == pytest.approx(100 / (1 + np.exp(-2 * PATCH_LOGIT / t)))
        # without the patch both logits are 0: probability 50 %
        assert explanation.block_effects[1, 2] == pytest.approx(50 - explanation.base_outcome, abs=1e-4)


def test_a_segmentation_model_still_needs_its_region_and_a_classifier_defaults_to_its_predicted_class():
    segmenter = SegmentationModel(nn.Conv2d(1, 1, 3, padding=1), 2, 1)
    with pytest.raises(ValueError, match="segments, so its outcome is measured in a target region"):
        GradientXInput(segmenter, device="cpu").attribute(np.zeros((1, 16, 16), np.float32))
    network = small_cnn(2, n_classes=3)
    model = load_model(network)
    image = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    explanation = GradientXInput(model, device="cpu").attribute(image)
    predicted = int(network(torch.from_numpy(image)[None]).argmax())
    assert explanation.base_score == pytest.approx(float(network(torch.from_numpy(image)[None])[0, predicted]))


# ---------------------------------------------------------------------- every method finds the patch
#: (method, options, Dice bound at the 0.9 quantile, Dice bound with a bright distractor the score ignores)
METHOD_BOUNDS = [
    (RegionEffects, {"intervention": "zero", "outcome": "mean_probability"}, 0.9, 0.9),
    (Occlusion, {}, 0.9, 0.9),
    # Grad-CAM weights the layer's whole activation by pooled gradients: the distractor's activation shows too
    (SegGradCam, {}, 0.9, 0.6),
    (IntegratedGradients, {}, 0.9, 0.9),
    (GradientXInput, {}, 0.9, 0.9),
    # RISE's map is smooth at the scale of its cells: its mask spills over the patch's border
    (Rise, {"n_masks": 500, "cell_size": 8}, 0.6, 0.6),
    (Lrp, {}, 0.9, 0.9),
]


@pytest.mark.parametrize(("method", "options", "bound", "distracted_bound"), METHOD_BOUNDS,
                         ids=[m[0].__name__ for m in METHOD_BOUNDS])
def test_every_methods_mask_of_a_classifier_overlaps_the_patch_its_score_depends_on(method, options, bound,
                                                                                    distracted_bound):
    model = patch_classifier()
    for distractor, minimum in ((False, bound), (True, distracted_bound)):
        explanation = method(model, device="cpu", **options).attribute(patch_image(distractor), None, patch_mask())
        mask, score = score_heatmap(explanation, threshold=0.9)
        assert score.dice >= minimum, (distractor, score)
        assert score.pointing_hit, (distractor, score)
        if minimum == 0.9:
            assert not mask[DISTRACTOR].any()


# ---------------------------------------------------------------------- LRP
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lrp_epsilon_conserves_relevance_in_a_network_without_biases(spatial_dims):
    network = small_cnn(spatial_dims, bias=False)
    model = load_model(network)
    image = np.random.default_rng(1).random((1,) + (16,) * spatial_dims).astype(np.float32)
    method = Lrp(model, epsilon=1e-9, outcome=Outcome("mean_logit", channel=2), device="cpu")
    explanation = method.attribute(image)
    logit = float(network(torch.from_numpy(image)[None])[0, 2])
    assert explanation.attribution.sum() == pytest.approx(logit, rel=1e-4, abs=1e-6)
    assert abs(method.conservation_delta) <= 1e-4 * abs(logit) + 1e-6
    # the network is left as it was: no rule attributes, in-place ReLUs in place
    assert not any(hasattr(m, "rule") or hasattr(m, "activations") for m in network.modules())
    assert all(m.inplace for m in network.modules() if isinstance(m, nn.ReLU))


def test_lrp_epsilon_matches_the_rule_computed_by_hand():
    network = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.0]]))
        network[0].bias.copy_(torch.tensor([0.2, -0.1]))
        network[2].weight.copy_(torch.tensor([[1.5, -0.7]]))
        network[2].bias.copy_(torch.tensor([0.05]))

    class Image1d(nn.Module):  # (N, 1, 1, 3) "images" -> the dense network
        def __init__(self):
            super().__init__()
            self.flatten, self.dense = nn.Flatten(), network

        def forward(self, x):
            return self.dense(self.flatten(x))

    model = SegmentationModel(Image1d(), 2, 1, activation="sigmoid", kind="classifier")
    x = np.array([0.9, 0.2, 0.6])
    epsilon = 0.1
    explanation = Lrp(model, epsilon=epsilon, device="cpu").attribute(x.reshape(1, 1, 3).astype(np.float32))

    def stabilised(z):
        return z + epsilon * np.where(z >= 0, 1.0, -1.0)

    w1, b1 = network[0].weight.detach().numpy(), network[0].bias.detach().numpy()
    w2, b2 = network[2].weight.detach().numpy(), network[2].bias.detach().numpy()
    z1 = w1 @ x + b1
    a1 = np.maximum(z1, 0)
    z2 = w2 @ a1 + b2
    r1 = a1 * (w2.T @ (z2 / stabilised(z2)))  # R_j = a_j w_jk R_k / (z_k + eps sign z_k), R_k = z_k
    r0 = x * (w1.T @ (r1 / stabilised(z1)))
    np.testing.assert_allclose(explanation.attribution.ravel(), r0, rtol=1e-5)


def test_lrp_equals_the_tw_classifiers_own_decoder():
    from napari_pdcr.models.classifiers import LRP_EPSILON, TWClassifier

    torch.manual_seed(0)
    network = TWClassifier().eval()
    model = load_model(network, description={"spatial_dims": 2, "in_channels": 1, "divisible_by": 16})
    image = np.random.default_rng(0).random((1, 32, 48)).astype(np.float32)
    with torch.no_grad():
        _, maps = network.heatmaps(torch.from_numpy(image)[None])
    for channel in (0, 1):
        explanation = Lrp(model, epsilon=LRP_EPSILON, outcome=Outcome("mean_logit", channel=channel),
                          device="cpu").attribute(image)
        np.testing.assert_allclose(explanation.attribution, maps[0, channel].numpy(), rtol=1e-4,
                                   atol=1e-4 * float(maps[0, channel].abs().max()))


def test_lrp_refuses_segmentation_models_and_layers_without_a_rule():
    with pytest.raises(ValueError, match="LRP explains a classifier's class score"):
        Lrp(SegmentationModel(nn.Conv2d(1, 1, 3, padding=1), 2, 1))
    network = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2),
                            nn.Sigmoid())
    with pytest.raises(ValueError, match="no rule for the layer type.*GELU, Sigmoid"):
        Lrp(SegmentationModel(network, 2, 1, activation="none", kind="classifier"))


def test_lrp_is_offered_for_classifiers_only():
    from napari_pdcr.studies.methods import METHODS, methods_for

    classifier = SegmentationModel(small_cnn(), 2, 1, activation="none", kind="classifier")
    segmenter = SegmentationModel(nn.Conv2d(1, 1, 3, padding=1), 2, 1)
    assert methods_for(classifier) == list(METHODS) and "lrp" in METHODS
    assert methods_for(segmenter) == [name for name in METHODS if name != "lrp"]


# ---------------------------------------------------------------------- heatmap to segmentation
def test_dice_iou_and_the_pointing_game_of_known_masks():
    mask, truth = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    mask[0, :4] = True
    truth[0, 2:] = truth[1, 2:] = True  # 2 of mask's 4 pixels overlap truth's 4
    assert dice_and_iou(mask, truth) == pytest.approx((0.5, 1 / 3))
    support = np.zeros((4, 4))
    support[3, 0] = 2.0
    assert not pointing_hit(support, truth)
    assert pointing_hit(support, np.eye(4, dtype=bool)[::-1])  # (3, 0) is on the anti-diagonal
    # (3, 0) is 4 face-connected steps from (1, 2)
    assert pointing_hit(support, truth, tolerance=4) and not pointing_hit(support, truth, tolerance=3)


def test_a_map_is_cut_at_otsu_or_a_quantile_on_its_supporting_sign():
    values = np.zeros((10, 10))
    values[2:4, 2:4] = -5.0  # an ATE map: negative supports
    values[6:8, 6:8] = 4.0  # hurts: never in the mask
    values[0, :4] = -1.0  # weak support
    mask, cut = heatmap_mask(values, sign=NEGATIVE_SUPPORTS)
    expected = np.zeros((10, 10), bool)
    expected[2:4, 2:4] = True
    np.testing.assert_array_equal(mask, expected)
    assert 1.0 < cut <= 5.0
    # the supporting values are four 1s and four 5s: the 0.25 quantile is 1, the 0.75 quantile 5
    lenient, cut = heatmap_mask(values, threshold=0.25, sign=NEGATIVE_SUPPORTS)
    np.testing.assert_array_equal(lenient, expected | (values == -1.0))
    assert cut == 1.0
    strict, cut = heatmap_mask(values, threshold=0.75, sign=NEGATIVE_SUPPORTS)
    np.testing.assert_array_equal(strict, expected)
    flipped, _ = heatmap_mask(values, sign=POSITIVE_SUPPORTS)
    np.testing.assert_array_equal(flipped, values == 4.0)
    explanation = AttributionMap(attribution=values.astype(np.float32), target_region=np.zeros((10, 10), bool),
                                 prediction=np.zeros((10, 10), bool), reference=expected, method="test",
                                 sign=NEGATIVE_SUPPORTS)
    _, score = score_heatmap(explanation)  # the explanation's own reference
    assert (score.dice, score.iou, score.pointing_hit, score.mask_voxels) == (1.0, 1.0, True, 4)
    assert "Dice 1.00, IoU 1.00, pointing hit" == score.label()


@pytest.mark.parametrize(("values", "reference", "threshold", "message"), [
    (np.ones((4, 4)), np.eye(4, dtype=bool), "otsu", "same value .* everywhere"),
    (np.zeros((0, 4)), np.zeros((0, 4), bool), "otsu", "the map is empty"),
    (np.where(np.eye(4, dtype=bool), np.nan, 1.0), np.eye(4, dtype=bool), "otsu", "NaN or infinite"),
    (np.eye(4), np.zeros((4, 4), bool), "otsu", "the reference mask is empty"),
    (np.eye(4), np.eye(3, dtype=bool), "otsu", r"reference mask has shape \(3, 3\), not the map's \(4, 4\)"),
    (-np.eye(4), np.eye(4, dtype=bool), "otsu", "no supporting value"),
    (np.eye(4), np.eye(4, dtype=bool), 1.5, "quantile threshold must be between 0 and 1"),
    (np.eye(4), np.eye(4, dtype=bool), "mean", "threshold must be 'otsu' or a quantile"),
    (np.eye(4), None, "otsu", "no reference mask"),
])
def test_scoring_edge_cases_are_clear_errors(values, reference, threshold, message):
    with pytest.raises(ValueError, match=message):
        score_heatmap(values, reference, threshold=threshold, sign=POSITIVE_SUPPORTS)


def test_patch_classifier_is_what_the_tests_assume():
    network = PatchClassifier()
    logits = network(torch.from_numpy(patch_image(distractor=True))[None])
    torch.testing.assert_close(logits, torch.tensor([[-PATCH_LOGIT, PATCH_LOGIT]]))
    assert patch_mask().sum() == 64 and patch_mask()[PATCH].all()


def test_bundle_zip_of_a_classifier_reads_its_kind_from_pdcr_json(tmp_path):
    root = tmp_path / "src" / "cls_bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    network = torch.jit.script(small_cnn(2))
    torch.jit.save(network, root / "models" / "model.ts")
    (root / "configs" / "inference.json").write_text("{}")
    (root / "pdcr.json").write_text(json.dumps({"kind": "classifier", "channel": 2}))
    archive = tmp_path / "cls_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.rglob("*"):
            zf.write(path, path.relative_to(root.parent))
    model = load_model(archive, trusted=True)
    assert (model.kind, model.description.channel) == ("classifier", 2)


def test_a_classifiers_saved_map_in_a_viewer_gets_its_scored_mask(tmp_path):
    from napari.components import ViewerModel

    from napari_pdcr._napari.layers import METADATA_KEY
    from napari_pdcr.explanations import Explanation

    model = patch_classifier()
    explanation = RegionEffects(model, intervention="zero", outcome="mean_logit", device="cpu").attribute(
        patch_image(distractor=True), None, patch_mask())
    reopened = Explanation.load(explanation.save(tmp_path / "classifier"))
    assert reopened.model_identity["kind"] == "classifier"
    viewer = ViewerModel()
    layers = reopened.add_to_viewer(viewer)
    mask_layer = layers[-1]
    assert mask_layer.name == "patch classifier ATE mask (Dice 1.00, IoU 1.00, pointing hit)"
    np.testing.assert_array_equal(mask_layer.data, patch_mask())
    assert mask_layer.metadata[METADATA_KEY]["segmentation_score"]["dice"] == 1.0
    # without a ground truth, or for a map that gives no mask, no mask layer
    blank = RegionEffects(model, intervention="zero", outcome="mean_logit", device="cpu").attribute(
        np.zeros((1, 32, 32), np.float32), None, patch_mask())
    assert not any("mask" in layer.name for layer in blank.add_to_viewer(ViewerModel()))
    unscored = Lrp(model, device="cpu").attribute(patch_image())
    assert [layer.name for layer in unscored.add_to_viewer(ViewerModel())] == ["patch classifier lrp"]


def test_faithfulness_curves_of_a_classifiers_maps_beat_the_random_floor():
    from napari_pdcr.studies.methods import compare_methods

    model = patch_classifier()
    bank = [np.random.default_rng(i).uniform(0, 1, (1, 32, 32)).astype(np.float32) for i in range(3)]
    comparison = compare_methods(model, patch_image(distractor=True), None,
                                 ["gradient_x_input", Lrp(model, device="cpu")], patch_mask(), bank=bank,
                                 device="cpu", n_steps=5)
    rows = {row["method"]: row for row in comparison.table}
    for name in ("gradient_x_input", "lrp"):
        # the patch's block is deleted first: the class probability falls sooner than in a random order
        assert rows[name]["deletion auc (blur, soft_dice)"] < rows["random"]["deletion auc (blur, soft_dice)"] - 0.03
        assert rows[name]["insertion auc (blur, soft_dice)"] > rows["random"]["insertion auc (blur, soft_dice)"]
