"""Guardrail statistics: proportion bounds (segment floors, error rate), sample-ratio mismatch,
stability of the daily metric, and label-free agreement/correlation proxies from sums.

Each check returns a `GuardrailResult` with status "pass" (holds with confidence), "fail" (breached
with confidence: grounds to reject), "pending" (not settled yet: blocks promotion) or "skipped"
(not applicable; blocks nothing), and a sentence with its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from rollout.stats.moments import Moments

Status = Literal["pass", "fail", "pending", "skipped"]
STABILITY_MIN_DAYS = 3  # a std over fewer days says too little to reject (or clear) a model on


@dataclass(frozen=True)
class GuardrailResult:
    """Outcome of one guardrail: status, the value and bound it was judged on, and why."""

    name: str
    status: Status
    value: float | None
    bound: float | None
    threshold: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def wilson_bounds(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """One-sided Wilson score bounds (lower, upper), each at level alpha; (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(1 - alpha))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def floor_check(name: str, successes: int, trials: int, floor: float, alpha: float) -> GuardrailResult:
    """A proportion that must be at least `floor`: pass if the lower bound clears it, fail if the upper does not."""
    lower, upper = wilson_bounds(successes, trials, alpha)
    value = successes / trials if trials else math.nan
    shown = f"{name} = {value:.4f} ({successes}/{trials}), {1 - alpha:.0%} bounds [{lower:.4f}, {upper:.4f}]"
    if trials == 0:
        return GuardrailResult(name, "pending", None, None, floor, f"{name}: no observations yet (floor {floor}).")
    if upper < floor:
        return GuardrailResult(name, "fail", value, upper, floor, f"{shown}: upper bound below the floor {floor}.")
    if lower >= floor:
        return GuardrailResult(name, "pass", value, lower, floor, f"{shown}: lower bound clears the floor {floor}.")
    return GuardrailResult(name, "pending", value, lower, floor, f"{shown}: not yet clear of the floor {floor}.")


def ceiling_check(name: str, events: int, trials: int, ceiling: float, alpha: float) -> GuardrailResult:
    """A rate that must be at most `ceiling` (e.g. errors): pass if the upper bound is under it, fail if the lower is over."""
    lower, upper = wilson_bounds(events, trials, alpha)
    value = events / trials if trials else math.nan
    shown = f"{name} = {value:.4f} ({events}/{trials}), {1 - alpha:.0%} bounds [{lower:.4f}, {upper:.4f}]"
    if trials == 0:
        return GuardrailResult(name, "pending", None, None, ceiling, f"{name}: no requests yet (max {ceiling}).")
    if lower > ceiling:
        return GuardrailResult(name, "fail", value, lower, ceiling, f"{shown}: lower bound above the max {ceiling}.")
    if upper <= ceiling:
        return GuardrailResult(name, "pass", value, upper, ceiling, f"{shown}: upper bound within the max {ceiling}.")
    return GuardrailResult(name, "pending", value, upper, ceiling, f"{shown}: not yet shown within the max {ceiling}.")


def latency_check(p99: float | None, limit: float, name: str = "latency_p99_ms", unit: str = "ms") -> GuardrailResult:
    """Challenger p99 latency (in ms, or as a ratio to the champion's) against the policy's limit.

    No bound: p99 is already a tail statistic.
    """
    if p99 is None or not math.isfinite(p99):
        return GuardrailResult(name, "pending", None, None, limit, "Latency p99 not measured yet.")
    ok = p99 <= limit
    verb = "within" if ok else "above"
    what = "Latency p99" if unit == "ms" else "Latency p99 relative to the champion's"
    return GuardrailResult(
        name, "pass" if ok else "fail", p99, p99, limit, f"{what} {p99:.2f} {unit} is {verb} the max {limit:.2f} {unit}."
    )


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio mismatch chi-square test of observed counts against expected shares."""

    statistic: float
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]


def srm_test(observed: Sequence[int], expected_shares: Sequence[float]) -> SRMResult:
    """Chi-square goodness of fit of counts to shares (normalised); p = 1 when there is nothing to test."""
    obs = np.asarray(observed, dtype=float)
    shares = np.asarray(expected_shares, dtype=float)
    if obs.size != shares.size:
        raise ValueError("observed counts and expected shares differ in length")
    total = obs.sum()
    if total == 0 or obs.size < 2 or shares.sum() <= 0:
        return SRMResult(0.0, 1.0, tuple(int(o) for o in obs), tuple(float(s) for s in shares))
    expected = shares / shares.sum() * total
    stat = float(np.sum((obs - expected) ** 2 / expected))
    p = float(stats.chi2.sf(stat, obs.size - 1))
    return SRMResult(stat, p, tuple(int(o) for o in obs), tuple(float(e) for e in expected))


def daily_std(days: Sequence[Moments]) -> float:
    """Standard deviation across days of the daily mean (days without data are ignored)."""
    means = [d.mean for d in days if d.n > 0]
    return float(np.std(means, ddof=1)) if len(means) >= 2 else math.nan


def stability_check(challenger_days: Sequence[Moments], champion_days: Sequence[Moments], max_ratio: float) -> GuardrailResult:
    """Ratio of the std of the challenger's daily metric to the champion's; needs STABILITY_MIN_DAYS days."""
    n_days = min(sum(d.n > 0 for d in challenger_days), sum(d.n > 0 for d in champion_days))
    if n_days < STABILITY_MIN_DAYS:
        return GuardrailResult(
            "stability_ratio", "skipped", None, None, max_ratio,
            f"Stability not judged: {n_days} day(s) of data, {STABILITY_MIN_DAYS} needed.",
        )
    s_ch, s_champ = daily_std(challenger_days), daily_std(champion_days)
    ratio = s_ch / s_champ if s_champ > 0 else (math.inf if s_ch > 0 else 1.0)
    ok = ratio <= max_ratio
    return GuardrailResult(
        "stability_ratio", "pass" if ok else "fail", ratio, ratio, max_ratio,
        f"Daily-metric std ratio {ratio:.2f} (challenger {s_ch:.4f} vs champion {s_champ:.4f} over {n_days} days) "
        f"is {'within' if ok else 'above'} the max {max_ratio}.",
    )


def agreement_check(n: int, n_agree: int, min_agreement: float, alpha: float) -> GuardrailResult:
    """Share of requests where both versions agree (label-free proxy) against a minimum."""
    return floor_check("agreement", n_agree, n, min_agreement, alpha)




def psi_check(psi_max_observed: float | None, psi_max: float) -> GuardrailResult:
    """Largest input PSI (computed elsewhere) against the policy's limit; a breach blocks promotion."""
    if psi_max_observed is None:
        return GuardrailResult("psi", "skipped", None, None, psi_max, "Input drift (PSI) not measured.")
    ok = psi_max_observed <= psi_max
    return GuardrailResult(
        "psi", "pass" if ok else "pending", psi_max_observed, psi_max_observed, psi_max,
        f"Largest input PSI {psi_max_observed:.3f} is {'within' if ok else 'above'} the max {psi_max}"
        + ("." if ok else "; promotion waits."),
    )


@dataclass(frozen=True)
class AgreementSums:
    """Label-free agreement sums between challenger (x) and champion (y) over the same requests."""

    n: int = 0
    n_agree: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
