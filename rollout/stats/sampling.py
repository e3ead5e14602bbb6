"""Sampling with known inclusion probabilities, and the weighted means of what the sample saw.

Label requests (active evaluation): when labels cost money, label the rows that tell the models apart, each
with a known probability, and weigh every labelled row by 1 / its probability. The weighted (Hajek) mean of a
row's loss, or of its paired difference, then estimates the mean over *every* row, whatever the sampling
favoured; its standard error comes from the same weights, so the sequential test reads it as any other
estimate with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def inclusion_probabilities(informativeness: np.ndarray, budget: float, floor: float = 0.1) -> np.ndarray:
    """Probabilities pi (0 < pi <= 1, summing to min(budget, rows)) proportional to each row's informativeness
    plus `floor` times the mean informativeness: the rows that decide get most of the budget, and every row has
    a chance (an estimate that is unbiased even where the informativeness is wrong). Rows that would get more
    than 1 get exactly 1 and their excess goes to the others (the water-filling of PPS sampling).

    For a mean, sampling each row with pi proportional to the root mean square of its value minimises the
    variance of the weighted estimate for a given expected sample size."""
    s = np.asarray(informativeness, dtype=float)
    n = s.size
    if n == 0:
        return s.copy()
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("informativeness must be finite and non-negative")
    k = min(float(budget), float(n))
    if k <= 0:
        raise ValueError("budget must be positive")
    base = s.mean()
    size = s + (floor * base if base > 0 else 1.0)  # all zero: every row alike
    pi = np.zeros(n)
    capped = np.zeros(n, dtype=bool)
    for _ in range(n):  # each pass caps at least one more row, or ends
        free = ~capped
        room = k - capped.sum()
        pi[free] = room * size[free] / size[free].sum()
        over = free & (pi >= 1.0)
        if not over.any():
            break
        capped |= over
        pi[capped] = 1.0
    return np.clip(pi, 1e-12, 1.0)


def systematic_sample(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which rows are drawn (a boolean mask): row i with probability exactly pi[i], and the sample's size the
    sum of pi rounded up or down (systematic PPS sampling over a random order, so no row's chance depends on
    where it was logged)."""
    pi = np.asarray(pi, dtype=float)
    if pi.size == 0:
        return np.zeros(0, dtype=bool)
    order = rng.permutation(pi.size)
    edges = np.concatenate([[0.0], np.cumsum(pi[order])])
    start = rng.uniform()
    # row j (in the random order) is drawn when a point start + m (m = 0, 1, ...) falls in [edges[j], edges[j+1])
    hits = np.floor(edges[1:] - start) - np.floor(edges[:-1] - start) > 0
    chosen = np.zeros(pi.size, dtype=bool)
    chosen[order] = hits
    return chosen


@dataclass(frozen=True)
class WeightedMean:
    """The Hajek mean of values with weights 1/pi, with its standard error (linearised: the same terms as the
    bandit's Hajek estimate) and, where units are known, the cluster-robust one (terms summed per unit first).
    `spread` is the weighted variance of the values themselves: what a uniformly random sample of the same
    precision would need, labels = spread / se^2."""

    n: int
    sum_w: float
    mean: float
    se: float
    se_units: float | None
    spread: float

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray,
           units: Sequence[str] | None = None) -> WeightedMean:
        y = np.asarray(values, dtype=float)
        w = 1.0 / np.asarray(probabilities, dtype=float)
        n = int(y.size)
        sum_w = float(w.sum())
        if n < 2 or sum_w <= 0:
            return cls(n, sum_w, math.nan if n == 0 else float(y.mean()), math.nan, None, math.nan)
        mean = float((w * y).sum() / sum_w)
        terms = w * (y - mean)
        se = math.sqrt(float((terms * terms).sum())) / sum_w
        se_units = None
        if units is not None:
            _, index = np.unique(np.asarray(units, dtype=object).astype(str), return_inverse=True)
            per_unit = np.bincount(index, weights=terms)
            if per_unit.size >= 2:
                se_units = math.sqrt(float((per_unit * per_unit).sum())) / sum_w
        spread = float((w * (y - mean) ** 2).sum() / sum_w)
        return cls(n, sum_w, mean, se, se_units, spread)

    @property
    def robust_se(self) -> float:
        """The larger of the row-level and the unit-level standard errors."""
        return self.se if self.se_units is None or not math.isfinite(self.se_units) else max(self.se, self.se_units)

    def labels_at_random(self) -> float:
        """How many labels drawn uniformly at random would give this standard error: spread / se^2."""
        se = self.robust_se
        return self.spread / (se * se) if se > 0 and math.isfinite(se) and math.isfinite(self.spread) else math.nan
