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
