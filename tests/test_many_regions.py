"""Many regions in one run: ``RegionEffects(...).attribute(image, regions=labels)``.

Every label's explanation must equal a run for that region alone with the same seed,
and the shared run must cost the forward passes of one run over the union of the
regions' needs, not one run per region.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import LocalConv, random_image, tap_model, torch_threads, wrap

from napari_pdcr import PatchBank, RegionEffects, box_region
from napari_pdcr.engine.estimator import NodeStatus
from napari_pdcr.engine.reach import iter_reachable_blocks_of_regions, reachable_blocks
from napari_pdcr.explanations.base import Explanation
from napari_pdcr.models.base import SegmentationModel
from napari_pdcr.models.sliding_window import SlidingWindow
from napari_pdcr.regions import BlockGrid

B = 4
SHAPE = (32, 32)
TAPS = [((-2, 1), 2.0), ((0, 0), 1.0), ((2, -3), -1.5), ((1, 3), 0.004)]
DRAWN = (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU, NodeStatus.SCREENED_OUT)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


def labels_2d() -> np.ndarray:
    """Three regions: two far apart, one next to the first (their blocks interleave)."""
    labels = np.zeros(SHAPE, np.int32)
    labels[box_region(SHAPE, (4, 4), 5)] = 1
    labels[box_region(SHAPE, (9, 6), (3, 6))] = 2
    labels[box_region(SHAPE, (22, 21), 6)] = 7
    return labels


def bank(shape=SHAPE, n=3) -> PatchBank:
    return PatchBank([random_image((1, *shape), 100 + i) for i in range(n)], size=300, seed=3)


def assert_same_as_alone(joint, alone, atol=0.0):
    np.testing.assert_allclose(joint.block_effects, alone.block_effects, rtol=0, atol=atol)
    np.testing.assert_allclose(joint.block_standard_error, alone.block_standard_error, rtol=0, atol=atol)
    np.testing.assert_array_equal(joint.block_draws, alone.block_draws)
    np.testing.assert_array_equal(joint.block_status, alone.block_status)
    np.testing.assert_array_equal(joint.target_region, alone.target_region)
    assert joint.base_outcome == pytest.approx(alone.base_outcome, abs=max(atol, 1e-12))


def expected_estimate_passes(alone: dict, n_screen: int, n_estimate: int) -> int:
    """Passes of ONE run over the union: every block some region needs is screened once,
    and estimated once if it passed any region's screen."""
    statuses = np.stack([a.block_status for a in alone.values()])
    needed = np.isin(statuses, DRAWN).any(axis=0)
    estimated = np.isin(statuses, (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU)).any(axis=0)
    return n_screen * int(needed.sum()) + n_estimate * int(estimated.sum())


def run_both(model, image, labels, **settings):
    method = RegionEffects(model, bank(image.shape[1:]), "mean_logit", block_shape=B, seed=4, **settings)
    joint = method.attribute(image, regions=labels)
    alone = {label: method.attribute(image, labels == label) for label in joint}
    return joint, alone


@pytest.mark.parametrize("mode", ["published", "exact"])
def test_every_label_equals_its_own_run_on_a_linear_model(mode):
    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=14)
    labels = labels_2d()
    joint, alone = run_both(model, image, labels, n_estimate=15, tau=0.02, mode=mode)
    assert list(joint) == [1, 2, 7]
    # incremental inference (exact mode) recomputes a run's joint box: region 7, far from
    # 1 and 2, runs apart; without it (published) all three share one run
    groups = [[1, 2, 7]] if mode == "published" else [[1, 2], [7]]
    for label, explanation in joint.items():
        assert_same_as_alone(explanation, alone[label], atol=1e-6)
        group = next(g for g in groups if label in g)
        assert explanation.parameters["label"] == label and explanation.parameters["regions_in_run"] == group
    # the screen and the estimate ran once for the union of each group's blocks
    passes = joint[1].parameters["forward_passes_by_stage"]
    assert passes["estimate"] == expected_estimate_passes({k: alone[k] for k in groups[0]}, 3, 15)
    assert joint[1].forward_passes < sum(alone[k].forward_passes for k in groups[0])
    if mode == "published":  # every region needs every block: one run instead of three
        assert joint[1].forward_passes < 0.5 * sum(a.forward_passes for a in alone.values())
    # the same-seed draws were really scored in every region: the maps differ between regions
    assert not np.array_equal(joint[2].block_effects, joint[7].block_effects)
    estimated = (NodeStatus.ESTIMATED, NodeStatus.BELOW_TAU)
    assert all(np.isin(e.block_status, estimated).any() for e in joint.values())


def test_every_label_equals_its_own_run_on_a_conv_net_with_reach_and_window():
    """A local conv net: far blocks are skipped (reach per region) and the model runs on a
    crop (the union of the regions' windows); maps agree to float tolerance."""
    model = wrap(LocalConv(2, layers=2, seed=2), 2)
    image = random_image((1, *SHAPE), seed=8)
    labels = np.zeros(SHAPE, np.int32)
    labels[box_region(SHAPE, (2, 2), 4)] = 3
    labels[box_region(SHAPE, (9, 6), 4)] = 5
    joint, alone = run_both(model, image, labels, n_estimate=12, tau=0.0, mode="exact", incremental=False)
    for label, explanation in joint.items():
        assert_same_as_alone(explanation, alone[label], atol=1e-5)
        assert (explanation.block_status == NodeStatus.UNREACHABLE).any()  # reach was used per region
        assert explanation.parameters["regions_in_run"] == [3, 5]  # one run: no incremental box to keep small
    assert joint[3].parameters["window"] is not None  # ran on a crop
    assert joint[3].parameters["forward_passes_by_stage"]["estimate"] == expected_estimate_passes(alone, 3, 12)
    assert joint[3].log == [] and joint[5].log == []


def test_far_apart_regions_run_apart_with_incremental_inference_and_still_equal_their_own_runs():
    """Incremental inference recomputes the bounding box of a run's regions: two far-apart
    regions share it only at a cost (a mostly empty box), so they run one after another."""
    from napari_pdcr.regions import cluster_by_box

    model = wrap(LocalConv(2, layers=2, seed=2), 2)
    image = random_image((1, *SHAPE), seed=8)
    labels = np.zeros(SHAPE, np.int32)
    labels[box_region(SHAPE, (2, 2), 4)] = 3
    labels[box_region(SHAPE, (3, 5), 4)] = 4  # overlaps region 3: shares its run
    labels[box_region(SHAPE, (24, 22), 4)] = 5
    joint, alone = run_both(model, image, labels, n_estimate=6, tau=0.0, mode="exact")
    assert joint[3].parameters["incremental"].startswith("on"), joint[3].parameters["incremental"]
    assert [joint[k].parameters["regions_in_run"] for k in (3, 4, 5)] == [[3, 4], [3, 4], [5]]
    for label, explanation in joint.items():
        assert_same_as_alone(explanation, alone[label], atol=1e-5)
    assert joint[5].forward_passes == alone[5].forward_passes  # a run of its own
    assert joint[3].forward_passes < alone[3].forward_passes + alone[4].forward_passes
    masks = {k: labels == k for k in (3, 4, 5)}
    assert cluster_by_box(masks) == [[3, 4], [5]]
    assert cluster_by_box({"a": masks[5], "b": masks[3]}) == [["a"], ["b"]]  # order of the input kept
    nested = {"big": box_region(SHAPE, (0, 0), 20), "inside": box_region(SHAPE, (5, 5), 3)}
    assert cluster_by_box(nested) == [["big", "inside"]]


def test_reach_probe_of_several_regions_equals_one_probe_per_region_for_fewer_passes():
    model = wrap(LocalConv(2, layers=2, seed=2), 2)
    x = torch.from_numpy(random_image((1, *SHAPE), seed=8))
    grid = BlockGrid.create(SHAPE, B)
    labels = labels_2d()
    regions = [labels == v for v in (1, 2, 7)]
    candidates = [~grid.any_per_block(r) for r in regions]
    probe = iter_reachable_blocks_of_regions(model, x, grid, regions, candidates)
    try:
        while True:
            next(probe)
    except StopIteration as stop:
        together, shared_passes = stop.value
    singles = [reachable_blocks(model, x, grid, r, c) for r, c in zip(regions, candidates, strict=True)]
    for mask, (single, _) in zip(together, singles, strict=True):
        np.testing.assert_array_equal(mask, single)
    assert shared_passes < sum(p for _, p in singles)


def test_sliding_window_model_every_label_equals_its_own_run():
    torch.manual_seed(0)
    net = LocalConv(2, layers=1, seed=5)
    model = SegmentationModel(net, 2, 1, activation="none", sliding_window=SlidingWindow(12, 0.25, "constant", batch_size=16))
    image = random_image((1, 30, 30), seed=3)
    labels = np.zeros((30, 30), np.int32)
    labels[box_region((30, 30), (3, 3), 4)] = 1
    labels[box_region((30, 30), (20, 18), 5)] = 2
    joint, alone = run_both(model, image, labels, n_estimate=8, tau=0.0, mode="exact")
    for label, explanation in joint.items():
        assert_same_as_alone(explanation, alone[label], atol=1e-5)
        assert (explanation.block_status == NodeStatus.UNREACHABLE).any()
    assert joint[1].parameters["forward_passes_by_stage"]["estimate"] == expected_estimate_passes(alone, 3, 8)


def test_brushes_as_a_mapping_may_overlap_and_save_together(tmp_path):
    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=14)
    brushes = {"left": box_region(SHAPE, (4, 4), 6), "overlapping": box_region(SHAPE, (7, 7), 6)}
    method = RegionEffects(model, bank(), "mean_logit", block_shape=B, n_estimate=10, seed=1)
    joint = method.attribute(image, regions=brushes)
    assert list(joint) == ["left", "overlapping"]
    assert_same_as_alone(joint["overlapping"], method.attribute(image, brushes["overlapping"]), atol=1e-6)
    first = joint["left"]
    first.related = {"overlapping": joint["overlapping"]}
    loaded = Explanation.load(first.save(tmp_path / "regions.zarr"))
    np.testing.assert_array_equal(loaded.related["overlapping"].block_effects, joint["overlapping"].block_effects)
    assert loaded.related["overlapping"].parameters["label"] == "overlapping"


def test_bad_regions_get_clear_errors():
    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=14)
    method = RegionEffects(model, "zero", "mean_logit", block_shape=B)
    with pytest.raises(ValueError, match="no non-zero label"):
        method.attribute(image, regions=np.zeros(SHAPE, np.int32))
    with pytest.raises(ValueError, match="whole numbers"):
        method.attribute(image, regions=np.full(SHAPE, 0.5))
    with pytest.raises(ValueError, match="label image has shape"):
        method.attribute(image, regions=np.ones((8, 8), np.int32))
    with pytest.raises(ValueError, match="not both"):
        method.attribute(image, labels_2d() == 1, regions=labels_2d())
    with pytest.raises(ValueError, match="region 'b' is empty"):
        method.attribute(image, regions={"a": labels_2d() == 1, "b": np.zeros(SHAPE, bool)})
    fast = RegionEffects(model, bank(), "mean_logit", block_shape=B, mode="fast")
    with pytest.raises(ValueError, match="use mode='exact'"):
        fast.attribute(image, regions=labels_2d())
    # one label in fast mode is one ordinary run
    single = np.where(labels_2d() == 7, 7, 0)
    assert list(fast.attribute(image, regions=single)) == [7]


def test_console_explains_each_label_of_a_label_image():
    from napari_pdcr.console import explain

    model, _ = tap_model(2, B, TAPS)
    image = random_image((1, *SHAPE), seed=14)
    labels = labels_2d()
    settings = dict(intervention="zero", outcome="mean_logit", block_shape=B, show_cost=False)
    results = explain(image, labels, model=model, each_label=True, **settings)
    assert list(results) == [1, 2, 7]
    alone = explain(image, labels == 2, model=model, **settings)
    assert_same_as_alone(results[2], alone, atol=1e-6)


def _probe_to_the_end(probe):
    try:
        while True:
            next(probe)
    except StopIteration as stop:
        return stop.value


@pytest.mark.parametrize("case", ["local_conv", "unet2d"])
def test_reach_probe_by_incremental_inference_equals_the_full_probe(case):
    """The NaN reach probe run by incremental inference (exact inside the regions' box) finds exactly the
    blocks the probe by full inference finds, on conv nets it supports."""
    from napari_pdcr.engine.incremental import IncrementalForward
    from napari_pdcr.models.demo import load_demo_model

    if case == "local_conv":
        model, shape, block = wrap(LocalConv(2, layers=2, seed=2), 2), SHAPE, B
    else:
        model, shape, block = load_demo_model("unet2d"), (192, 192), 16
    x = torch.from_numpy(random_image((1, *shape), seed=8))
    grid = BlockGrid.create(shape, block)
    regions = [box_region(shape, (2, 2), 6), box_region(shape, (shape[0] - 12, shape[1] - 10), 5)]
    candidates = [~grid.any_per_block(r) for r in regions]
    forward = RegionEffects(model, "zero", block_shape=block, mode="exact")._incremental_probe(
        model, x, grid, np.logical_or.reduce(regions))
    assert forward is not None and isinstance(forward.__self__, IncrementalForward)
    calls = []

    def counted(batch, changed):
        calls.append(len(batch))
        return forward(batch, changed)

    full, full_passes = _probe_to_the_end(iter_reachable_blocks_of_regions(model, x, grid, regions, candidates))
    incremental, passes = _probe_to_the_end(
        iter_reachable_blocks_of_regions(model, x, grid, regions, candidates, forward=counted))
    assert sum(calls) == passes == full_passes and forward.__self__.supported
    for a, b in zip(full, incremental, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any((~a & c).any() for a, c in zip(full, candidates, strict=True))  # the probe skipped blocks


def test_no_incremental_reach_probe_for_a_model_incremental_inference_does_not_support():
    unsupported = SegmentationModel(torch.nn.InstanceNorm2d(1), 2, 1, activation="none")
    x = torch.from_numpy(random_image((1, *SHAPE), seed=1))
    assert RegionEffects(unsupported, "zero", block_shape=B)._incremental_probe(
        unsupported, x, BlockGrid.create(SHAPE, B), box_region(SHAPE, (2, 2), 4)) is None


def test_regions_that_cover_every_block_together_still_probe_reach():
    """Two halves of the image: every block touches one of them, so no block is outside both (the
    incremental reach probe's check then runs on a block inside a region)."""
    model = wrap(LocalConv(2, layers=2, seed=2), 2)
    image = random_image((1, *SHAPE), seed=8)
    labels = np.zeros(SHAPE, np.int32)
    labels[:, : SHAPE[1] // 2] = 1
    labels[:, SHAPE[1] // 2 :] = 2
    joint, alone = run_both(model, image, labels, n_estimate=4, tau=0.0, mode="exact")
    assert joint[1].parameters["regions_in_run"] == [1, 2]
    for label, explanation in joint.items():
        assert_same_as_alone(explanation, alone[label], atol=1e-5)
