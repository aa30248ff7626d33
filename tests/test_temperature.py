"""Temperature: calibration (fit_temperature, ECE, NLL), the temperature sweep on shared draws,
the calibrated T in descriptions and provenance, and the temperature-series demo models."""

import os

import numpy as np
import pytest
import torch
from synthetic import LocalConv, random_image, torch_threads, wrap
from torch import nn

from napari_pdcr import Noise, Outcome, RegionEffects, centered_box
from napari_pdcr.calibration import (
    PixelLogits,
    calibrate,
    calibration_measures,
    fit_temperature,
    reliability_diagram,
)
from napari_pdcr.models.demo import DEMO_MODELS, TEMPERATURE_SERIES, load_demo_model
from napari_pdcr.studies.temperature_sweep import temperature_sweep


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


class Scaled(nn.Module):
    """Logits ``factor * x``: the input holds calibrated logits, the model is ``factor`` times overconfident."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def calibrated_logit_images(n: int = 8, size: int = 96, seed: int = 0):
    """Images of calibrated logits ``c ~ N(0, 2^2)`` and masks drawn as ``Bernoulli(sigmoid(c))``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, 1, size, size)).astype(np.float32)
    masks = rng.random((n, size, size)) < 1 / (1 + np.exp(-logits[:, 0]))
    return list(logits), list(masks)


@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_fit_temperature_recovers_a_known_temperature(factor):
    images, masks = calibrated_logit_images()
    model = wrap(Scaled(factor), 2, activation="sigmoid")
    fit = fit_temperature(model, images, masks)
    assert fit.converged
    assert fit.temperature == pytest.approx(factor, rel=0.05)
    assert fit.after.nll <= fit.before.nll  # before: T = 1 (no description)
    assert fit.before.temperature == 1.0 and fit.after.temperature == fit.temperature
    assert fit.after.ece < fit.before.ece
    assert fit.n_pixels == 8 * 96 * 96


def test_fit_temperature_on_a_labelled_region_of_one_image():
    images, masks = calibrated_logit_images(n=1, size=160)
    region = np.zeros((160, 160), bool)
    region[20:140, 20:140] = True
    fit = fit_temperature(wrap(Scaled(2.0), 2, activation="sigmoid"), images[0], masks[0], regions=region)
    assert fit.n_pixels == 120 * 120
    assert fit.temperature == pytest.approx(2.0, rel=0.05)


def test_fit_temperature_softmax_model():
    rng = np.random.default_rng(1)
    calibrated = rng.normal(0.0, 1.5, size=(4, 3, 64, 64)).astype(np.float32)
    p = np.exp(calibrated) / np.exp(calibrated).sum(axis=1, keepdims=True)
    cumulative = p.cumsum(axis=1)
    u = rng.random((4, 1, 64, 64))
    labels = (u > cumulative[:, :-1]).sum(axis=1)  # class index drawn from p
    model = wrap(Scaled(2.5), 2, activation="softmax", in_channels=3)
    fit = fit_temperature(model, list(calibrated), list(labels))
    assert fit.temperature == pytest.approx(2.5, rel=0.05)
    assert fit.after.nll <= fit.before.nll


def test_nll_after_fitting_is_not_worse_than_at_t1_on_a_demo_model():
    from napari_pdcr.samples import colin27_split, load_sample

    stack = load_sample("colin27_slices")
    _, heldout = colin27_split()
    images = [image[None] for image in stack["image"][heldout][:3]]
    fit = fit_temperature(load_demo_model("unet2d"), images, list(stack["mask"][heldout][:3]))
    assert fit.after.nll <= fit.before.nll
    assert fit.before.temperature == 1.0


def perfectly_calibrated(n: int = 400_000, seed: int = 0) -> PixelLogits:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.001, 0.999, n)
    labels = torch.from_numpy((rng.random(n) < p).astype(np.int64))
    return PixelLogits(logits=torch.from_numpy(np.log(p / (1 - p))).float(), labels=labels, activation="sigmoid", n_images=1)


def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero():
    pixels = perfectly_calibrated()
    calibrated = calibration_measures(pixels, 1.0)
    assert calibrated.ece < 0.005 and calibrated.adaptive_ece < 0.005
    # the same pixels made overconfident: far from calibrated
    overconfident = calibration_measures(pixels, 0.25)
    assert overconfident.ece > 0.1 and overconfident.adaptive_ece > 0.1
    assert overconfident.nll > calibrated.nll and overconfident.brier > calibrated.brier
    # Brier of a calibrated predictor with p ~ U(0, 1): E[p(1 - p)] = 1/6
    assert calibrated.brier == pytest.approx(1 / 6, abs=0.003)


def test_reliability_diagram_follows_the_diagonal_when_calibrated():
    diagram = reliability_diagram(perfectly_calibrated(), 1.0)
    assert len(diagram.confidence) == 15 and len(diagram.edges) == 16
    assert diagram.proportion.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(diagram.frequency, diagram.confidence, atol=0.01)
    inside = (diagram.confidence >= diagram.edges[:-1]) & (diagram.confidence <= diagram.edges[1:])
    assert inside.all()


# ---------------------------------------------------------------------------- bad inputs
def test_fit_temperature_bad_inputs_say_what_is_wrong():
    images, masks = calibrated_logit_images(n=1, size=32)
    model = wrap(Scaled(1.0), 2, activation="sigmoid")
    with pytest.raises(ValueError, match="masks are empty"):
        fit_temperature(model, images, [np.zeros((32, 32), bool)])
    with pytest.raises(ValueError, match="only one class"):
        fit_temperature(model, images, [np.ones((32, 32), bool)])
    with pytest.raises(ValueError, match="regions hold no pixels"):
        fit_temperature(model, images, masks, regions=[np.zeros((32, 32), bool)])
    with pytest.raises(ValueError, match="mask 0 has shape"):
        fit_temperature(model, images, [np.ones((16, 16), bool)])
    probabilities = wrap(nn.Sigmoid(), 2, activation="sigmoid")
    with pytest.raises(ValueError, match="look like probabilities, not logits"):
        fit_temperature(probabilities, images, masks)
    with pytest.raises(ValueError, match="temperature scaling needs logits"):
        fit_temperature(wrap(nn.Sigmoid(), 2, activation="none"), images, masks)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        Outcome("soft_dice").at_temperature(0.0)
    with pytest.raises(ValueError, match="temperature"):
        calibration_measures(perfectly_calibrated(1000), -1.0)
    model = wrap(LocalConv(2, layers=2), 2, activation="sigmoid")
    image = random_image((1, 32, 32))
    with pytest.raises(ValueError, match="temperature"):
        temperature_sweep(model, image, centered_box((32, 32), (16, 16), 8), temperatures=(1.0, 0.0), block_shape=4)


# ---------------------------------------------------------------------------- the sweep
SWEEP = dict(block_shape=4, n_screen=3, n_estimate=6, tau=0.05, seed=3)


def sweep_case():
    model = wrap(LocalConv(2, layers=3, global_weight=0.5), 2, activation="sigmoid")
    return model, random_image((1, 32, 32), seed=2), centered_box((32, 32), (16, 16), 8)


@pytest.mark.parametrize("mode", ["exact", "published"])
def test_sweep_equals_separate_runs_with_the_same_seed(mode):
    model, image, region = sweep_case()
    temperatures = (0.5, 1.0, 2.0, 4.0)
    sweep = temperature_sweep(
        model, image, region, temperatures, outcome="soft_dice", intervention=Noise(), mode=mode, **SWEEP
    )
    assert sweep.temperatures == list(temperatures) and len(sweep.explanations) == 4
    separate_passes = 0
    for t, explained in zip(temperatures, sweep.explanations, strict=True):
        alone = RegionEffects(model, Noise(), Outcome("soft_dice", temperature=t), mode=mode, **SWEEP).attribute(image, region)
        separate_passes += alone.forward_passes
        np.testing.assert_array_equal(explained.block_effects, alone.block_effects)
        np.testing.assert_array_equal(explained.block_standard_error, alone.block_standard_error)
        np.testing.assert_array_equal(explained.block_status, alone.block_status)
        np.testing.assert_array_equal(explained.block_draws, alone.block_draws)
        assert explained.base_outcome == alone.base_outcome
        assert explained.parameters["outcome"]["temperature"] == t
    maps = [e.block_effects for e in sweep.explanations]
    assert not np.array_equal(maps[0], maps[-1])  # soft outcomes see T
    assert sweep.forward_passes < separate_passes / 2  # one set of forward passes, not four


def test_hard_dice_sweep_is_blind_to_temperature():
    model, image, region = sweep_case()
    sweep = temperature_sweep(model, image, region, (0.5, 2.0), outcome="dice", intervention=Noise(), **SWEEP)
    np.testing.assert_array_equal(sweep.explanations[0].block_effects, sweep.explanations[1].block_effects)
    rows = sweep.table()
    assert [r["temperature"] for r in rows] == [0.5, 2.0]
    assert {"total_abs_effect", "locality@16", "positive", "negative", "zero"} <= set(rows[0])


def test_sweep_refuses_adaptive_draws():
    model, image, region = sweep_case()
    with pytest.raises(ValueError, match="mode='exact'"):
        temperature_sweep(model, image, region, (0.5, 2.0), outcome="soft_dice", intervention=Noise(), mode="fast", **SWEEP)


def test_sweep_figure_has_one_map_per_temperature(tmp_path):
    model, image, region = sweep_case()
    sweep = temperature_sweep(model, image, region, (0.5, 1.0, 4.0), outcome="soft_dice", intervention=Noise(), **SWEEP)
    figure = sweep.figure(image[0])
    titles = [ax.get_title() for ax in figure.axes]
    assert sum(title.startswith("T = ") for title in titles) == 3
    assert {"mass", "locality", "signs"} <= set(titles)
    figure.savefig(tmp_path / "sweep.png")


# ---------------------------------------------------------------------------- calibrated T stored
def test_calibrated_temperature_is_stored_and_used_and_recorded_in_provenance():
    images, masks = calibrated_logit_images(n=2, size=64)
    model = wrap(Scaled(3.0), 2, activation="sigmoid")
    fit = calibrate(model, images, masks)
    assert model.description.temperature == fit.temperature
    assert model.description.calibration["temperature"] == fit.temperature
    assert model.description.calibration["after"]["nll"] == fit.after.nll
    # soft outcomes now default to the calibrated T, and every result records it
    method = RegionEffects(model, "zero", "soft_dice", block_shape=8)
    assert method.outcome.temperature == fit.temperature
    explanation = method.attribute(images[0], centered_box((64, 64), (32, 32), 16))
    assert explanation.provenance["model_temperature"] == fit.temperature
    assert explanation.provenance["calibration"]["n_pixels"] == fit.n_pixels
    # a sweep labels the calibrated temperature and adds it to the defaults
    sweep = temperature_sweep(model, images[0], centered_box((64, 64), (32, 32), 16), (1.0, 2.0), outcome="soft_dice", block_shape=8)
    assert fit.temperature in sweep.temperatures
    assert any(label.startswith("calibrated T = ") for label in sweep.labels)


# ---------------------------------------------------------------------------- demo models
def test_temperature_series_demo_models():
    assert sorted(TEMPERATURE_SERIES.values()) == [0.5, 1.0, 2.0, 4.0]
    unet = DEMO_MODELS["unet2d"]
    for name, t_train in TEMPERATURE_SERIES.items():
        spec = DEMO_MODELS[name]
        assert spec.training_temperature == t_train
        assert type(spec.build()) is type(unet.build()) and spec.divisible_by == unet.divisible_by
        model = load_demo_model(name)
        assert model.description.temperature == t_train  # its probabilities are sigmoid(z / T_train)
        assert model.description.calibration is None


# ---------------------------------------------------------------------------- the widget
@pytest.mark.gui
def test_widget_fits_the_temperature_from_a_labels_layer(make_napari_viewer, qtbot, tmp_path):
    pytest.importorskip("qtpy")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample("napari-pdcr", "colin27_slice")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pdcr", "Region effects (ATE map)")
    widget.model_choice.setCurrentText("unet2d")
    assert widget.calibrated_label.text() == "calibrated T = not fitted" and not widget.at_calibrated.isEnabled()
    assert widget.calibration_labels.currentText() == "colin27_slice brain mask"
    seen = []
    widget.fit_temperature()
    widget.worker.yielded.connect(lambda progress: seen.append(progress.stage))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    t = widget.calibrated_temperature
    assert t is not None and t > 0
    assert widget.calibrated_label.text().startswith(f"calibrated T = {t:.3f} (")
    assert "fit" in seen
    # the cached model now carries the fitted T in its description
    from napari_pdcr.jobs import _cached_model, resolve_model

    assert resolve_model("unet2d").description.temperature == t
    _cached_model.cache_clear()  # later tests get the demo model as shipped
    widget.at_calibrated.setChecked(True)
    assert widget.temperature.value() == pytest.approx(t, abs=0.005) and not widget.temperature.isEnabled()
    widget.grab().save(str(tmp_path / "temperature_widget.png"))
    if os.environ.get("PDCR_SCREENSHOTS"):
        widget.grab().save(os.path.join(os.environ["PDCR_SCREENSHOTS"], "temperature_widget.png"))
    # a labels layer that does not match the image is refused with a sentence, nothing starts
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    widget.calibration_labels.setCurrentText("small")
    widget.fit_temperature()
    assert widget.worker is None
    widget.model_choice.setCurrentText("shallow2d")
    assert widget.calibrated_temperature is None and not widget.at_calibrated.isChecked()
    assert widget.temperature.isEnabled()
