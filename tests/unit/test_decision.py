"""decide(): the promotion rules a user relies on, on small hand-built evidence."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pytest

from rollout.config import RolloutPolicy, SegmentGuardrail
from rollout.cd.decision import ChallengerEvidence, Evidence, decide
from rollout.stats import sequential, simulation
from rollout.stats.bandit import IPWSums
from rollout.stats.moments import Confusion, Moments

START = datetime(2025, 3, 1, 0, 0)
DAYS = ("2025-03-01", "2025-03-02", "2025-03-03")
CHAMPION_WRONG = 0.20  # champion error rate on every day


def _paired(n: int, effect: float, disagreement: float = 0.2) -> Moments:
    """Moments of d = loss(challenger) - loss(champion) for 0/1 losses; effect is better-is-positive."""
    plus = round(n * (disagreement - effect) / 2)  # challenger wrong, champion right
    minus = round(n * (disagreement + effect) / 2)
    return Moments(n, float(plus - minus), float(plus + minus))


def _loss(n: int, wrong_rate: float) -> Moments:
    wrong = round(n * wrong_rate)
    return Moments(n, float(wrong), float(wrong))


def _challenger(
    version: str, effect: float, n_per_day: int, vip: Confusion = Confusion(tp=950, fp=10, fn=40, tn=0), **kw: object
) -> ChallengerEvidence:
    total_n = n_per_day * len(DAYS)
    base = dict(
        version=version,
        paired={("all", d): _paired(n_per_day, effect) for d in DAYS},
        loss={("all", d): _loss(n_per_day, CHAMPION_WRONG - effect + 0.002 * i) for i, d in enumerate(DAYS)},
        confusion={"VIP": vip},
        errors=2,
        requests=total_n,
        latency_p99_ms=40.0,
        latency=((38.0, 40.0, total_n),),  # every call between 38 and 40 ms
    )
    base.update(kw)
    return ChallengerEvidence(**base)  # type: ignore[arg-type]


def _evidence(*challengers: ChallengerEvidence, hours: float = 72.0, mode: str = "shadow", **kw: object) -> Evidence:
    n = challengers[0].requests
    served = {"v1": n, **{c.version: c.requests for c in challengers}}
    base = dict(
        mode=mode,
        started_at=START,
        now=START + timedelta(hours=hours),
        champion="v1",
        challengers=tuple(challengers),
        champion_loss={("all", d): _loss(n // len(DAYS), CHAMPION_WRONG + 0.002 * i) for i, d in enumerate(DAYS)},
        served=served,
        champion_latency=((38.0, 40.0, n),),
    )
    base.update(kw)
    return Evidence(**base)  # type: ignore[arg-type]


@pytest.fixture
def policy() -> RolloutPolicy:
    return RolloutPolicy(margin=0.01, alpha=0.05, min_samples=500, min_duration_hours=24, max_duration_days=14,
                         segment_guardrails=[SegmentGuardrail(segment="VIP", metric="precision", min=0.9)])


def test_clearly_better_challenger_is_promoted_with_reasons(policy: RolloutPolicy) -> None:
    decision = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000)))
    assert decision.action == "promote" and decision.winner == "v2"
    s = decision.stats["v2"]
    assert s["lower"] > -0.01 and s["estimate"] == pytest.approx(0.04, abs=1e-3)
    assert "lower bound clears -margin" in decision.reasons[0] and "+0.04" in decision.reasons[0]
    assert all(g["status"] in ("pass", "skipped") for g in s["guardrails"])
    json.dumps(decision.to_dict())  # the audit log stores it as JSON


def test_clearly_worse_challenger_is_rejected(policy: RolloutPolicy) -> None:
    decision = decide(policy, _evidence(_challenger("v2", effect=-0.05, n_per_day=3000)))
    assert decision.action == "reject" and decision.winner is None
    assert decision.stats["v2"]["upper"] < -0.01
    assert "worse" in decision.reasons[0]


def test_vip_precision_breach_rejects_even_when_overall_better(policy: RolloutPolicy) -> None:
    bad_vip = Confusion(tp=800, fp=200, fn=10, tn=0)  # precision 0.80 < floor 0.9
    decision = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000, vip=bad_vip)))
    assert decision.action == "reject"
    assert decision.stats["v2"]["lower"] > -0.01
    assert "VIP precision" in decision.reasons[0] and "800/1000" in decision.reasons[0]


def test_sample_ratio_mismatch_blocks_any_decision(policy: RolloutPolicy) -> None:
    better = _challenger("v2", effect=0.04, n_per_day=3000)
    skewed = {"v1": 9000, "v2": 8000}
    decision = decide(policy, _evidence(better, served=skewed))
    assert decision.action == "continue"
    assert "sample-ratio mismatch" in decision.reasons[0]
    worse = _challenger("v2", effect=-0.05, n_per_day=3000)
    assert decide(policy, _evidence(worse, served=skewed)).action == "continue"
    late = decide(policy, _evidence(better, served=skewed, hours=15 * 24))
    assert late.action == "inconclusive"
    # a guardrail breached within the challenger's own requests still rejects: it needs no comparison
    bad_vip = Confusion(tp=800, fp=200, fn=10, tn=0)
    breached = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000, vip=bad_vip), served=skewed))
    assert breached.action == "reject" and "VIP precision" in breached.reasons[0]


def test_too_young_rollout_continues_even_if_significant(policy: RolloutPolicy) -> None:
    decision = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000), hours=10))
    assert decision.action == "continue"
    assert decision.stats["v2"]["lower"] > -0.01
    assert "10.0 of 24 hours" in decision.reasons[0]
    assert decision.stats["v2"]["hours_to_decision"] == pytest.approx(14.0)


def test_not_enough_samples_continues_and_reports_what_is_missing(policy: RolloutPolicy) -> None:
    decision = decide(policy, _evidence(_challenger("v2", effect=0.0, n_per_day=100)))
    assert decision.action == "continue"
    s = decision.stats["v2"]
    assert s["samples_needed"] > 0 and 0 < s["hours_to_decision"] < float("inf")
    assert s["n_star"] == pytest.approx(s["n_fixed"]) and s["cap"] > s["n_fixed"]


def test_past_horizon_without_decision_is_inconclusive(policy: RolloutPolicy) -> None:
    decision = decide(policy, _evidence(_challenger("v2", effect=0.0, n_per_day=300), hours=15 * 24))
    assert decision.action == "inconclusive" and decision.winner is None
    assert "horizon" in " ".join(decision.reasons)


def test_several_challengers_promote_only_the_best_with_alpha_split(policy: RolloutPolicy) -> None:
    ev = _evidence(
        _challenger("v2", effect=0.03, n_per_day=3000),
        _challenger("v3", effect=0.05, n_per_day=3000),
        _challenger("v4", effect=-0.05, n_per_day=3000),
        mode="abn",
        expected_shares={"v1": 1, "v2": 1, "v3": 1, "v4": 1},
    )
    decision = decide(policy, ev)
    assert decision.action == "promote" and decision.winner == "v3"
    assert {v: s["alpha"] for v, s in decision.stats.items()} == pytest.approx({"v2": 0.05 / 3, "v3": 0.05 / 3, "v4": 0.05 / 3})
    assert decision.stats["v4"]["verdict"] == "reject"
    assert any("best estimate" in r for r in decision.reasons)


def test_holm_gives_the_strongest_challenger_less_strict_levels(policy: RolloutPolicy) -> None:
    holm = policy.model_copy(update={"multiplicity": "holm", "design": "mixture"})
    ev = _evidence(
        _challenger("v2", effect=0.03, n_per_day=3000),
        _challenger("v3", effect=0.05, n_per_day=3000),
        mode="abn",
        expected_shares={"v1": 1, "v2": 1, "v3": 1},
    )
    decision = decide(holm, ev)
    assert decision.winner == "v3"
    assert sorted(s["alpha"] for s in decision.stats.values()) == pytest.approx([0.025, 0.05])


def test_ab_mode_uses_unpaired_losses_and_exposure_for_srm(policy: RolloutPolicy) -> None:
    ch = _challenger("v2", effect=0.05, n_per_day=1000, paired={})
    ev = _evidence(ch, mode="ab", served={"v1": 27_000, "v2": 3000})
    decision = decide(policy, ev)  # exposure 0.1: 27,000 vs 3,000 is the planned split
    assert decision.stats["v2"]["method"] == "Welch difference"
    assert decision.stats["v2"]["srm_p"] > 0.5
    assert decision.action == "promote"


def test_bandit_mode_uses_ipw_and_reports_weights(policy: RolloutPolicy) -> None:
    rng = np.random.default_rng(0)
    n_total = 8000
    p_ch = np.where(np.arange(n_total) < 2000, 0.5, 0.8)  # allocation drifted toward the challenger
    to_ch = rng.uniform(size=n_total) < p_ch
    loss_ch = rng.binomial(1, 0.15, n_total).astype(float)
    loss_champ = rng.binomial(1, 0.25, n_total).astype(float)
    ch_ipw = IPWSums.of(loss_ch[to_ch], p_ch[to_ch], n_total)
    champ_ipw = IPWSums.of(loss_champ[~to_ch], 1 - p_ch[~to_ch], n_total)
    ch = _challenger("v2", effect=0.1, n_per_day=int(to_ch.sum()) // 3, ipw=ch_ipw, paired={})
    ev = _evidence(ch, mode="bandit", champion_ipw=champ_ipw, expected_shares={"v1": 1 - p_ch.mean(), "v2": p_ch.mean()},
                   served={"v1": int((~to_ch).sum()), "v2": int(to_ch.sum())})
    decision = decide(policy, ev, rng=np.random.default_rng(1))
    assert decision.stats["v2"]["method"].startswith("IPW")
    assert decision.stats["v2"]["estimate"] == pytest.approx(0.1, abs=0.03)
    assert decision.bandit_weights is not None
    assert sum(decision.bandit_weights.values()) == pytest.approx(1.0)
    assert decision.bandit_weights["v2"] > decision.bandit_weights["v1"] >= policy.bandit.floor


def test_group_sequential_design_uses_the_look_history(policy: RolloutPolicy) -> None:
    gs = policy.model_copy(update={"design": "group_sequential", "max_samples": 40_000})
    ch = _challenger("v2", effect=0.02, n_per_day=3000)
    early = decide(gs, _evidence(replace(ch, looked_at=())))
    many = decide(gs, _evidence(replace(ch, looked_at=(1000, 3000, 5000, 7000))))
    assert early.stats["v2"]["design"] == "group_sequential"
    assert early.stats["v2"]["cap"] == 40_000
    assert many.stats["v2"]["lower"] < early.stats["v2"]["lower"]  # earlier looks spent some alpha


def test_group_sequential_without_max_samples_plans_it_at_the_first_look_and_keeps_it(policy: RolloutPolicy) -> None:
    policy = policy.model_copy(update={"design": "group_sequential"})
    ch = _challenger("v2", effect=0.02, n_per_day=3000)
    first = decide(policy, _evidence(ch)).stats["v2"]
    sigma = first["se"] * math.sqrt(first["n"])
    plan = sequential.plan_group_sequential(sigma, 0.0, 0.01, 0.05, 0.8)
    assert first["cap_planned"] and first["cap"] == pytest.approx(plan.max_samples)
    # later looks use the maximum the first one planned (read back from the audit log), whatever sigma does
    later = decide(policy, _evidence(replace(ch, planned_max=50_000.0, looked_at=(9000,)))).stats["v2"]
    assert later["cap"] == 50_000.0
    # before min_samples nothing is planned and nothing decided
    young = decide(policy, _evidence(_challenger("v2", effect=0.02, n_per_day=100))).stats["v2"]
    assert not young["cap_planned"] and young["lower"] == -math.inf


def test_planned_group_sequential_keeps_false_promotion_under_alpha_and_decides_early() -> None:
    null, _, _ = simulation.simulate_planned_obf(np.random.default_rng(31), 1500, effect=-0.01)
    power, stop, _ = simulation.simulate_planned_obf(np.random.default_rng(32), 1500, effect=0.0)
    assert null <= 0.05 + 2 * (0.05 * 0.95 / 1500) ** 0.5
    assert power >= 0.8 - 2 * (0.8 * 0.2 / 1500) ** 0.5
    assert stop <= 0.85  # the mixture takes about 1.01 x the fixed-horizon n at the planned effect


def test_with_label_requests_a_guardrail_counting_labels_holds_instead_of_rejecting(policy: RolloutPolicy) -> None:
    """Requested labels favour disagreements: a segment floor counted over them, unweighted, is no proof of harm."""
    from rollout.stats.sampling import WeightedMean

    rng = np.random.default_rng(0)
    d = np.where(rng.random(3000) < 0.5, -1.0, 0.0)  # the challenger right where they disagree: clearly better
    requested = WeightedMean.of(d, np.full(d.size, 0.5))
    bad_vip = Confusion(tp=800, fp=200, fn=10, tn=0)
    decision = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000, vip=bad_vip,
                                                    requested=requested)))
    assert decision.action == "continue"
    vip = next(g for g in decision.stats["v2"]["guardrails"] if g["name"] == "VIP precision")
    assert vip["status"] == "pending" and "requested labels" in vip["reason"]
    assert decision.stats["v2"]["lower"] > -0.01 and "label requests" in decision.stats["v2"]["method"]


def test_a_challenger_waiting_on_a_guardrail_says_so_beside_its_samples_still_needed(policy: RolloutPolicy) -> None:
    """The effect's test is settled (no samples still needed for it) but the VIP precision floor has too few VIP
    rows to hold with confidence: the decision continues, and the report's "samples still needed" says the wait is
    the guardrail's, not a 0 that reads as "decided"."""
    from rollout.report import evaluation_markdown

    few_vip = Confusion(tp=9, fp=0, fn=1, tn=0)
    decision = decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000, vip=few_vip)))
    s = decision.stats["v2"]
    assert decision.action == "continue" and s["samples_needed"] == 0 and s["pending_guardrails"]
    report = evaluation_markdown(decision.to_dict(), model_name="m", rollout_id=1, mode="shadow",
                                 metric="accuracy", margin=0.01, champion="v1", now=START + timedelta(hours=72))
    row = next(line for line in report.splitlines() if line.startswith("| v2 | continue |"))
    assert f"0, then guardrails: {', '.join(s['pending_guardrails'])}" in row
    assert decide(policy, _evidence(_challenger("v2", effect=0.04, n_per_day=3000))).stats["v2"][
        "pending_guardrails"] == []  # promoted: nothing pending
