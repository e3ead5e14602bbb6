"""Sufficient statistics that SQL aggregates produce and the tests consume.

The outcome store answers GROUP BY queries with counts, sums and sums of squares; everything
the promotion engine needs rolls up from these by addition, so no row is ever held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of a sample; adds like the samples it summarises."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> Moments:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
        return cls(int(arr.size), float(arr.sum()), float(np.square(arr).sum()))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Unbiased sample variance (ddof=1); nan below two observations."""
        if self.n < 2:
            return math.nan
        return max(self.total_sq - self.total * self.total / self.n, 0.0) / (self.n - 1)

    @property
    def se(self) -> float:
        """Standard error of the mean."""
        return math.sqrt(self.variance / self.n) if self.n >= 2 else math.nan


@dataclass(frozen=True)
class ClusterSums:
    """Per-unit sums of a per-row value, summarised for a cluster-robust standard error of its mean: units G,
    rows N, the total, and over units the sums of (unit total)^2, (unit total)(unit rows) and (unit rows)^2.
    A/B randomises units (a customer's visits all go to one arm), so rows of a unit are not independent: the
    variance of the mean comes from the units' deviations, y_u - mean * n_u (the ratio, or delta, method)."""

    units: int = 0
    n: int = 0
    total: float = 0.0
    sum_y2: float = 0.0
    sum_yn: float = 0.0
    sum_n2: float = 0.0

    @classmethod
    def of(cls, unit_of: Iterable[object], values: Iterable[float]) -> ClusterSums:
        """From one value per row and the unit of each row (tests and the in-memory store)."""
        units = np.asarray(unit_of if isinstance(unit_of, np.ndarray) else list(unit_of))
        y = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=float)
        if y.size == 0:
            return cls()
        _, index = np.unique(units, return_inverse=True)
        n_u = np.bincount(index).astype(float)
        y_u = np.bincount(index, weights=y)
        return cls(int(n_u.size), int(y.size), float(y.sum()), float(np.dot(y_u, y_u)), float(np.dot(y_u, n_u)),
                   float(np.dot(n_u, n_u)))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def var_of_mean(self) -> float:
        """Cluster-robust variance of the mean, sum_u (y_u - m n_u)^2 / N^2 x G / (G - 1); nan below two units."""
        if self.units < 2:
            return math.nan
        m = self.mean
        spread = max(self.sum_y2 - 2.0 * m * self.sum_yn + m * m * self.sum_n2, 0.0)
        return spread / (self.n * self.n) * self.units / (self.units - 1)


def total(parts: Iterable[Moments]) -> Moments:
    """Sum of several Moments (an empty sum is the empty sample)."""
    out = Moments()
    for part in parts:
        out = out + part
    return out


@dataclass(frozen=True)
class Confusion:
    """Binary confusion counts; precision/recall with their denominators for confidence bounds."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def successes(self, metric: str) -> tuple[int, int]:
        """(successes, trials) of a proportion metric: precision, recall or accuracy."""
        if metric == "precision":
            return self.tp, self.tp + self.fp
        if metric == "recall":
            return self.tp, self.tp + self.fn
        if metric == "accuracy":
            return self.tp + self.tn, self.n
        raise ValueError(f"unknown proportion metric {metric!r}; allowed: precision, recall, accuracy")
