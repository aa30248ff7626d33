"""Confidence intervals for the mean of bounded draws that hold under heavy tails.

The per-draw changes of a block's outcome can be heavy-tailed: most replacements change
a Dice score by nothing, a rare one by -90 points. A mean +/- 1.96 SE interval then
covers the true effect far less often than 95 % (a 50-draw sample without the rare draw
has a tiny SE). What is always known is the outcome's *range* (Dice points lie in
[0, 100]); the betting confidence sequence of Waudby-Smith & Ramdas ("Estimating means
of bounded random variables by betting", JRSS-B 2024, hedged capital with the
predictable plug-in bets) uses it and holds for every distribution on that range, at
every number of draws at once, so it stays valid when a sequential screen stops a block
because of its interval. The ``confseq`` package has it, but ships only a C++ source
distribution that does not build here; this is the same construction on numpy,
vectorised over blocks.
"""

from __future__ import annotations

import numpy as np

#: Outcome kinds whose range is known, in outcome units (Dice and probabilities are in percent).
OUTCOME_BOUNDS = {"dice": (0.0, 100.0), "soft_dice": (0.0, 100.0), "mean_probability": (0.0, 100.0)}
#: Largest share of the capital bet on one draw (WSR's truncation ``c``, which they take in [1/2, 3/4]).
MAX_BET = 0.75
#: Draws below which an estimate is flagged as resting on few draws.
FEW_DRAWS = 10
#: Effective number of draws carrying the mean, ``(sum |d|)^2 / sum d^2``, below which it is flagged.
FEW_CARRYING_DRAWS = 3.0


def outcome_bounds(outcome) -> tuple[float, float] | None:
    """The known range ``(low, high)`` of an :class:`~napari_pdcr.outcomes.Outcome`, or None (e.g. logits)."""
    return OUTCOME_BOUNDS.get(getattr(outcome, "kind", None))


def betting_interval(
    x: np.ndarray, confidence: float = 0.95, time_uniform: bool = True, iterations: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence sequence for the mean of draws in [0, 1], one per row.

    ``x`` is ``(N, T)``: row ``i`` holds its draws in order, then NaN. Returns
    ``(lower, upper)``, each ``(N,)``, of the hedged-capital betting interval at level
    ``confidence``. With ``time_uniform`` it holds simultaneously for every prefix of the
    draws (so a rule that stops drawing when the interval looks decisive keeps its
    coverage); otherwise the bets are tuned to the row's number of draws, fixed in advance
    (a narrower interval, valid for that number only). A row without
    draws gets ``[0, 1]``. The endpoints are found by bisection (``iterations`` halvings,
    2^-40 of the range): the capital of betting that the mean is above ``m`` decreases in
    ``m``, the one of betting below increases.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n_rows, n_draws = x.shape
    valid = np.isfinite(x)
    values = np.where(valid, np.clip(x, 0.0, 1.0), 0.0)
    alpha = 1.0 - confidence
    threshold = np.log(2.0 / alpha)  # hedged with theta = 1/2: max(K+, K-) / 2 >= 1 / alpha
    t = np.arange(1, n_draws + 1, dtype=np.float64)
    mean_t = (0.5 + np.cumsum(values, axis=1)) / (t + 1)
    var_t = (0.25 + np.cumsum(np.where(valid, (values - mean_t) ** 2, 0.0), axis=1)) / (t + 1)
    var_before = np.concatenate([np.full((n_rows, 1), 0.25), var_t[:, :-1]], axis=1)
    # predictable plug-in bets: time-uniform (any stopping rule), or tuned to each row's final number of draws
    horizon = t * np.log1p(t) if time_uniform else np.maximum(valid.sum(axis=1, keepdims=True), 1)
    bet = np.sqrt(2.0 * threshold / (var_before * horizon))

    def log_capital(m: np.ndarray, sign: float) -> np.ndarray:
        cap = MAX_BET / np.maximum(m if sign > 0 else 1.0 - m, 1e-300)[:, None]
        terms = np.log1p(sign * np.minimum(bet, cap) * (values - m[:, None]))
        return np.where(valid, terms, 0.0).sum(axis=1)

    def boundary(sign: float) -> np.ndarray:
        # lower end: the largest m where betting "mean above m" has won; upper: the smallest m for "below"
        low, high = np.zeros(n_rows), np.ones(n_rows)
        for _ in range(iterations):
            mid = (low + high) / 2
            rejected = log_capital(mid, sign) >= threshold
            if sign > 0:
                low = np.where(rejected, mid, low)
                high = np.where(rejected, high, mid)
            else:
                high = np.where(rejected, mid, high)
                low = np.where(rejected, low, mid)
        return low if sign > 0 else high

    lower, upper = boundary(+1.0), boundary(-1.0)
    empty = ~valid.any(axis=1)
    return np.where(empty, 0.0, lower), np.where(empty, 1.0, upper)


def carrying_draws(deltas: np.ndarray) -> np.ndarray:
    """Effective number of draws that carry each row's mean, ``(sum |d|)^2 / sum d^2`` (NaN-padded rows).

    ``n`` when every draw changes the outcome equally, 1 when one draw carries it all;
    ``inf`` for a row whose draws are all 0 (nothing rests on any single draw).
    """
    magnitude = np.abs(np.nan_to_num(np.asarray(deltas, dtype=np.float64)))
    total, total_sq = magnitude.sum(axis=1), (magnitude**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_sq > 0, total**2 / np.maximum(total_sq, 1e-300), np.inf)
