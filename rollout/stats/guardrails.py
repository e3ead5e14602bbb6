"""Guardrail statistics, valid when re-checked every hour: proportion bounds (segment floors, error rate) by
anytime-valid confidence sequences, latency quantiles by order-statistic bounds, stability of the daily metric
net of sampling, the sample-ratio test (fixed shares, and propensities under a bandit), label-free proxies.

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
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import gammaln

from rollout.stats.moments import Moments

Status = Literal["pass", "fail", "pending", "skipped"]


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


def log_mixture(successes: ArrayLike, trials: ArrayLike, p: float,
                prior: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """log of the beta-binomial mixture martingale against the null mean p (Howard et al. 2021, sec. 3), for
    counts or arrays of counts (the simulations evaluate every run and look at once)."""
    a, b = prior
    s = np.asarray(successes, dtype=float)
    f = np.asarray(trials, dtype=float) - s
    log_marginal = gammaln(a + s) + gammaln(b + f) - gammaln(a + b + s + f) - (gammaln(a) + gammaln(b) - gammaln(a + b))
    p = min(max(p, 1e-12), 1 - 1e-12)
    return np.asarray(log_marginal - s * math.log(p) - f * math.log1p(-p), dtype=float)


def _log_mixture(successes: int, trials: int, p: float, prior: tuple[float, float]) -> float:
    return float(log_mixture(successes, trials, p, prior))


def excludes(successes: int, trials: int, p: float, alpha: float, prior: tuple[float, float] = (0.5, 0.5)) -> bool:
    """Whether the anytime-valid confidence sequence at `alpha` excludes mean p: true for the true mean, at any
    of however many looks, with probability at most alpha (Ville's inequality)."""
    return trials > 0 and _log_mixture(successes, trials, p, prior) >= math.log(1.0 / alpha)


def bernoulli_cs(successes: int, trials: int, alpha: float,
                 prior: tuple[float, float] = (0.5, 0.5)) -> tuple[float, float]:
    """(lower, upper) of the beta-binomial mixture confidence sequence for a proportion, valid under continuous
    monitoring; (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    level = math.log(1.0 / alpha)
    mle = successes / trials

    def edge(lo: float, hi: float) -> float:
        return float(brentq(lambda p: _log_mixture(successes, trials, p, prior) - level, lo, hi, xtol=1e-10))

    lower = 0.0 if _log_mixture(successes, trials, 1e-12, prior) < level else edge(1e-12, max(mle, 1e-12))
    upper = 1.0 if _log_mixture(successes, trials, 1 - 1e-12, prior) < level else edge(min(mle, 1 - 1e-12), 1 - 1e-12)
    return lower, upper


def floor_check(name: str, successes: int, trials: int, floor: float, alpha: float,
                min_trials: int = 0) -> GuardrailResult:
    """A proportion that must be at least `floor`, judged by an anytime-valid bound: it fails only when the
    sequence excludes the floor from above with at least `min_trials` trials; until then it waits."""
    lower, upper = bernoulli_cs(successes, trials, alpha)
    value = successes / trials if trials else math.nan
    shown = (f"{name} = {value:.4f} ({successes}/{trials}), anytime-valid {1 - alpha:.2%} bounds "
             f"[{lower:.4f}, {upper:.4f}]")
    if trials == 0:
        return GuardrailResult(name, "pending", None, None, floor, f"{name}: no observations yet (floor {floor}).")
    if upper < floor and trials >= min_trials:
        return GuardrailResult(name, "fail", value, upper, floor, f"{shown}: upper bound below the floor {floor}.")
    if lower >= floor:
        return GuardrailResult(name, "pass", value, lower, floor, f"{shown}: lower bound clears the floor {floor}.")
    wait = f" ({trials} of {min_trials} observations before it can fail)" if upper < floor else ""
    return GuardrailResult(name, "pending", value, lower, floor, f"{shown}: not yet clear of the floor {floor}{wait}.")


def ceiling_check(name: str, events: int, trials: int, ceiling: float, alpha: float,
                  min_trials: int = 0) -> GuardrailResult:
    """A rate that must be at most `ceiling` (e.g. errors), judged as `floor_check` is, from the other side."""
    lower, upper = bernoulli_cs(events, trials, alpha)
    value = events / trials if trials else math.nan
    shown = (f"{name} = {value:.4f} ({events}/{trials}), anytime-valid {1 - alpha:.2%} bounds "
             f"[{lower:.4f}, {upper:.4f}]")
    if trials == 0:
        return GuardrailResult(name, "pending", None, None, ceiling, f"{name}: no requests yet (max {ceiling}).")
    if lower > ceiling and trials >= min_trials:
        return GuardrailResult(name, "fail", value, lower, ceiling, f"{shown}: lower bound above the max {ceiling}.")
    if upper <= ceiling:
        return GuardrailResult(name, "pass", value, upper, ceiling, f"{shown}: upper bound within the max {ceiling}.")
    wait = f" ({trials} of {min_trials} requests before it can fail)" if lower > ceiling else ""
    return GuardrailResult(name, "pending", value, upper, ceiling,
                           f"{shown}: not yet shown within the max {ceiling}{wait}.")


Histogram = Sequence[tuple[float, float, int]]  # (lower edge, upper edge, count) of each latency bucket


def quantile_bounds(hist: Histogram, q: float, alpha: float) -> tuple[float, float]:
    """Distribution-free bounds on the q-quantile from order statistics: each holds with probability at least
    1 - alpha (the ranks come from the binomial distribution of the count below the quantile); bucketed values
    give the bucket's lower edge for the lower bound and its upper edge for the upper one."""
    counts = sorted((lo, hi, int(n)) for lo, hi, n in hist if n > 0)
    total = sum(n for _, _, n in counts)
    if total == 0:
        return 0.0, math.inf
    lo_rank = int(stats.binom.ppf(alpha, total, q))  # P(fewer than lo_rank values below the quantile) <= alpha
    hi_rank = int(stats.binom.ppf(1 - alpha, total, q)) + 1
    lower = 0.0 if lo_rank < 1 else _at_rank(counts, lo_rank, low=True)
    upper = math.inf if hi_rank > total else _at_rank(counts, hi_rank, low=False)
    return lower, upper


def _at_rank(counts: list[tuple[float, float, int]], rank: int, low: bool) -> float:
    seen = 0
    for lo, hi, n in counts:
        seen += n
        if seen >= rank:
            return lo if low else hi
    return counts[-1][1]


def latency_check(hist: Histogram, limit: float, alpha: float, q: float = 0.99,
                  champion: Histogram | None = None) -> GuardrailResult:
    """The challenger's q-quantile latency against an absolute limit (ms), or, given the champion's histogram,
    against `limit` times the champion's. Fails only when a confidence bound clears the limit: a point
    estimate never rejects."""
    lower, upper = quantile_bounds(hist, q, alpha)
    n = sum(int(c) for _, _, c in hist)
    label = f"p{q * 100:g}"
    if n == 0:
        return GuardrailResult("latency", "pending", None, None, limit, f"Latency {label} not measured yet.")
    if champion is None:
        shown = f"Latency {label} in [{lower:.2f}, {upper:.2f}] ms ({n} calls, {1 - alpha:.2%} bounds)"
        if lower > limit:
            return GuardrailResult("latency", "fail", lower, lower, limit, f"{shown}: above the max {limit:g} ms.")
        if upper <= limit:
            return GuardrailResult("latency", "pass", upper, upper, limit, f"{shown}: within the max {limit:g} ms.")
        return GuardrailResult("latency", "pending", lower, upper, limit, f"{shown}: not yet within {limit:g} ms.")
    c_lower, c_upper = quantile_bounds(champion, q, alpha)
    shown = (f"Latency {label} [{lower:.2f}, {upper:.2f}] ms vs the champion's [{c_lower:.2f}, {c_upper:.2f}] ms "
             f"({1 - alpha:.2%} bounds)")
    if c_upper > 0 and lower > limit * c_upper:
        return GuardrailResult("latency_ratio_vs_champion", "fail", lower / c_upper, lower / c_upper, limit,
                               f"{shown}: more than {limit:g}x the champion's.")
    if c_lower > 0 and upper <= limit * c_lower:
        return GuardrailResult("latency_ratio_vs_champion", "pass", upper / c_lower, upper / c_lower, limit,
                               f"{shown}: within {limit:g}x the champion's.")
    return GuardrailResult("latency_ratio_vs_champion", "pending", None, None, limit,
                           f"{shown}: not yet within {limit:g}x the champion's.")


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio test of observed counts against expected shares: an anytime-valid p-value (1 / e-value)."""

    statistic: float  # log of the e-value (Bayes factor against the expected shares)
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]


def srm_test(observed: Sequence[int], expected_shares: Sequence[float], concentration: float = 100.0) -> SRMResult:
    """Dirichlet-multinomial Bayes factor of counts against fixed shares (Lindon & Malek 2022): re-tested every
    hour, a fair split is flagged at p < alpha with probability at most alpha. p = 1 when there is nothing to test."""
    obs = np.asarray(observed, dtype=float)
    shares = np.asarray(expected_shares, dtype=float)
    if obs.size != shares.size:
        raise ValueError("observed counts and expected shares differ in length")
    total = obs.sum()
    if total == 0 or obs.size < 2 or shares.sum() <= 0:
        return SRMResult(0.0, 1.0, tuple(int(o) for o in obs), tuple(float(s) for s in shares))
    p = shares / shares.sum()
    prior = concentration * p
    log_bf = float(math.lgamma(prior.sum()) - math.lgamma(prior.sum() + total)
                   + np.sum([math.lgamma(a + x) - math.lgamma(a) for a, x in zip(prior, obs, strict=True)])
                   - np.sum(obs * np.log(p)))
    return SRMResult(log_bf, float(min(1.0, math.exp(-log_bf))), tuple(int(o) for o in obs),
                     tuple(float(e) for e in p * total))


def ipw_balance_test(sum_w: float, sum_w2: float, n_total: int, alpha_scale: float = 1.0,
                     design_effect: float = 1.0) -> SRMResult:
    """Sample ratio under changing allocation (bandit, or A/B weights changed mid-rollout): each arm's sum of
    1/propensity over the requests it served estimates the number of all requests (Horvitz-Thompson), so a
    router that serves an arm less (or more) than its logged propensities say shows as a gap. Normal
    approximation; `alpha_scale` is the number of looks its p-value is multiplied by (a union bound keeps
    repeated looks valid); `design_effect` scales the variance where requests were assigned in clusters (every
    request of a unit to one arm: about the unit's mean requests)."""
    var = max((sum_w2 - n_total) * max(design_effect, 1.0), 1e-9)
    z = (sum_w - n_total) / math.sqrt(var)
    p = float(min(1.0, 2 * stats.norm.sf(abs(z)) * alpha_scale))
    return SRMResult(z, p, (int(round(sum_w)), n_total), (float(n_total), float(n_total)))


STABILITY_MIN_DAYS = 3  # fewer complete days say too little to judge a model on


def stability_check(challenger_days: Sequence[Moments], champion_days: Sequence[Moments], max_ratio: float,
                    alpha: float, min_swing: float) -> GuardrailResult:
    """Day-to-day swing of the challenger's daily metric against the champion's, on complete days, net of each
    day's sampling variance (a small A/B arm's day means vary by sampling alone). Fails only when a lower bound
    of the challenger's swing exceeds `max_ratio` times an upper bound of the champion's (and `min_swing`, the
    swing too small to matter); passes when the bounds say it cannot. Unsettled, it does not hold a promotion: a
    few weeks of days rarely settle it, and it exists to catch a challenger that is clearly erratic."""
    n_days = min(sum(d.n > 1 for d in challenger_days), sum(d.n > 1 for d in champion_days))
    if n_days < STABILITY_MIN_DAYS:
        return GuardrailResult("stability", "skipped", None, None, max_ratio,
                               f"Stability not judged: {n_days} complete day(s) of data, {STABILITY_MIN_DAYS} needed.")
    ch_lo, ch_hi = _swing_bounds(challenger_days, alpha)
    c_lo, c_hi = _swing_bounds(champion_days, alpha)
    reference_hi, reference_lo = max(c_hi, min_swing), max(c_lo, min_swing)
    shown = (f"Day-to-day swing of the daily metric beyond sampling, {n_days} complete days: challenger "
             f"[{ch_lo:.4f}, {ch_hi:.4f}], champion [{c_lo:.4f}, {c_hi:.4f}] ({1 - alpha:.2%} bounds)")
    if ch_lo > max_ratio * reference_hi:
        return GuardrailResult("stability", "fail", ch_lo, ch_lo, max_ratio,
                               f"{shown}: more than {max_ratio:g}x the champion's (or {min_swing:g}).")
    if ch_hi <= max_ratio * reference_lo:
        return GuardrailResult("stability", "pass", ch_hi, ch_hi, max_ratio,
                               f"{shown}: within {max_ratio:g}x the champion's (or {min_swing:g}).")
    return GuardrailResult("stability", "skipped", None, None, max_ratio,
                           f"{shown}: not settled (it rejects only a clearly erratic challenger).")


def _swing_bounds(days: Sequence[Moments], alpha: float) -> tuple[float, float]:
    """(lower, upper) bounds of the standard deviation of the true daily means, from the day means' spread
    (chi-square bounds on its variance) minus the mean sampling variance of a day's mean."""
    used = [d for d in days if d.n > 1]
    means = np.array([d.mean for d in used])
    sampling = float(np.mean([d.variance / d.n for d in used]))
    k = len(used) - 1
    spread = float(np.var(means, ddof=1))
    lo_var = spread * k / float(stats.chi2.ppf(1 - alpha / 2, k)) - sampling
    hi_var = spread * k / float(stats.chi2.ppf(alpha / 2, k)) - sampling
    return math.sqrt(max(lo_var, 0.0)), math.sqrt(max(hi_var, 0.0))


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


@dataclass(frozen=True)
class LabelSums:
    """Labels of one version's matured predictions: how many predictions, how many got a label, and how many
    labels arrived within each whole hour after their prediction (hour -> count)."""

    matured: int = 0
    labelled: int = 0
    delay_hours: tuple[tuple[int, int], ...] = ()

    @property
    def coverage(self) -> float:
        return self.labelled / self.matured if self.matured else math.nan

    def delay_quantile(self, q: float) -> float | None:
        """The whole hour by which a share q of the labels had arrived (an upper edge), or None without labels."""
        counts = sorted(self.delay_hours)
        total = sum(n for _, n in counts)
        if not total:
            return None
        seen = 0
        for hour, n in counts:
            seen += n
            if seen >= q * total:
                return float(hour + 1)
        return float(counts[-1][0] + 1)


def label_delay_check(labels: LabelSums, label_delay_hours: float, min_labels: int = 30) -> GuardrailResult:
    """Labels that arrive later than `label_delay_hours` mean that younger predictions are judged on the labels
    that came first, which can depend on the outcome (a default arrives in months, a repayment never): hold
    (never reject) while the observed p95 delay exceeds the setting."""
    p95 = labels.delay_quantile(0.95)
    if p95 is None or labels.labelled < min_labels:
        return GuardrailResult("label_delay", "pending" if labels.labelled else "skipped", None, None,
                               label_delay_hours, f"label_delay: {labels.labelled} labels so far; the delay is judged "
                               f"from {min_labels}.")
    if p95 - 1.0 > label_delay_hours:  # the bucket's lower edge is past the setting
        return GuardrailResult("label_delay", "pending", p95, p95, label_delay_hours,
                               f"label_delay: 95% of labels arrive within about {p95:.0f} h of their prediction, "
                               f"later than rollout.label_delay_hours {label_delay_hours:g}: younger predictions "
                               f"would be judged on the labels that came first; set it to at least {p95:.0f}.")
    return GuardrailResult("label_delay", "pass", p95, p95, label_delay_hours,
                           f"label_delay: 95% of labels arrive within about {p95:.0f} h, within "
                           f"rollout.label_delay_hours {label_delay_hours:g}.")


def label_coverage_check(challenger: LabelSums, champion: LabelSums | None, min_coverage: float,
                         max_gap: float, z: float = 4.0) -> GuardrailResult:
    """Matured predictions that got a label: at least `min_coverage`, and (A/B) alike in both arms: a gap beyond
    `max_gap` that is also beyond noise (z standard errors, a margin that hourly looks leave valid in practice)
    means labels depend on the arm, so the arms' losses are not comparable. Holds, never rejects."""
    cov = challenger.coverage
    if not challenger.matured:
        return GuardrailResult("label_coverage", "pending", None, None, min_coverage,
                               "label_coverage: no matured predictions yet.")
    if cov < min_coverage:
        return GuardrailResult("label_coverage", "pending", cov, cov, min_coverage,
                               f"label_coverage: {cov:.1%} of matured predictions have a label, under "
                               f"rollout.min_label_coverage {min_coverage:.0%}.")
    if champion is not None and champion.matured:
        other = champion.coverage
        se = math.sqrt(max(cov * (1 - cov), 1e-12) / challenger.matured + max(other * (1 - other), 1e-12)
                       / champion.matured)
        gap = cov - other
        if abs(gap) > max_gap and abs(gap) > z * se:
            return GuardrailResult("label_coverage", "pending", cov, gap, max_gap,
                                   f"label_coverage: {cov:.1%} of the challenger's matured predictions have a label "
                                   f"against {other:.1%} of the champion's (gap beyond "
                                   f"rollout.max_label_coverage_gap {max_gap:.0%}): labels depend on the arm, so "
                                   "their losses are not comparable; find out why before deciding.")
    return GuardrailResult("label_coverage", "pass", cov, cov, min_coverage,
                           f"label_coverage: {cov:.1%} of matured predictions have a label.")


def auc_from_histograms(positives: Sequence[int], negatives: Sequence[int], z: float = 1.959963984540054
                        ) -> tuple[float, float, float]:
    """ROC AUC with a DeLong interval from score histograms (counts per score bucket, same buckets, ascending)
    of the labelled positives and negatives; a tie (same bucket) counts a half. (nan, nan, nan) without both
    classes. DeLong's components per bucket: a positive's share of negatives below it, a negative's share of
    positives above it; the AUC's variance is theirs over m and n."""
    pos = np.asarray(positives, dtype=float)
    neg = np.asarray(negatives, dtype=float)
    m, n = pos.sum(), neg.sum()
    if m < 2 or n < 2:
        return math.nan, math.nan, math.nan
    neg_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    pos_above = m - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n  # per positive in each bucket
    v01 = (pos_above + 0.5 * pos) / m  # per negative in each bucket
    auc = float(np.dot(pos, v10) / m)
    var10 = float(np.dot(pos, (v10 - auc) ** 2) / (m - 1))
    var01 = float(np.dot(neg, (v01 - auc) ** 2) / (n - 1))
    se = math.sqrt(var10 / m + var01 / n)
    return auc, max(auc - z * se, 0.0), min(auc + z * se, 1.0)
