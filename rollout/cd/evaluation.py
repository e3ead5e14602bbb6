"""From the outcome store's sums to the decision's Evidence, and from a Decision to registry moves."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from rollout.cd import plans
from rollout.cd.label_requests import RequestedEvidence, requested_evidence
from rollout.cd.decision import ChallengerEvidence, Decision, Evidence
from rollout.config import CLASSIFICATION_TASKS, Policy, SegmentGuardrail
from rollout.data import Schema
from rollout.outcomes import LockHeld, Rollout, Store
from rollout.models import own_metric
from rollout.outcomes.log import ClassCell, OutcomeCell
from rollout.registry import ModelRegistry
from rollout.roles import UNIT_SPLIT_MODES
from rollout.stats.guardrails import LabelSums, auc_from_histograms
from rollout.stats.moments import ClusterSums, Confusion, Moments
from rollout.stats.sampling import WeightedMean
from rollout.times import to_epoch

def _by_version(parts: Mapping[tuple[Any, ...], Any]) -> dict[str, dict[tuple[str, str], Any]]:
    out: dict[str, dict[tuple[str, str], Any]] = defaultdict(dict)
    for (version, segment, day), value in parts.items():
        out[str(version)][(segment or "", day)] = value
    return out


def _confusion_by_version(parts: Mapping[tuple[Any, ...], Confusion]) -> dict[str, dict[str, Confusion]]:
    out: dict[str, dict[str, Confusion]] = defaultdict(dict)
    for (version, segment), value in parts.items():
        key = segment or ""
        out[str(version)][key] = out[str(version)].get(key, Confusion()) + value
    return out


def _class_confusions(counts: Mapping[ClassCell, int],
                      guards: Sequence[SegmentGuardrail]) -> dict[str, dict[str, Confusion]]:
    """Per version, each multiclass guardrail's counts under its key: one-vs-rest cells of its class (precision,
    recall), or right (tp) and wrong (fp) answers for an accuracy floor; over its segment or every row."""
    out: dict[str, dict[str, Confusion]] = defaultdict(dict)
    for g in guards:
        for (version, segment, predicted, actual), n in counts.items():
            if g.segment is not None and (segment or "") != g.segment:
                continue
            if g.class_ is None:
                cell = Confusion(tp=n) if predicted == actual else Confusion(fp=n)
            else:
                said, was = predicted == g.class_, actual == g.class_
                cell = Confusion(tp=n) if said and was else Confusion(fp=n) if said else (
                    Confusion(fn=n) if was else Confusion(tn=n))
            out[version][g.key] = out[version].get(g.key, Confusion()) + cell
    return out


def own_losses(cells: Mapping[OutcomeCell, int], function: Any) -> tuple[dict[tuple[Any, ...], Moments],
                                                                         dict[tuple[Any, ...], Moments]]:
    """Loss moments per (version, segment, day), and paired-difference moments (loss minus the champion's on the
    same request), of your own per-row loss function(y_true, prediction), from counted (prediction, label)
    cells: the function is called once per distinct cell, on arrays, and each value weighs its count."""
    import numpy as np

    if not cells:
        return {}, {}
    keys = list(cells)
    y = np.array([k[4] for k in keys], dtype=float)
    own = np.asarray(function(y, np.array([k[3] for k in keys], dtype=float)), dtype=float)
    paired_at = [i for i, k in enumerate(keys) if k[5] is not None]
    theirs = np.asarray(function(y[paired_at], np.array([keys[i][5] for i in paired_at], dtype=float)),
                        dtype=float) if paired_at else np.empty(0)
    if own.shape != y.shape or not np.all(np.isfinite(own)) or not np.all(np.isfinite(theirs)):
        raise ValueError("rollout.primary_metric: your loss function must return one finite number per row")
    loss: dict[tuple[Any, ...], Moments] = defaultdict(Moments)
    paired: dict[tuple[Any, ...], Moments] = defaultdict(Moments)
    for i, key in enumerate(keys):
        n, value = cells[key], float(own[i])
        loss[key[:3]] += Moments(n, n * value, n * value * value)
    for j, i in enumerate(paired_at):
        n, d = cells[keys[i]], float(own[i] - theirs[j])
        paired[keys[i][:3]] += Moments(n, n * d, n * d * d)
    return dict(loss), dict(paired)


def unit_evidence(store: Store, rollout: Rollout, policy: Policy, cutoff: datetime) -> dict[str, ClusterSums]:
    """Per version, the primary metric's loss summed per unit (A/B: units were randomised; shadow: the paired
    differences), when the policy names a unit column; else nothing (each request is its own unit)."""
    if policy.data.unit_column is None or rollout.mode == "bandit" or ":" in policy.rollout.primary_metric:
        return {}
    champion = rollout.champion if rollout.mode == "shadow" else None
    return store.unit_sums(rollout.rollout_id, policy.rollout.primary_metric, cutoff, champion)


def age_from(store: Store, rollout: Rollout) -> datetime:
    """When the rollout's age starts: its opening, or its first logged prediction when that is earlier, which
    only replayed traffic (`rollout simulate --data`, times from the data) can be: its age is the data's."""
    first = store.first_seen(rollout.rollout_id)
    return rollout.started_at if first is None else min(rollout.started_at, first)


def data_time(store: Store, rollout: Rollout) -> datetime | None:
    """The time of the rollout's latest logged prediction: the evaluation's clock for replayed traffic."""
    return store.last_seen(rollout.rollout_id)


def earlier_looks(store: Store, rollout_id: int, version: str) -> tuple[tuple[int, ...], float | None]:
    """Matured sample sizes at earlier evaluations of this rollout, and the maximum sample size the first of
    them planned when the policy gives none (the group-sequential design)."""
    looks: list[int] = []
    planned: float | None = None
    for d in store.audit_log(rollout_id):
        stats = (d.stats.get("stats") or {}).get(version, {})
        n = stats.get("n")
        if isinstance(n, int) and n > 0 and (not looks or n > looks[-1]):
            looks.append(n)
        if planned is None and stats.get("cap_planned") and isinstance(stats.get("cap"), int | float):
            planned = float(stats["cap"])
    return tuple(looks), planned


def production_psi(store: Store, training: pd.DataFrame | None, schema: Schema | None,
                   limit: int = 5000) -> float | None:
    """Largest PSI of a numeric feature between recent served inputs and the training data."""
    if training is None or schema is None:
        return None
    from rollout.ci.validation import psi  # Great Expectations loads only when the policy asks for PSI

    recent = store.recent_features(limit=limit)
    cols = [c for c in schema.numeric if c in recent.columns]
    if recent.empty or not cols:
        return None
    return max(psi(training[c], pd.to_numeric(recent[c], errors="coerce")) for c in cols)


def gather(store: Store, rollout: Rollout, policy: Policy, now: datetime,
           training: pd.DataFrame | None = None, schema: Schema | None = None) -> Evidence:
    """Everything the decision needs about one rollout, from one snapshot of the store's sums."""
    rp = policy.rollout
    rid, metric = rollout.rollout_id, rp.primary_metric
    champion = rollout.champion
    sums = store.evidence(rid, now - timedelta(hours=rp.label_delay_hours))
    shadow = rollout.mode == "shadow"
    if ":" in metric:  # your own per-row loss of (label, prediction), computed here from the counted cells
        cells = store.outcome_cells(rid, now - timedelta(hours=rp.label_delay_hours), champion if shadow else None)
        own_loss, own_paired = own_losses(cells, own_metric(metric, "rollout.primary_metric"))
        loss, paired = _by_version(own_loss), (_by_version(own_paired) if shadow else {})
    else:
        loss = _by_version(sums.loss.get(metric, {}))
        paired = _by_version(sums.paired.get(metric, {})) if shadow else {}
    if policy.data.task == "multiclass":
        confusion = (_class_confusions(store.class_counts(rid, now - timedelta(hours=rp.label_delay_hours)),
                                       rp.segment_guardrails) if rp.segment_guardrails else {})
    else:
        confusion = _confusion_by_version(sums.confusion) if policy.data.task in CLASSIFICATION_TASKS else {}
    traffic = sums.traffic
    latency = sums.latency_quantile(0.99)
    agreement = sums.agreement if shadow and policy.data.task in CLASSIFICATION_TASKS else {}  # equal labels: classes
    # propensity-weighted sums: the bandit's estimate, and A/B's once its weights changed mid-rollout
    ipw = sums.ipw.get(metric, {}) if not shadow else {}
    psi_max = production_psi(store, training, schema)
    cut = now - timedelta(hours=rp.label_delay_hours)
    units = unit_evidence(store, rollout, policy, cut)
    label_sums = store.label_sums(rid, cut)
    requested: RequestedEvidence | None = None
    if rp.label_requests.enabled:  # only the requested rows' labels count, weighted by their probabilities
        requested = requested_evidence(store.requested_rows(rid), rollout.mode, champion, metric, to_epoch(cut),
                                       units=policy.data.unit_column is not None,
                                       binary=policy.data.task == "classification")
        label_sums = dict(requested.labels)
        if policy.data.task == "classification":  # the segment floors judge the traffic, not the sample
            confusion = {v: dict(c) for v, c in requested.confusion.items()}
    started = age_from(store, rollout)
    hours = max((now - started).total_seconds() / 3600.0, 1e-9)

    challengers = []
    for version in rollout.challengers.values():
        counts = traffic.get(version)
        matured_n = sum(m.n for m in (paired.get(version) or loss.get(version) or {}).values())
        mine = None
        if requested is not None:
            mine = requested.means.get(version, WeightedMean.of([], []))
            matured_n = mine.n
        history = earlier_looks(store, rid, version) if rp.design == "group_sequential" else ((), None)
        challengers.append(ChallengerEvidence(
            version=version,
            paired=paired.get(version, {}),
            loss=loss.get(version, {}),
            confusion=confusion.get(version, {}),
            errors=counts.errors if counts else 0,
            requests=counts.requests if counts else 0,
            latency_p99_ms=latency.get(version),
            latency=tuple(sums.latency_buckets(version)),
            agreement=agreement.get(version),
            psi_max=psi_max,
            looked_at=history[0],
            planned_max=history[1],
            ipw=ipw.get(version),
            rate_per_hour=matured_n / hours,
            units=units.get(version),
            labels=label_sums.get(version, LabelSums()),
            requested=mine,
        ))
    # The sample-ratio test counts what was randomised: units in ab/abn (sticky by unit id), requests else.
    by_unit = rollout.mode in UNIT_SPLIT_MODES
    served = (sums.units or {}) if by_unit else {v: c.requests for v, c in traffic.items()}
    shares = {} if rollout.mode == "shadow" else {rollout.versions[a]: w for a, w in rollout.weights.items()
                                                   if a in rollout.versions}
    auc = {}
    if policy.data.task == "classification":
        for version, (pos, neg) in store.score_histograms(rid, cut).items():
            auc[version] = (*auc_from_histograms(pos, neg), sum(pos) + sum(neg))
    return Evidence(
        auc=auc,
        mode=rollout.mode,
        started_at=started,
        now=now,
        champion=champion,
        challengers=tuple(challengers),
        champion_loss=loss.get(champion, {}),
        champion_units=units.get(champion) if not shadow else None,
        champion_labels=label_sums.get(champion),
        label_history=store.recent_label_delays(),
        champion_confusion=confusion.get(champion, {}),
        champion_ipw=ipw.get(champion),
        champion_requested=(requested.means.get(champion, WeightedMean.of([], []))
                            if requested is not None and not shadow else None),
        served=served,
        served_unit="units" if by_unit else "requests",
        expected_shares=shares,
        champion_latency_p99_ms=latency.get(champion),
        champion_latency=tuple(sums.latency_buckets(champion)),
    )


@dataclass(frozen=True)
class Action:
    """What carrying out a decision did to the registry and the routing table."""

    decision: str
    alias_moves: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    weights: dict[str, float] | None = None

    @classmethod
    def of(cls, planned: plans.Planned) -> Action:
        weights = next((s["to"] for s in planned.steps if s["op"] == "weights"), None)
        return cls(planned.decision, plans.alias_moves(planned.steps), any(s["op"] == "end" for s in planned.steps),
                   weights)


def act(decision: Decision, rollout: Rollout, registry: ModelRegistry, store: Store, now: datetime,
        actor: str = "") -> Action:
    """Carry out a decision as a recorded plan: aliases by compare-and-set, mirrored stages, tags, the rollout
    ended or re-weighted, and the audit row. The caller holds the store's evaluation lock."""
    planned = plans.for_decision(decision, rollout, registry.aliases(), now)
    plans.execute(planned, registry, store, actor, now)
    return Action.of(planned)


@dataclass(frozen=True)
class Outcome:
    """What one evaluation run did: acted (with what) or not and why not, and any half-applied plan it settled."""

    acted: bool
    action: Action | None = None
    reason: str = ""
    settled: list[str] = field(default_factory=list)


def act_once(decision: Decision, rollout_id: int, registry: ModelRegistry, store: Store, now: datetime,
             actor: str) -> Outcome:
    """Under the store's evaluation lock: settle any half-applied plan, then act on the decision. A run that
    finds the lock held, or the rollout already ended by another run, acts on nothing and says so."""
    try:
        with store.lock("evaluation"):
            settled = [s.note for s in plans.settle(registry, store)]
            fresh = store.rollout(rollout_id)
            if fresh is None or fresh.ended_at is not None:
                return Outcome(False, reason="the rollout was already ended by another run", settled=settled)
            return Outcome(True, act(decision, fresh, registry, store, now, actor), settled=settled)
    except LockHeld as exc:
        return Outcome(False, reason=f"another evaluation is acting: {exc}")


def rollback(registry: ModelRegistry, store: Store, now: datetime, actor: str) -> dict[str, Any]:
    """Restore @previous-champion as @champion (the current one becomes previous), as a recorded plan; a
    rollback an outage left half-applied is finished instead of a second one. The caller holds the lock."""
    settled = plans.settle(registry, store)
    unfinished = [s.plan for s in settled if s.finished and s.plan.decision == "rollback"]
    steps = unfinished[-1].steps if unfinished else None
    if steps is None:
        planned = plans.for_rollback(registry.aliases(), store.current_rollout(), now)
        plans.execute(planned, registry, store, actor, now)
        steps = planned.steps
    moves = plans.alias_moves(steps)
    return {"champion": moves[0]["to"], "replaced": moves[0]["from"], "alias_moves": moves,
            "settled": [s.note for s in settled]}
