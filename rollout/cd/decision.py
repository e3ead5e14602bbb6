"""Policy + evidence -> promotion decision (pure: no clock, no I/O; randomness only through `rng`).

Effects are reported better-is-positive: loss(champion) - loss(challenger) (with 0/1 loss, the
accuracy difference). Promotion is a non-inferiority test with margin M at one-sided alpha, split
across challengers; guardrails can block promotion (pending) or reject (breached with confidence).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal

import numpy as np

from rollout.config import RolloutPolicy
from rollout.roles import UNIT_SPLIT_MODES
from rollout.stats import bandit, guardrails, multiplicity, sequential
from rollout.stats.bandit import IPWSums
from rollout.stats.guardrails import AgreementSums, GuardrailResult
from rollout.stats.moments import ClusterSums, Confusion, Moments, total
from rollout.stats.sampling import WeightedMean

Action = Literal["promote", "continue", "reject", "inconclusive"]
Key = tuple[str, str]  # (segment, day)


@dataclass(frozen=True)
class ChallengerEvidence:
    """Everything measured about one challenger since the rollout started, per (segment, day) where keyed."""

    version: str
    paired: Mapping[Key, Moments] = field(default_factory=dict)  # shadow: loss(challenger) - loss(champion)
    loss: Mapping[Key, Moments] = field(default_factory=dict)  # its own loss: the A/B effect, stability
    confusion: Mapping[str, Confusion] = field(default_factory=dict)
    errors: int = 0
    requests: int = 0
    latency_p99_ms: float | None = None
    latency: guardrails.Histogram = ()  # (lower ms, upper ms, calls) per latency bucket
    agreement: AgreementSums | None = None
    psi_max: float | None = None
    looked_at: tuple[int, ...] = ()  # matured n at earlier evaluations (group-sequential design)
    planned_max: float | None = None  # group-sequential without max_samples: the maximum planned at its first look
    ipw: IPWSums | None = None  # bandit: propensity-weighted sums of its loss
    rate_per_hour: float | None = None
    units: ClusterSums | None = None  # its loss (A/B) or paired difference (shadow) summed per unit
    labels: guardrails.LabelSums | None = None  # label coverage and delays of its matured predictions
    # label requests: the weighted mean of its paired difference (shadow) or loss (ab/abn) over requested rows
    requested: WeightedMean | None = None


@dataclass(frozen=True)
class Evidence:
    """Inputs of one evaluation. served/expected_shares feed the sample-ratio test (in shadow: champion
    requests vs challenger shadow scorings, expected equal when expected_shares is empty; in ab/abn:
    units, the thing randomised)."""

    mode: str  # a config.Mode
    started_at: datetime
    now: datetime
    champion: str
    challengers: tuple[ChallengerEvidence, ...]
    champion_loss: Mapping[Key, Moments] = field(default_factory=dict)
    champion_units: ClusterSums | None = None  # A/B: the champion's loss summed per unit
    champion_labels: guardrails.LabelSums | None = None
    # delays of the latest labels received by the store (any rollout): what a young rollout cannot see yet
    label_history: guardrails.LabelSums | None = None
    # binary classifiers: each version's online ROC AUC with its DeLong 95% interval and labelled rows (report only)
    auc: Mapping[str, tuple[float, float, float, int]] = field(default_factory=dict)
    champion_confusion: Mapping[str, Confusion] = field(default_factory=dict)
    champion_ipw: IPWSums | None = None
    champion_requested: WeightedMean | None = None  # label requests, ab/abn: the champion's weighted loss
    served: Mapping[str, int] = field(default_factory=dict)
    served_unit: str = "requests"  # what `served` counts: "units" when traffic is split by unit (ab/abn)
    expected_shares: Mapping[str, float] = field(default_factory=dict)
    champion_latency_p99_ms: float | None = None
    champion_latency: guardrails.Histogram = ()


@dataclass(frozen=True)
class Decision:
    """What to do, who wins, why (sentences with numbers), and the statistics behind it."""

    action: Action
    winner: str | None
    reasons: list[str]
    stats: dict[str, dict[str, Any]]
    bandit_weights: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (infinities and NaN become None)."""
        safe: dict[str, Any] = _json_safe(
            {
                "action": self.action,
                "winner": self.winner,
                "reasons": list(self.reasons),
                "stats": self.stats,
                "bandit_weights": self.bandit_weights,
            }
        )
        return safe


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class _Effect:
    estimate: float
    se: float
    n: int  # challenger's matured outcomes (the sample size the bound refers to)
    n_min: int  # fewest matured outcomes of either version (for min_samples)
    sigma: float  # per-observation sd so that se = sigma / sqrt(n)
    method: str
    labels_at_random: float | None = None  # label requests: labels a uniformly random sample would need for se


def _effect(mode: str, ch: ChallengerEvidence, ev: Evidence) -> _Effect:
    """Better-is-positive effect of the challenger with its standard error, by mode. Where rows of a unit share
    an arm (A/B) or a pairing (shadow) and unit sums are known, the standard error is the larger of the row-level
    and the cluster-robust one: visits of one customer are not independent evidence."""
    if ch.requested is not None:
        return _requested(mode, ch.requested, ev.champion_requested)
    if mode == "shadow":
        d = total(ch.paired.values())
        se, method = _clustered(d.se, [ch.units], "paired differences")
        return _Effect(-d.mean if d.n else math.nan, se, d.n, d.n, _sigma(se, d.n), method)
    champ, chal = total(ev.champion_loss.values()), total(ch.loss.values())
    under_bandit = mode == "bandit" and ev.champion_ipw is not None and ch.ipw is not None
    if under_bandit or _reweighted(ch, ev):
        # Shares that moved while rows were logged (a bandit's weights; A/B weights changed mid-rollout): pooled
        # means would mix periods in different proportions per arm, so a drift of the base rate between them
        # would pass for a difference between the models. Each row weighs 1/its logged propensity, which
        # compares the arms over the same mix of periods; in A/B still clustered by unit.
        assert ev.champion_ipw is not None and ch.ipw is not None
        est, se = bandit.ipw_difference(ev.champion_ipw, ch.ipw, "hajek")
        method = "IPW (Hajek) difference"
        if not under_bandit:
            se, method = _clustered(se, [ch.units, ev.champion_units],
                                    f"{method}, stratified by exposure (weights changed mid-rollout)")
        n = ch.ipw.n
        return _Effect(est, se, n, min(n, ev.champion_ipw.n), _sigma(se, n), method)
    if champ.n < 2 or chal.n < 2:
        return _Effect(math.nan, math.nan, chal.n, min(champ.n, chal.n), math.nan, "Welch difference")
    est, se, _ = sequential.welch_difference(champ, chal)
    method = "Welch difference" if mode != "bandit" else "Welch difference (no IPW sums: biased under bandit)"
    if mode != "bandit":
        se, method = _clustered(se, [ch.units, ev.champion_units], method)
    return _Effect(est, se, chal.n, min(champ.n, chal.n), _sigma(se, chal.n), method)


def _requested(mode: str, mine: WeightedMean, champion: WeightedMean | None) -> _Effect:
    """The effect from the labels of requested rows, each weighted by 1 / its inclusion probability (Hajek), the
    larger of the row-level and unit-level standard errors; n counts labelled requested rows."""
    method = "weighted by 1/inclusion probability (label requests)"
    if mode == "shadow":
        se = mine.robust_se
        return _Effect(-mine.mean if mine.n else math.nan, se, mine.n, mine.n, _sigma(se, mine.n), method,
                       mine.labels_at_random())
    if champion is None or champion.n < 2 or mine.n < 2:
        return _Effect(math.nan, math.nan, mine.n, min(mine.n, champion.n if champion else 0), math.nan, method)
    se = math.sqrt(mine.robust_se**2 + champion.robust_se**2)
    # uniformly random labelling of every arm at one rate r gives se^2 = sum(spread / (r N)); labels = r sum(N)
    rate = (mine.spread / mine.sum_w + champion.spread / champion.sum_w) / se**2 if se > 0 else math.nan
    at_random = rate * (mine.sum_w + champion.sum_w)
    return _Effect(champion.mean - mine.mean, se, mine.n, min(mine.n, champion.n), _sigma(se, mine.n), method,
                   at_random)


def _group_sequential_max(policy: RolloutPolicy, ch: ChallengerEvidence, e: _Effect, alpha: float) -> float | None:
    """The design's maximum sample size: the policy's, else the one planned at an earlier look, else planned now
    (first look with min_samples outcomes) from the observed standard deviation for the planned power at the
    planned effect. Kept for the rollout from then on (the audit log carries it): a maximum re-planned every
    hour would move the information fractions the spent alpha was computed at."""
    if policy.max_samples is not None:
        return float(policy.max_samples)
    if ch.planned_max is not None:
        return ch.planned_max
    if e.n_min < max(policy.min_samples, 2) or not (math.isfinite(e.sigma) and e.sigma > 0):
        return None
    plan = sequential.plan_group_sequential(e.sigma, policy.min_detectable_effect, policy.margin, alpha, policy.power)
    return max(float(plan.max_samples), float(e.n))


def _reweighted(ch: ChallengerEvidence, ev: Evidence) -> bool:
    """An A/B rollout whose logged propensities vary within an arm: its weights were changed while it ran."""
    return (ev.mode in UNIT_SPLIT_MODES and ch.ipw is not None and ev.champion_ipw is not None
            and (ch.ipw.varied or ev.champion_ipw.varied))


def _clustered(se: float, parts: list[ClusterSums | None], method: str) -> tuple[float, str]:
    """The larger of a row-level standard error and the cluster-robust one from unit sums (when every part has
    them, from two units or more)."""
    if not parts or any(p is None or p.units < 2 for p in parts) or not math.isfinite(se):
        return se, method
    robust = math.sqrt(sum(p.var_of_mean for p in parts if p is not None))
    if not math.isfinite(robust):
        return se, method
    return max(se, robust), f"{method}, clustered by unit"


def _sigma(se: float, n: int) -> float:
    return se * math.sqrt(n) if n >= 2 and math.isfinite(se) else math.nan


def _by_day(parts: Mapping[Key, Moments]) -> dict[str, Moments]:
    days: dict[str, Moments] = defaultdict(Moments)
    for (_segment, day), m in parts.items():
        days[day] = days[day] + m
    return dict(days)


def _guardrails(policy: RolloutPolicy, ch: ChallengerEvidence, ev: Evidence) -> list[GuardrailResult]:
    """Every guardrail of the challenger. Their alpha (policy.guardrail_alpha) is split among those that can reject,
    so a challenger exactly at every limit is rejected by any of them, at any hourly look, at most that often."""
    checks_that_reject = len(policy.segment_guardrails) + 1 + (2 if ev.mode != "shadow" else 0) + 1
    a = policy.guardrail_alpha / checks_that_reject
    looks = max(policy.max_duration_days * 24.0, 1.0)  # latency bounds are fixed-sample: a union over the looks
    days = max(policy.max_duration_days, 1.0)  # stability changes once a day
    out: list[GuardrailResult] = []
    def labelled(check: GuardrailResult, counted: str) -> GuardrailResult:
        # With label requests the labelled rows are a sample favouring disagreements, with unequal weights: a
        # bound from them is approximate (the segment floors count each row by 1/its inclusion probability, at
        # the sample's effective size; the stability check's daily losses are unweighted), so it holds the
        # decision and never rejects.
        if ch.requested is None or check.status != "fail":
            return check
        return _as(check, "pending", f" (counted over requested labels, {counted}: holds, never rejects)")

    for g in policy.segment_guardrails:
        s, t = ch.confusion.get(g.key, Confusion()).successes(g.metric)
        out.append(labelled(guardrails.floor_check(g.name, s, t, g.min, a, policy.guardrail_min_trials),
                            "weighted by 1/inclusion probability"))
    out.append(guardrails.ceiling_check("error_rate", ch.errors, ch.requests, policy.max_error_rate, a,
                                        policy.guardrail_min_trials))
    complete = _complete_days(ev)
    ch_days, champ_days = _by_day(ch.loss), _by_day(ev.champion_loss)
    both = sorted(set(ch_days) & set(champ_days) & complete)
    out.append(labelled(guardrails.stability_check([ch_days[d] for d in both], [champ_days[d] for d in both],
                                                   policy.max_stability_ratio, a / days, policy.margin / 2),
                       "unweighted"))
    latency = [guardrails.latency_check(ch.latency, policy.max_latency_p99_ms, a / looks)]
    if ev.champion_latency:
        latency.append(guardrails.latency_check(ch.latency, policy.max_latency_ratio, a / looks,
                                                champion=ev.champion_latency))
    for check in latency:
        if ev.mode == "shadow":
            # Shadow calls run in larger background batches than the response path: their call time
            # says nothing about what callers would see. CI's stress gate compared them on equal inputs.
            check = _as(check, "skipped", " (shadow batches are off the response path; latency is gated in CI)")
        out.append(check)
    if ch.labels is not None:  # hold, never reject: labels that are late or missing unevenly bias the losses
        delay = guardrails.label_delay_check(ch.labels, policy.label_delay_hours, policy.guardrail_min_trials)
        if ev.label_history is not None and delay.status != "pending":
            # A young rollout has seen only its fast labels: a class of outcomes that arrives days later (a
            # default, a churn) shows only in the labels of older predictions.
            past = guardrails.label_delay_check(ev.label_history, policy.label_delay_hours,
                                                policy.guardrail_min_trials)
            if past.status == "pending" and past.value is not None:
                delay = _as(past, "pending", " (seen in the latest labels the store received, of predictions "
                            "made before this rollout too)")
        out.append(delay)
        out.append(guardrails.label_coverage_check(ch.labels, ev.champion_labels if ev.mode != "shadow" else None,
                                                   policy.min_label_coverage, policy.max_label_coverage_gap))
    proxies: list[GuardrailResult] = []
    if ch.agreement is not None:
        agree = guardrails.agreement_check(ch.agreement.n, ch.agreement.n_agree, policy.proxies.min_agreement, a)
        # a proxy is no proof of harm: out of bounds it blocks promotion, it never rejects
        proxies.append(agree if agree.status != "fail" else _as(agree, "pending"))
    proxies.append(guardrails.psi_check(ch.psi_max, policy.proxies.psi_max))
    for p in proxies:
        out.append(p if policy.proxies.gate else _as(p, "skipped", " (reported; proxies do not gate)"))
    return out


def _complete_days(ev: Evidence) -> set[str]:
    """The UTC days the rollout covered whole: after the day it started (unless it started at midnight), before
    the day of this evaluation."""
    first = ev.started_at.astimezone(UTC)
    start = first.date() if first.time() == time(0) else first.date() + timedelta(days=1)
    end = ev.now.astimezone(UTC).date()
    return {(start + timedelta(days=i)).isoformat() for i in range(max((end - start).days, 0))}


def _as(g: GuardrailResult, status: guardrails.Status, note: str = "") -> GuardrailResult:
    return GuardrailResult(g.name, status, g.value, g.bound, g.threshold, g.reason + note)


def _srm(policy: RolloutPolicy, ch: ChallengerEvidence, ev: Evidence) -> guardrails.SRMResult:
    """Champion vs this challenger's counts; default shares: equal in shadow, the policy's exposure in A/B. Under
    a bandit the shares move with the weights, so each arm's propensity-weighted count is checked instead."""
    if ev.mode == "bandit" or _reweighted(ch, ev):
        # Counts against today's shares would flag every change of them; each arm's propensity-weighted count
        # against all requests does not. In A/B whole units share an arm: the variance grows by their mean
        # requests (a bandit draws per request).
        if ch.ipw is None or ch.ipw.n_total == 0:
            return guardrails.SRMResult(0.0, 1.0, (0, 0), (0.0, 0.0))
        looks = max(policy.max_duration_days * 24.0, 1.0)
        units = ev.served.get(ch.version, 0) if ev.mode != "bandit" else 0
        deff = ch.requests / units if units else 1.0
        return guardrails.ipw_balance_test(ch.ipw.sum_w, ch.ipw.sum_w2, ch.ipw.n_total, alpha_scale=looks,
                                           design_effect=deff)
    observed = [ev.served.get(ev.champion, 0), ev.served.get(ch.version, 0)]
    if ev.mode in UNIT_SPLIT_MODES:
        default_champ, default_ch = 1.0 - len(ev.challengers) * policy.exposure, policy.exposure
    else:
        default_champ, default_ch = 1.0, 1.0
    shares = [ev.expected_shares.get(ev.champion, default_champ), ev.expected_shares.get(ch.version, default_ch)]
    return guardrails.srm_test(observed, shares)


def _percent(x: float) -> str:
    """A confidence level as people write it: 95%, 97.5%, 98.33%."""
    return f"{round(100 * x, 2):g}%"


def _fmt(x: float) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else ("+inf" if x > 0 else "-inf" if x < 0 else "n/a")


def decide(policy: RolloutPolicy, evidence: Evidence, rng: np.random.Generator | None = None) -> Decision:
    """Apply the policy's promotion rules to the evidence (stats per challenger: docs/architecture.md).

    `rng` draws the Thompson weights in bandit mode; None is a fixed seed (same evidence, same weights)."""
    ev = evidence
    k = len(ev.challengers)
    if k == 0:
        return Decision("continue", None, ["No challenger to evaluate."], {})
    margin = policy.margin
    age_h = (ev.now - ev.started_at).total_seconds() / 3600.0
    horizon = age_h >= policy.max_duration_days * 24.0
    old_enough = age_h >= policy.min_duration_hours
    metric = policy.primary_metric
    effects = {ch.version: _effect(ev.mode, ch, ev) for ch in ev.challengers}

    # alpha per challenger: Bonferroni split, or Holm on anytime-valid p-values (mixture design only)
    tune = multiplicity.bonferroni_alpha(policy.alpha, k)
    plans = {
        v: sequential.plan_mixture(e.sigma, policy.min_detectable_effect, margin, tune, policy.power)
        for v, e in effects.items()
    }
    # N* of a plan from a zero (or unknown) standard deviation is 0 or infinite: fall back to a sample size
    n_star = {v: (p.n_star if math.isfinite(p.n_star) and p.n_star > 0 else float(max(policy.min_samples, 1000)))
              for v, p in plans.items()}
    levels = {v: tune for v in effects}
    p_values: dict[str, float] = {}
    if policy.multiplicity == "holm" and policy.design == "mixture" and k > 1:
        for v, e in effects.items():
            p_values[v] = sequential.mixture_p_value(e.estimate, e.se, e.n, n_star[v], -margin, tune)
        levels = dict(zip(p_values, multiplicity.holm_levels(list(p_values.values()), policy.alpha), strict=True))

    reasons: list[str] = []
    stats: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, str] = {}
    for ch in ev.challengers:
        v, e, a = ch.version, effects[ch.version], levels[ch.version]
        if policy.design == "group_sequential":
            limit = _group_sequential_max(policy, ch, e, a)
            if limit is None:  # nothing planned before min_samples: no decision can be made yet anyway
                b = sequential.Bounds(e.estimate, e.se, -math.inf, math.inf, e.n)
                cap, past_cap = math.inf, False
            else:
                b = sequential.group_sequential_bounds(e.estimate, e.se, e.n, ch.looked_at, limit, a)
                cap, past_cap = limit, e.n >= limit
        else:
            b = sequential.mixture_bounds(e.estimate, e.se, e.n, n_star[v], a, tune)
            cap = plans[v].cap
            past_cap = False
        checks = _guardrails(policy, ch, ev)
        srm = _srm(policy, ch, ev)
        enough = e.n_min >= policy.min_samples and math.isfinite(e.estimate)
        failed = [g for g in checks if g.status == "fail"]
        waiting = [g for g in checks if g.status == "pending"]
        shown = (
            f"Version {v}: effect {_fmt(e.estimate)} ({metric}, better-is-positive, {e.method}), one-sided "
            f"{_percent(1 - a)} bounds [{_fmt(b.lower)}, {_fmt(b.upper)}] vs margin -{margin:g}, n={e.n:,.0f}"
        )
        if failed:  # measured within the challenger's own requests: valid however the traffic was split
            verdict = "reject"
            why = f"Version {v}: guardrail breached with confidence: " + " ".join(g.reason for g in failed)
        elif srm.p_value < policy.srm_p_value:
            verdict = "inconclusive" if horizon else "continue"
            why = (
                f"Version {v}: sample-ratio mismatch (anytime-valid p={srm.p_value:.2g} < {policy.srm_p_value:g}; "
                + (f"the challenger's propensity-weighted count {srm.observed[0]} vs {srm.observed[1]} requests"
                   if ev.mode == "bandit" or _reweighted(ch, ev) else
                   f"observed {srm.observed[0]} champion vs {srm.observed[1]} challenger {ev.served_unit}")
                + ") blocks any comparison of the two."
            )
        elif enough and b.upper < -margin:
            verdict = "reject"
            why = f"{shown}: the upper bound is below -margin, the challenger is worse."
        elif enough and b.lower > -margin and not waiting and old_enough:
            verdict = "promote"
            why = f"{shown}: the lower bound clears -margin and every guardrail holds."
        elif horizon or past_cap:
            verdict = "inconclusive"
            end = f"{policy.max_duration_days:g} days" if horizon else (
                f"max_samples {policy.max_samples}" if policy.max_samples else f"the planned maximum of {cap:,.0f} samples")
            why = f"{shown}: undecided at the horizon ({end}); the champion stays."
        else:
            verdict = "continue"
            missing = []
            if e.n_min < policy.min_samples:
                missing.append(f"{e.n_min} of {policy.min_samples} matured outcomes")
            if not old_enough:
                missing.append(f"{age_h:.1f} of {policy.min_duration_hours:g} hours")
            if waiting:
                missing.append("guardrails pending: " + ", ".join(g.name for g in waiting))
            if not (b.lower > -margin or b.upper < -margin):
                missing.append("the bounds still straddle -margin")
            why = f"{shown}: continue ({'; '.join(missing) or 'not settled'})."
        verdicts[v] = verdict
        reasons.append(why)

        rate = ch.rate_per_hour if ch.rate_per_hour is not None else (e.n / age_h if age_h > 0 else 0.0)
        if verdict == "continue":
            projected = sequential.samples_to_decide(e.estimate, e.sigma, margin, a, n_star[v])
            target = min(projected, cap) if math.isfinite(cap) else projected
            needed = max(target - e.n, policy.min_samples - e.n_min, 0.0)
            hours = max(sequential.hours_to_decision(needed, rate), policy.min_duration_hours - age_h, 0.0)
        else:
            needed, hours = 0.0, 0.0
        stats[v] = {
            "verdict": verdict,
            "estimate": e.estimate,
            "se": e.se,
            "lower": b.lower,
            "upper": b.upper,
            "alpha": a,
            "method": e.method,
            "design": policy.design,
            "cap_planned": policy.design == "group_sequential" and policy.max_samples is None and math.isfinite(cap),
            "n": e.n,
            "n_min": e.n_min,
            "labels_at_random": e.labels_at_random,
            "n_fixed": plans[v].n_fixed,
            "n_star": n_star[v],
            "cap": cap,
            "power": sequential.mixture_power(e.n, n_star[v], e.sigma, policy.min_detectable_effect, margin, a)
            if math.isfinite(e.sigma)
            else math.nan,
            "planned_power": policy.power,
            "samples_needed": needed,
            # what else a "continue" waits for: its needed samples count the effect's test only
            "pending_guardrails": [g.name for g in waiting] if verdict == "continue" else [],
            "rate_per_hour": rate,
            "hours_to_decision": hours,
            "p_value": p_values.get(v),
            "srm_p": srm.p_value,
            "guardrails": [g.to_dict() for g in checks],
        }

    weights = _bandit_weights(policy, ev, rng) if ev.mode == "bandit" else None
    passing = [v for v, d in verdicts.items() if d == "promote"]
    if passing:
        winner = max(passing, key=lambda v: effects[v].estimate)
        others = [v for v in passing if v != winner]
        if others:
            reasons.append(f"Promote {winner}, the best estimate among those that passed ({', '.join(passing)}).")
        if k > 1:
            reasons.append(f"Alpha {policy.alpha:g} split across {k} challengers by {policy.multiplicity}.")
        return Decision("promote", winner, reasons, stats, weights)
    if all(d == "reject" for d in verdicts.values()):
        return Decision("reject", None, reasons, stats, weights)
    if horizon or all(d in ("reject", "inconclusive") for d in verdicts.values()):
        reasons.append("No challenger can be promoted by the horizon: keep the champion.")
        return Decision("inconclusive", None, reasons, stats, weights)
    return Decision("continue", None, reasons, stats, weights)


def _bandit_weights(policy: RolloutPolicy, ev: Evidence, rng: np.random.Generator | None) -> dict[str, float]:
    """Thompson weights for champion and challengers (reward = -loss; Beta-Bernoulli for 0/1 loss)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    versions = [ev.champion] + [ch.version for ch in ev.challengers]
    losses = [total(ev.champion_loss.values())] + [total(ch.loss.values()) for ch in ev.challengers]
    counts = np.array([m.n for m in losses], dtype=float)
    if policy.primary_metric == "accuracy":
        wins = np.array([m.n - m.total for m in losses])
        w = bandit.thompson_beta(wins, counts, rng, floor=policy.bandit.floor, burn_in=policy.bandit.burn_in)
    else:
        means = np.array([-m.mean if m.n else 0.0 for m in losses])
        variances = np.array([m.variance if m.n >= 2 else 1.0 for m in losses])
        w = bandit.thompson_gaussian(
            means, variances, counts, rng, floor=policy.bandit.floor, burn_in=policy.bandit.burn_in
        )
    return {v: float(x) for v, x in zip(versions, w, strict=True)}
