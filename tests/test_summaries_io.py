"""Summaries of an explanation (counts, histogram, locality) and saving / loading it."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from synthetic import random_image, tap_model, torch_threads

from napari_pdcr import NodeStatus, PatchBank, RegionEffects, RegionExplanation, box_region
from napari_pdcr.io import results
from napari_pdcr.io.results import (
    atomic_directory_write,
    is_explanation_store,
    load_explanation,
    save_explanation,
)
from napari_pdcr.models.base import hash_module


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


B = 4
TAU = 0.02


def constructed(effects: dict[tuple[int, int], float], tau=TAU, spacing=None) -> RegionExplanation:
    """An 8x8-block explanation of a 32x32 image, region = the central 8x8 pixels (blocks 3..4)."""
    region = box_region((32, 32), (12, 12), 8)
    block_effects = np.zeros((8, 8), np.float32)
    status = np.full((8, 8), NodeStatus.SCREENED_OUT, np.int8)
    status[3:5, 3:5] = NodeStatus.TARGET
    for cell, value in effects.items():
        assert status[cell] != NodeStatus.TARGET
        block_effects[cell] = value
        status[cell] = NodeStatus.ESTIMATED
    return RegionExplanation(
        block_effects=block_effects,
        block_standard_error=np.zeros((8, 8), np.float32),
        block_draws=np.where(status == NodeStatus.ESTIMATED, 50, 3).astype(np.int32),
        block_status=status,
        block_shape=(B, B),
        target_region=region,
        prediction=region.copy(),
        reference=None,
        base_outcome=80.0,
        parameters={"tau": tau},
        spacing=spacing,
    )


# ---------------------------------------------------------------------------- counts and histogram

# cells away from the target; one value per histogram bin, away from the edges
VALUES = {
    (0, 0): -7.0, (0, 1): -3.5,  # <= -3
    (0, 2): -2.0,  # (-3, -1]
    (0, 3): -0.5, (0, 4): -0.8,  # (-1, -0.3]
    (0, 5): -0.1,  # (-0.3, -tau]
    (1, 0): 0.05, (1, 1): 0.25,  # [tau, 0.3)
    (1, 2): 0.6,  # [0.3, 1)
    (1, 3): 2.5,  # [1, 3)
    (1, 4): 4.0, (1, 5): 9.0, (1, 6): 30.0,  # >= 3
}


def test_counts_exclude_the_target_blocks():
    ex = constructed(VALUES)
    counts = ex.counts()
    assert counts == {"positive": 7, "negative": 6, "zero": 64 - 4 - 13}
    assert sum(counts.values()) == 60  # the 4 target blocks are not counted


def test_histogram_has_the_published_edges():
    ex = constructed(VALUES)
    edges, counts = ex.histogram()
    np.testing.assert_array_equal(edges, [-np.inf, -3, -1, -0.3, -TAU, TAU, 0.3, 1, 3, np.inf])
    np.testing.assert_array_equal(counts, [2, 1, 2, 1, 47, 2, 1, 1, 3])
    assert counts.sum() == 60
    assert counts[4] == ex.counts()["zero"]  # the middle bin holds the zero blocks
    # tau comes from the parameters
    edges, _ = constructed(VALUES, tau=0.1).histogram()
    np.testing.assert_array_equal(edges[4:6], [-0.1, 0.1])


def test_histogram_is_symmetric_and_agrees_with_counts_on_the_edges():
    """An effect of exactly -1 and one of +1 are equally strong: mirrored bins. An effect of
    magnitude tau is kept by the tau rule (|ATE| >= tau), so it is not in the zero bin,
    also after the float32 rounding of the stored map."""
    on_edges = {(0, 0): -3.0, (0, 1): -1.0, (0, 2): -0.3, (0, 3): -TAU, (1, 0): TAU, (1, 1): 0.3, (1, 2): 1.0, (1, 3): 3.0}
    ex = constructed(on_edges)
    mirrored = constructed({cell: -v for cell, v in on_edges.items()})
    _, counts = ex.histogram()
    _, counts_mirrored = mirrored.histogram()
    np.testing.assert_array_equal(counts, counts_mirrored[::-1])
    assert counts[4] == ex.counts()["zero"] == 52
    # a value on an edge belongs to the bin farther from zero, on both sides
    np.testing.assert_array_equal(counts, [1, 1, 1, 1, 52, 1, 1, 1, 1])


def test_summary_is_json_serialisable():
    ex = constructed(VALUES)
    summary = json.loads(json.dumps(ex.summary()))
    assert summary["counts"] == ex.counts()
    assert summary["histogram_counts"] == ex.histogram()[1].tolist()
    assert summary["status_counts"]["target"] == 4 and summary["status_counts"]["estimated"] == 13
    assert summary["n_blocks"] == 64


# ---------------------------------------------------------------------------- distance and locality


def test_locality_of_an_all_local_map():
    # effect only in blocks that border the target blocks (cells 2 and 5 around 3..4)
    ex = constructed({(2, 3): -5.0, (5, 4): 2.0, (3, 2): 1.0, (4, 5): -1.0, (2, 2): 0.5})
    dist = ex.block_distances()
    # the centre of block (2, 3) is (9.5, 13.5); the nearest region voxel (12, 13)
    assert dist[2, 3] == pytest.approx(np.hypot(2.5, 0.5))
    # the blocks on all four sides of the region are equally far (no half-voxel bias)
    assert dist[5, 4] == dist[3, 2] == dist[4, 5] == pytest.approx(dist[2, 3])
    assert dist[2, 2] == pytest.approx(np.hypot(2.5, 2.5))
    assert dist[0, 0] == pytest.approx(np.hypot(10.5, 10.5))
    assert (dist[3:5, 3:5] == 0).all()  # target blocks
    np.testing.assert_allclose(dist, dist[::-1, ::-1])  # the region is centred: symmetric
    assert ex.locality(4.0) == 1.0
    assert ex.locality(3.0) == pytest.approx(9 / 9.5)  # all but the diagonal block
    assert ex.locality(2.0) == 0.0
    curve = ex.effect_vs_distance(n_bins=4)
    assert curve["bin_edges"][0] == 0 and curve["bin_edges"][-1] == pytest.approx(dist[~(ex.block_status == NodeStatus.TARGET)].max())
    assert curve["bin_edges"][1] == pytest.approx(np.hypot(10.5, 10.5) / 4)  # > 3.54: all effect in bin 0
    np.testing.assert_allclose(curve["abs_effect_share"], [1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(curve["cumulative_share"], 1.0)
    # mean |effect| over all explained blocks of the bin (zeros included)
    counts = np.histogram(dist[ex.block_status != NodeStatus.TARGET], bins=curve["bin_edges"])[0]
    assert curve["mean_abs_effect"][0] == pytest.approx(9.5 / counts[0])
    assert (curve["mean_abs_effect"][1:] == 0).all()


def test_locality_with_a_far_block_and_spacing():
    ex = constructed({(2, 3): -1.0, (0, 7): 3.0})
    assert ex.locality(3.0) == pytest.approx(0.25)
    assert ex.locality(100.0) == 1.0
    curve = ex.effect_vs_distance(n_bins=4)
    assert curve["cumulative_share"][0] == pytest.approx(0.25) and curve["cumulative_share"][-1] == pytest.approx(1.0)
    # anisotropic voxels: distances are in spacing units
    wide = constructed({(2, 3): -1.0}, spacing=(3.0, 1.0))
    assert wide.block_distances()[2, 3] == pytest.approx(np.hypot(3 * 2.5, 0.5))
    assert wide.locality(7.5) == 0.0 and wide.locality(7.6) == 1.0
    assert np.isnan(constructed({}).locality(3.0))  # no effect at all


# ---------------------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def real_explanation():
    with torch_threads(1):
        model, net = tap_model(2, B, [((-2, 1), 2.0), ((1, -2), -1.0)], activation="sigmoid", bias=(-1.0,), gain=(3.0,))
        image = random_image((1, 32, 32), seed=3)
        region = box_region((32, 32), (12, 12), 8)
        reference = box_region((32, 32), (10, 10), 10)
        bank = PatchBank([random_image((1, 32, 32), 40)], size=100, seed=9)
        ex = RegionEffects(model, bank, "soft_dice", block_shape=B, n_estimate=8, seed=1234, mode="exact").attribute(
            image, region, reference=reference, spacing=(0.5, 0.7)
        )
    ex.extras["component_effects"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    return ex, model, net


def test_save_load_round_trip(tmp_path, real_explanation):
    ex, model, net = real_explanation
    path = tmp_path / "result.zarr"
    ex.save(path)
    assert is_explanation_store(path)
    back = RegionExplanation.load(path)
    for name in ("block_effects", "block_standard_error", "block_draws", "block_status", "target_region", "prediction", "reference"):
        a, b = getattr(ex, name), getattr(back, name)
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert a.dtype == b.dtype, name
    np.testing.assert_array_equal(back.ate, ex.ate)
    np.testing.assert_array_equal(back.extras["component_effects"], ex.extras["component_effects"])
    assert back.block_shape == ex.block_shape == (B, B)
    assert back.base_outcome == ex.base_outcome
    assert back.spacing == (0.5, 0.7)
    assert back.forward_passes == ex.forward_passes > 0
    assert back.log == ex.log
    assert back.timings == pytest.approx(ex.timings)
    # parameters and provenance survive (JSON turns tuples into lists)
    assert back.parameters == json.loads(json.dumps(ex.parameters))
    assert back.parameters["seed"] == 1234 and back.parameters["intervention"]["name"] == "patch_bank"
    assert back.parameters["outcome"]["kind"] == "soft_dice" and back.parameters["reference"] == "given"
    assert back.provenance["seed"] == 1234
    versions = back.provenance["versions"]
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    assert {"napari_pdcr", "monai", "python"} <= set(versions)
    assert back.provenance["created"] == ex.provenance["created"]
    assert back.model_identity["sha256"] == model.sha256 == hash_module(net)
    assert back.model_identity == json.loads(json.dumps(ex.model_identity))
    assert back.summary()["counts"] == ex.summary()["counts"]
    assert back.summary()["histogram_counts"] == ex.summary()["histogram_counts"]


def test_load_without_reference_and_rejects_foreign_stores(tmp_path):
    ex = constructed(VALUES)
    save_explanation(replace(ex, extras={"more": np.ones(3)}), tmp_path / "a.zarr")
    back = load_explanation(tmp_path / "a.zarr")
    assert back.reference is None and back.spacing is None
    np.testing.assert_array_equal(back.extras["more"], np.ones(3))
    # not a store
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a napari-pdcr explanation store"):
        load_explanation(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a napari-pdcr explanation store"):
        load_explanation(tmp_path / "missing.zarr")
    # a store from a newer format version
    meta_file = tmp_path / "a.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["napari_pdcr"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer"):
        load_explanation(tmp_path / "a.zarr")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class Boom(Exception):
    pass


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "out.zarr"

    def write(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("written before the failure")
        raise Boom

    with pytest.raises(Boom):
        atomic_directory_write(path, write)
    assert not path.exists()
    assert _leftovers(tmp_path) == []

    # the same through save_explanation: an extra array zarr cannot store fails midway
    ex = constructed(VALUES)
    with pytest.raises(Exception):  # noqa: B017 - whatever zarr raises
        save_explanation(replace(ex, extras={"bad": np.array([object(), object()])}), path)
    assert not path.exists()
    assert _leftovers(tmp_path) == []


def test_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "out.zarr"
    old = constructed({(0, 0): -7.0})
    save_explanation(old, path)

    with pytest.raises(Exception):  # noqa: B017
        save_explanation(replace(constructed(VALUES), extras={"bad": np.array([object()])}), path)
    np.testing.assert_array_equal(load_explanation(path).block_effects, old.block_effects)
    assert _leftovers(tmp_path) == []

    new = constructed(VALUES)
    save_explanation(new, path)
    np.testing.assert_array_equal(load_explanation(path).block_effects, new.block_effects)
    assert _leftovers(tmp_path) == []


def test_a_failed_swap_restores_the_old_store(tmp_path, monkeypatch):
    """If moving the new store into place fails, the old one must be back under ``path``."""
    path = tmp_path / "out.zarr"
    old = constructed({(0, 0): -7.0})
    save_explanation(old, path)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(path) and ".tmp-" in os.path.basename(src):  # the new store into place
            raise OSError("simulated failure of the final rename")
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", replace)
    monkeypatch.setattr(results, "_exchange", lambda a, b: False)  # a system that cannot swap folders
    with pytest.raises(OSError, match="simulated"):
        save_explanation(constructed(VALUES), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_explanation(path).block_effects, old.block_effects)
    assert _leftovers(tmp_path) == []
