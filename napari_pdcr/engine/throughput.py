"""Batch size from measured throughput: time a few batch sizes at the evaluated input size.

The memory budget bounds the batch size from above; within it, the fastest batch size on
a CPU is often smaller than the largest (caches), and on a GPU larger ones help. A short
probe runs powers of two up to the bound on copies of the evaluated input (the window
the model actually runs on) and keeps the one with the most images per second.
Results do not depend on the batch size (every draw comes from its own seeded stream),
so the probe changes the speed of a run, never its numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchProbe:
    """Outcome of :func:`fastest_batch_size`.

    ``batch_size``: the chosen size; ``images_per_second``: ``{size: images/s}`` measured;
    ``forward_passes``: images run by the probe (warm-up included).
    """

    batch_size: int
    images_per_second: dict[int, float]
    forward_passes: int


def fastest_batch_size(
    forward: Callable[[torch.Tensor], object],
    item: torch.Tensor,
    largest: int,
    repeats: int = 2,
    tolerance: float = 0.05,
) -> BatchProbe:
    """The batch size (a power of two up to ``largest``, and ``largest``) with the most
    images per second for ``forward`` on copies of ``item`` ``(C, *S)``.

    Each size runs once to warm up (first calls allocate and pick kernels), then
    ``repeats`` times; its time is the fastest repeat. Among sizes within ``tolerance``
    of the best throughput the smallest is kept (less memory, same speed). Sizes stop
    growing once one is more than twice as slow per image as the best so far.
    """
    if largest < 1:
        raise ValueError(f"largest must be a positive batch size; got {largest}")
    sizes = sorted({1 << k for k in range(largest.bit_length()) if 1 << k <= largest} | {largest})
    rates: dict[int, float] = {}
    passes = 0
    with torch.inference_mode():
        for size in sizes:
            batch = item.expand(size, *item.shape).contiguous()
            forward(batch)  # warm-up
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                forward(batch)
                seconds.append(time.perf_counter() - t0)
            passes += size * (1 + repeats)
            rates[size] = size / max(min(seconds), 1e-9)
            if rates[size] < 0.5 * max(rates.values()):
                break
    best = max(rates.values())
    chosen = min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)
    return BatchProbe(chosen, rates, passes)
