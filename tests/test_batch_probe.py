"""Batch size from measured throughput (engine/throughput.py): picks the fastest, changes no number."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from synthetic import LocalConv, random_image, torch_threads, wrap

from napari_pdcr import PatchBank, RegionEffects, box_region
from napari_pdcr.engine.throughput import fastest_batch_size


def test_probe_picks_the_size_with_most_images_per_second():
    """A forward whose time per batch is known: 10 ms + 2.5 ms per image up to 8 images,
    then 20 ms per image (the batch no longer fits a cache). 8 images per call is fastest."""
    calls = []

    def forward(batch):
        n = len(batch)
        calls.append(n)
        time.sleep(0.010 + (0.0025 * n if n <= 8 else 0.020 * n))

    probe = fastest_batch_size(forward, torch.zeros(1, 4, 4), largest=32)
    assert probe.batch_size == 8
    assert set(probe.images_per_second) == {1, 2, 4, 8, 16}  # 16 was twice as slow per image: 32 not tried
    assert probe.images_per_second[8] > probe.images_per_second[4] > probe.images_per_second[1]
    assert probe.forward_passes == sum(calls) == 3 * (1 + 2 + 4 + 8 + 16)


def test_probe_needs_a_positive_bound():
    with pytest.raises(ValueError, match="positive batch size"):
        fastest_batch_size(lambda b: b, torch.zeros(1, 2, 2), largest=0)


def test_batch_probe_changes_the_speed_not_the_map():
    with torch_threads(1):
        model = wrap(LocalConv(2, layers=2, seed=2), 2)
        image = random_image((1, 32, 32), seed=8)
        region = box_region((32, 32), (12, 12), 6)
        kw = dict(intervention=PatchBank([random_image((1, 32, 32), 100 + i) for i in range(3)], size=300),
                  outcome="mean_logit", block_shape=4, n_estimate=10, tau=0.0, seed=3)
        plain = RegionEffects(model, **kw).attribute(image, region)
        probed = RegionEffects(model, batch_probe=True, **kw).attribute(image, region)
    np.testing.assert_allclose(probed.block_effects, plain.block_effects, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(probed.block_status, plain.block_status)
    rates = dict(probed.parameters["batch_probe_images_per_second"])
    assert probed.parameters["batch_size"] in rates
    assert max(rates.values()) * 0.95 <= rates[probed.parameters["batch_size"]]
    extra = probed.parameters["forward_passes_by_stage"]["batch_probe"]
    assert extra == 3 * sum(rates) and probed.forward_passes == plain.forward_passes + extra
    assert plain.parameters["batch_probe_images_per_second"] is None
