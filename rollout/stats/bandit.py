"""Thompson-sampling traffic weights and inverse-propensity estimates of each arm's mean reward.

Under adaptive allocation plain per-arm means are biased (an arm that looks bad early gets few
samples and keeps its unlucky estimate); weighting each outcome by 1/propensity removes that bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def apply_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    """Mix weights with the uniform so each arm gets at least `floor` and they still sum to 1."""
    w = np.asarray(weights, dtype=float)
    k = w.shape[-1]
    floor = min(floor, 1.0 / k)
    return np.asarray(floor + (1.0 - k * floor) * w, dtype=float)


def _argmax_shares(samples: np.ndarray) -> np.ndarray:
    """Share of draws in which each arm is best; samples has shape (..., draws, arms)."""
    k = samples.shape[-1]
    best = np.argmax(samples, axis=-1)
    return np.stack([(best == a).mean(axis=-1) for a in range(k)], axis=-1)


def _burn_in_gate(counts: np.ndarray, shares: np.ndarray, burn_in: int) -> np.ndarray:
    """Equal weights wherever some arm has fewer than burn_in observations."""
    warming = (counts < burn_in).any(axis=-1, keepdims=True)
    return np.where(warming, 1.0 / counts.shape[-1], shares)


def thompson_beta(
    successes: np.ndarray | Sequence[int],
    trials: np.ndarray | Sequence[int],
    rng: np.random.Generator,
    draws: int = 4000,
    floor: float = 0.0,
    burn_in: int = 0,
) -> np.ndarray:
    """Beta-Bernoulli Thompson weights (uniform prior) for 0/1 rewards, vectorised over leading axes.

    Weight of an arm = posterior probability it is best, by Monte Carlo; then burn-in and floor.
    """
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    shape = s.shape[:-1] + (draws, s.shape[-1])
    a = np.broadcast_to((1.0 + s)[..., None, :], shape)
    b = np.broadcast_to((1.0 + n - s)[..., None, :], shape)
    shares = _argmax_shares(rng.beta(a, b))
    return apply_floor(_burn_in_gate(n, shares, burn_in), floor)


def thompson_gaussian(
    means: np.ndarray | Sequence[float],
    variances: np.ndarray | Sequence[float],
    counts: np.ndarray | Sequence[int],
    rng: np.random.Generator,
    draws: int = 4000,
    floor: float = 0.0,
    burn_in: int = 0,
) -> np.ndarray:
    """Gaussian Thompson weights for continuous rewards: arm mean ~ N(mean, variance / count) (flat prior)."""
    m = np.asarray(means, dtype=float)
    v = np.asarray(variances, dtype=float)
    n = np.asarray(counts, dtype=float)
    sd = np.where(n > 0, np.sqrt(np.nan_to_num(v, nan=1.0) / np.maximum(n, 1)), 1e6)
    loc = np.where(n > 0, np.nan_to_num(m), 0.0)
    noise = rng.standard_normal(m.shape[:-1] + (draws, m.shape[-1]))
    shares = _argmax_shares(loc[..., None, :] + sd[..., None, :] * noise)
    return apply_floor(_burn_in_gate(n, shares, burn_in), floor)


@dataclass(frozen=True)
class IPWSums:
    """Sums over one arm's matured requests, weighted by w = 1/propensity; adds like Moments.

    n_total counts matured requests of *every* arm over the same period (Horvitz-Thompson divides by it).
    """

    n_total: int = 0
    n: int = 0
    sum_w: float = 0.0
    sum_wr: float = 0.0
    sum_w2: float = 0.0
    sum_w2r: float = 0.0
    sum_w2r2: float = 0.0

    @classmethod
    def of(cls, rewards: Sequence[float] | np.ndarray, propensities: Sequence[float] | np.ndarray, n_total: int) -> IPWSums:
        r = np.asarray(rewards, dtype=float)
        w = 1.0 / np.asarray(propensities, dtype=float)
        return cls(n_total, int(r.size), float(w.sum()), float((w * r).sum()), float((w * w).sum()),
                   float((w * w * r).sum()), float((w * w * r * r).sum()))

    @property
    def varied(self) -> bool:
        """Whether the rows' propensities differ (weights changed while they were logged): sum(w^2) n > sum(w)^2
        exactly when the w are not all equal. The tolerance (a coefficient of variation of the weights of 0.1%)
        stays above the rounding of sums over ten million rows and far below any real change of weights."""
        return self.n >= 2 and self.sum_w2 * self.n - self.sum_w**2 > 1e-6 * self.sum_w2 * self.n

    def __add__(self, other: IPWSums) -> IPWSums:
        return IPWSums(self.n_total + other.n_total, self.n + other.n, self.sum_w + other.sum_w,
                       self.sum_wr + other.sum_wr, self.sum_w2 + other.sum_w2, self.sum_w2r + other.sum_w2r,
                       self.sum_w2r2 + other.sum_w2r2)


@dataclass(frozen=True)
class IPWEstimate:
    """An inverse-propensity estimate of an arm's mean reward with its standard error."""

    mean: float
    se: float
    n: int


def horvitz_thompson(s: IPWSums) -> IPWEstimate:
    """Unbiased sum(r/p) / N; SE from the per-request terms 1{arm} r/p over all N requests."""
    big_n = s.n_total
    if big_n < 2:
        return IPWEstimate(math.nan, math.nan, s.n)
    mean = s.sum_wr / big_n
    var = max(s.sum_w2r2 - s.sum_wr**2 / big_n, 0.0) / (big_n * (big_n - 1))
    return IPWEstimate(mean, math.sqrt(var), s.n)


def hajek(s: IPWSums) -> IPWEstimate:
    """Self-normalised sum(r/p) / sum(1/p): slightly biased, far less variable; linearised SE."""
    if s.n < 2 or s.sum_w <= 0:
        return IPWEstimate(math.nan, math.nan, s.n)
    mean = s.sum_wr / s.sum_w
    var = max(s.sum_w2r2 - 2 * mean * s.sum_w2r + mean * mean * s.sum_w2, 0.0) / s.sum_w**2
    return IPWEstimate(mean, math.sqrt(var), s.n)


def ipw_difference(a: IPWSums, b: IPWSums, estimator: str = "hajek") -> tuple[float, float]:
    """(mean(a) - mean(b), SE) for two arms logged over the same requests.

    Arms never share a request, so for Hajek the variances add; for Horvitz-Thompson the shared
    denominator N is used for the difference terms directly.
    """
    if estimator == "hajek":
        ea, eb = hajek(a), hajek(b)
        return ea.mean - eb.mean, math.sqrt(ea.se**2 + eb.se**2)
    if estimator == "horvitz_thompson":
        big_n = a.n_total
        if big_n < 2:
            return math.nan, math.nan
        total = a.sum_wr - b.sum_wr
        var = max(a.sum_w2r2 + b.sum_w2r2 - total**2 / big_n, 0.0) / (big_n * (big_n - 1))
        return total / big_n, math.sqrt(var)
    raise ValueError(f"unknown IPW estimator {estimator!r}; allowed: hajek, horvitz_thompson")
