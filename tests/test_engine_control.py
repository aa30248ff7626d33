"""Control of an engine run: progress, cancellation, out-of-memory back-off, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import (
    NaNModel,
    OOMModel,
    ShrinkingModel,
    TapModel,
    ZeroBlockNaNModel,
    random_image,
    tap_model,
    torch_threads,
    wrap,
)

from napari_pdcr import (
    CallableIntervention,
    Cancelled,
    NodeStatus,
    Outcome,
    PatchBank,
    Progress,
    RegionEffects,
    RegionExplanation,
    box_region,
    centered_box,
    make_intervention,
)
from napari_pdcr.engine.estimator import BatchRunner, NodeSet, drive, is_out_of_memory


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


B = 4
TAPS = [((-2, 1), 2.0), ((0, 0), 1.0), ((2, -3), -1.5), ((1, 3), 0.004)]


def make_model(activation="none"):
    model, _ = tap_model(2, B, TAPS, activation=activation)
    return model


def image_and_region():
    return random_image((1, 32, 32), seed=1), box_region((32, 32), (13, 13), 6)


def bank():
    return PatchBank([random_image((1, 32, 32), s) for s in (50, 51)], size=200, seed=0)


def collect(generator):
    """All progress items of a run generator and its result."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as stop:
            return items, stop.value


# ---------------------------------------------------------------------------- progress


@pytest.mark.parametrize("mode", ["published", "exact", "fast"])
def test_progress_is_monotone_and_ends_complete(mode):
    image, region = image_and_region()
    method = RegionEffects(make_model(), bank(), "mean_logit", block_shape=B, n_estimate=30, batch_size=16, mode=mode, se_target=0.005)
    items, result = collect(method.iter_attribute(image, region))
    assert isinstance(result, RegionExplanation)
    assert len(items) > 3 and all(isinstance(p, Progress) for p in items)
    for p in items:
        assert 0 <= p.done <= p.total, p
        assert 0.0 <= p.fraction <= 1.0
        assert p.eta_s is None if p.done == 0 else p.eta_s >= 0
    # the estimator's stages: done strictly increases, forward passes never decrease
    work = [p for p in items if p.stage in ("screen", "estimate", "refine")]
    assert [p.stage for p in work][0] == "screen"
    assert all(b.done > a.done for a, b in zip(work, work[1:], strict=False))
    assert all(b.forward_passes >= a.forward_passes for a, b in zip(work, work[1:], strict=False))
    # every stage ends complete, and so does the run
    for i, p in enumerate(items):
        if i + 1 == len(items) or items[i + 1].stage != p.stage:
            assert p.done == p.total, (p, "a stage ended incomplete")
    assert items[-1].done == items[-1].total and items[-1].fraction == 1.0
    assert items[-1].forward_passes <= result.forward_passes
    if mode == "exact":
        assert items[0].stage == "reach"
    if mode == "fast":
        assert "refine" in {p.stage for p in items}


def test_progress_callback_sees_every_step():
    image, region = image_and_region()
    method = RegionEffects(make_model(), bank(), "mean_logit", block_shape=B, n_estimate=10, batch_size=16)
    seen = []
    result = method.attribute(image, region, progress=lambda p: seen.append(p))  # returns None: go on
    items, generated = collect(method.iter_attribute(image, region))
    assert [(p.stage, p.done, p.total) for p in seen] == [(p.stage, p.done, p.total) for p in items]
    np.testing.assert_array_equal(result.block_effects, generated.block_effects)


# ---------------------------------------------------------------------------- cancellation


class CountingTap(TapModel):
    calls = 0

    def forward(self, x):
        CountingTap.calls += 1
        return super().forward(x)


def counting_model():
    net = CountingTap(2, B, TAPS)
    return wrap(net, 2, divisible_by=B)


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_closing_the_generator_cancels_cleanly(mode):
    image, region = image_and_region()
    model = counting_model()
    method = RegionEffects(model, bank(), "mean_logit", block_shape=B, n_estimate=10, batch_size=8, mode=mode)
    gen = method.iter_attribute(image, region)
    for _ in range(3):
        next(gen)
    gen.close()  # no exception leaks out
    calls = CountingTap.calls
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value is None  # no result, not even a partial one
    assert CountingTap.calls == calls  # no work after the cancel
    # the method and its intervention are still usable, and give the full result
    full = method.attribute(image, region)
    again = RegionEffects(model, bank(), "mean_logit", block_shape=B, n_estimate=10, batch_size=8, mode=mode).attribute(image, region)
    np.testing.assert_array_equal(full.block_effects, again.block_effects)


def test_progress_returning_false_raises_cancelled():
    image, region = image_and_region()
    method = RegionEffects(counting_model(), bank(), "mean_logit", block_shape=B, n_estimate=10, batch_size=8)
    with pytest.raises(Cancelled, match="cancelled"):
        method.attribute(image, region, progress=lambda p: False)

    seen = []

    def stop_at_third_estimation_batch(p):
        seen.append(p)
        return sum(q.stage != "reach" for q in seen) < 3  # the reach probe reports first

    with pytest.raises(Cancelled):
        method.attribute(image, region, progress=stop_at_third_estimation_batch)
    assert seen[-1].stage != "reach" and sum(q.stage != "reach" for q in seen) == 3
    # the callback is not called again after it said stop, and the run stopped mid-stage
    assert seen[-1].done < seen[-1].total


def test_drive_returns_the_generator_value():
    def gen():
        yield Progress("x", 1, 2, 1, 0.0)
        yield Progress("x", 2, 2, 2, 0.0)
        return "result"

    assert drive(gen()) == "result"
    assert drive(gen(), lambda p: None) == "result"
    with pytest.raises(Cancelled):
        drive(gen(), lambda p: p.done < 2)


# ---------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("mode", ["published", "exact", "fast"])
def test_out_of_memory_backs_off_and_gives_the_same_result(mode):
    image, region = image_and_region()
    oom = OOMModel(TapModel(2, B, TAPS), max_batch=5)
    model = wrap(oom, 2, divisible_by=B)
    kw = dict(intervention=bank(), outcome="mean_logit", block_shape=B, n_estimate=12, mode=mode)
    backed_off = RegionEffects(model, batch_size=32, **kw).attribute(image, region)
    small = RegionEffects(make_model(), batch_size=4, **kw).attribute(image, region)
    np.testing.assert_array_equal(backed_off.block_effects, small.block_effects)
    np.testing.assert_array_equal(backed_off.block_standard_error, small.block_standard_error)
    np.testing.assert_array_equal(backed_off.block_status, small.block_status)
    assert oom.n_oom > 0 and max(oom.batch_sizes) <= 5
    assert any("out of memory" in line and "batch size reduced to 4" in line for line in backed_off.log), backed_off.log
    assert not any("out of memory" in line for line in small.log)
    assert backed_off.parameters["batch_size"] == 32 and backed_off.parameters["batch_size_after_backoff"] == 4
    assert small.parameters["batch_size_after_backoff"] == 4


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_out_of_memory_at_batch_one_is_a_clear_memory_error(mode):
    image, region = image_and_region()
    model = wrap(OOMModel(TapModel(2, B, TAPS), max_batch=0), 2, divisible_by=B)
    with pytest.raises(MemoryError, match="out of memory even with one image"):
        RegionEffects(model, "zero", "mean_logit", block_shape=B, batch_size=4, mode=mode).attribute(image, region)


class FakeNodes(NodeSet):
    """Outcome = node index; raises a given error for batches above ``max_batch``."""

    def __init__(self, max_batch, error=None):
        self.max_batch, self.error, self.sizes = max_batch, error, []

    @property
    def n_nodes(self):
        return 100

    def base_outcome(self):
        return 0.0

    def sample(self, node, n_draws, rng):
        return torch.zeros(n_draws, 1)

    def outcomes(self, nodes, replacements):
        if len(nodes) > self.max_batch:
            raise self.error or RuntimeError("CUDA out of memory")
        self.sizes.append(len(nodes))
        return torch.tensor(nodes, dtype=torch.float32)


def test_batch_runner_backoff_and_errors():
    runner = BatchRunner(16)
    nodes = FakeNodes(max_batch=3)
    out = runner.run(nodes, list(range(20)), [torch.zeros(1)] * 20)
    np.testing.assert_array_equal(out.numpy(), np.arange(20))
    assert runner.batch_size == 2 and max(nodes.sizes) == 2 and runner.forward_passes == 20
    assert runner.backoffs == [f"out of memory: batch size reduced to {b}" for b in (8, 4, 2)]

    with pytest.raises(MemoryError, match="one image per batch"):
        BatchRunner(4).run(FakeNodes(max_batch=0), [1, 2], [torch.zeros(1)] * 2)
    # other errors are not swallowed, and do not trigger a back-off
    runner = BatchRunner(8)
    with pytest.raises(ValueError, match="boom"):
        runner.run(FakeNodes(max_batch=0, error=ValueError("boom")), [1, 2], [torch.zeros(1)] * 2)
    assert runner.batch_size == 8 and runner.backoffs == []


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------------------- bad input


def run(model=None, image=None, region=None, reference=None, **kw):
    d_image, d_region = image_and_region()
    kw = {"intervention": "zero", "outcome": "mean_logit", "block_shape": B, **kw}
    return RegionEffects(model or make_model(), **kw).attribute(
        d_image if image is None else image, d_region if region is None else region, reference
    )


@pytest.mark.parametrize(
    "region, message",
    [
        (np.zeros((32, 32), bool), "empty"),
        (np.ones((32, 31), bool), r"shape \(32, 31\)"),
        (np.ones((1, 32, 32), bool), "spatial shape"),
        (np.full((32, 32), np.nan), "NaN"),
    ],
    ids=["empty", "wrong-shape", "with-channel-axis", "nan"],
)
def test_bad_region(region, message):
    with pytest.raises(ValueError, match=message):
        run(region=region)


def test_region_outside_the_image():
    with pytest.raises(ValueError, match="does not lie inside"):
        box_region((32, 32), (30, 10), 4)
    with pytest.raises(ValueError, match="does not lie inside"):
        box_region((32, 32), (-1, 10), 4)
    with pytest.raises(ValueError, match="one entry per axis"):
        box_region((32, 32), (3, 3, 3), 4)
    # a centred box is clipped into the image instead
    box = centered_box((32, 32), (31, 0), 8)
    assert box.sum() == 64 and box[31, 0] and box[24, 7]
    # a non-bool mask is accepted as "non-zero"
    weights = np.zeros((32, 32))
    weights[14:18, 14:18] = 0.5
    assert run(region=weights).target_region.sum() == 16


def test_bad_reference():
    with pytest.raises(ValueError, match="reference mask"):
        run(reference=np.ones((16, 16), bool), outcome="dice")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((2, 32, 32), np.float32), "expects 1 input channel"),
        (np.zeros((1, 8, 32, 32), np.float32), "expects a 2D image"),
        (np.zeros((32, 32), np.float32), "expects a 2D image"),
    ],
    ids=["channels", "3d-for-2d", "no-channel-axis"],
)
def test_image_does_not_fit_the_model(image, message):
    with pytest.raises(ValueError, match=message):
        run(image=image, region=np.ones(image.shape[-2:], bool))


def test_nan_in_the_image():
    image, _ = image_and_region()
    image[0, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(image=image)
    image[0, 3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(image=image)


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_nan_from_the_model(mode):
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        run(model=wrap(NaNModel(), 2), mode=mode)


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_non_finite_only_for_intervened_inputs(mode):
    """NaN as soon as a block is all zeros: finite on the image, not under zero ablation."""
    model = wrap(ZeroBlockNaNModel(2, B, TAPS), 2, divisible_by=B)
    image, region = image_and_region()
    image += 0.5
    assert np.isfinite(run(model=model, image=image, intervention=make_intervention("constant", value=1.0)).block_effects).all()
    with pytest.raises(FloatingPointError, match="non-finite|NaN or infinite"):
        run(model=model, image=image, mode=mode)


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_model_output_of_the_wrong_size(mode):
    with pytest.raises(ValueError, match="spatial size|shape"):
        run(model=wrap(ShrinkingModel(), 2), mode=mode)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(intervention="smudge"), ValueError, "unknown intervention 'smudge'; choose one of patch_bank, zero"),
        (dict(intervention="patch_bank"), ValueError, "needs other images"),
        (dict(outcome="iou"), ValueError, "unknown outcome 'iou'; choose one of dice"),
        (dict(mode="turbo"), ValueError, "mode must be one of published, exact, fast"),
        (dict(precision="int8"), ValueError, "precision must be one of"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer; got 0"),
        (dict(n_estimate=0), ValueError, "n_estimate must be a positive integer; got 0"),
        (dict(n_screen=-1), ValueError, "n_screen must be a non-negative integer; got -1"),
        (dict(tau=-0.1), ValueError, "tau must be a finite number >= 0; got -0.1"),
        (dict(device="cuda:7" if not torch.cuda.is_available() else "nope"), (RuntimeError, ValueError), "not available|device"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_bad_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        RegionEffects(make_model(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_shape=(4, 4, 4)), "block_shape must be"),
        (dict(block_shape=0), "block_shape must be"),
        (dict(outcome=Outcome("mean_logit", channel=3)), "channel 3 does not exist"),
        (dict(intervention=CallableIntervention(lambda o, n, rng: torch.zeros(n, 1, 2, 2), "tiny")), "returned shape"),
        (dict(intervention=PatchBank([np.zeros((3, 16, 16), np.float32)])), "model's input space"),
    ],
    ids=["block-dims", "block-zero", "channel", "callable-shape", "bank-channels"],
)
def test_bad_parameters_at_run_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(**kwargs)


def test_bad_outcome_and_intervention_objects():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Outcome("soft_dice", temperature=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        PatchBank([np.full((1, 8, 8), np.nan, np.float32)])
    with pytest.raises(ValueError, match="at least one source"):
        PatchBank([])
    with pytest.raises(ValueError, match="same C"):
        PatchBank([np.zeros((1, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32)])
    with pytest.raises(ValueError, match="large enough"):
        PatchBank([np.zeros((1, 2, 2), np.float32)]).bank((4, 4))
    with pytest.raises(ValueError, match="unknown intervention"):
        make_intervention("gauss")
    with pytest.raises(ValueError, match="choose the channel"):
        run(model=tap_model(2, B, TAPS, bias=(0.0, 0.0), gain=(1.0, 2.0))[0])


def test_3d_region_for_a_2d_model_and_back():
    model3d, _ = tap_model(3, B, [((0, 0, 1), 1.0)])
    image3d = random_image((1, 16, 16, 16), seed=2)
    with pytest.raises(ValueError, match="spatial shape"):
        RegionEffects(model3d, "zero", "mean_logit", block_shape=B).attribute(image3d, np.ones((16, 16), bool))
    ex = RegionEffects(model3d, "zero", "mean_logit", block_shape=B).attribute(image3d, box_region((16,) * 3, (4, 4, 4), 4))
    assert ex.block_effects.shape == (4, 4, 4)
    assert (ex.block_status == NodeStatus.TARGET).sum() == 1


def test_region_covering_every_block():
    """Nothing to estimate: every block touches the region; said before any forward pass."""
    image, _ = image_and_region()
    for mode in ("published", "exact", "fast"):
        method = RegionEffects(make_model(), bank(), "mean_logit", block_shape=B, mode=mode)
        with pytest.raises(ValueError, match="covers every block"):
            collect(method.iter_attribute(image, box_region((32, 32), (2, 2), 28)))
