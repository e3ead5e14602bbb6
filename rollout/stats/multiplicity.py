"""Error control across several challengers tested against one champion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bonferroni_alpha(alpha: float, k: int) -> float:
    """Per-challenger level alpha / k; the rule for sequential tests (each CS gets its share)."""
    return alpha / max(k, 1)


def bonferroni(p_values: Sequence[float], alpha: float) -> tuple[list[bool], list[float]]:
    """(rejected, adjusted p-values) by Bonferroni."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.minimum(p * p.size, 1.0)
    return [bool(a <= alpha) for a in adjusted], [float(a) for a in adjusted]


def holm(p_values: Sequence[float], alpha: float) -> tuple[list[bool], list[float]]:
    """(rejected, adjusted p-values) by Holm's step-down; controls the family-wise error at alpha.

    Valid with anytime-valid p-values too: each then holds at every stopping time.
    """
    p = np.asarray(p_values, dtype=float)
    k = p.size
    if k == 0:
        return [], []
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (k - np.arange(k))))
    adjusted = np.empty(k)
    adjusted[order] = stepped
    return [bool(a <= alpha) for a in adjusted], [float(a) for a in adjusted]


def holm_levels(p_values: Sequence[float], alpha: float) -> list[float]:
    """Level each hypothesis is judged at under Holm: alpha/(k-i) along the step-down, alpha/k after it stops."""
    p = np.asarray(p_values, dtype=float)
    k = p.size
    levels = np.full(k, alpha / max(k, 1))
    for rank, idx in enumerate(np.argsort(p, kind="stable")):
        level = alpha / (k - rank)
        if p[idx] > level:
            break
        levels[idx] = level
    return [float(v) for v in levels]
