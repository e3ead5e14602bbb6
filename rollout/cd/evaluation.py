"""From the outcome store's sums to the decision's Evidence, and from a Decision to registry moves."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from rollout.cd.decision import ChallengerEvidence, Decision, Evidence
from rollout.config import Policy
from rollout.data import Schema
from rollout.outcomes import LockHeld, Rollout, Store
from rollout.registry import ModelRegistry
from rollout.roles import ARCHIVED, UNIT_SPLIT_MODES, Role
from rollout.stats.moments import Confusion

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


def earlier_looks(store: Store, rollout_id: int, version: str) -> tuple[int, ...]:
    """Matured sample sizes at earlier evaluations of this rollout (for the group-sequential design)."""
    looks: list[int] = []
    for d in store.audit_log(rollout_id):
        n = (d.stats.get("stats") or {}).get(version, {}).get("n")
        if isinstance(n, int) and n > 0 and (not looks or n > looks[-1]):
            looks.append(n)
    return tuple(looks)


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
    loss = _by_version(sums.loss.get(metric, {}))
    paired = _by_version(sums.paired.get(metric, {})) if shadow else {}
    confusion = _confusion_by_version(sums.confusion) if policy.data.task == "classification" else {}
    traffic = sums.traffic
    latency = sums.latency_quantile(0.99)
    agreement = sums.agreement if shadow else {}
    ipw = sums.ipw.get(metric, {}) if rollout.mode == "bandit" else {}
    psi_max = production_psi(store, training, schema)
    hours = max((now - rollout.started_at).total_seconds() / 3600.0, 1e-9)

    challengers = []
    for version in rollout.challengers.values():
        counts = traffic.get(version)
        matured_n = sum(m.n for m in (paired.get(version) or loss.get(version) or {}).values())
        challengers.append(ChallengerEvidence(
            version=version,
            paired=paired.get(version, {}),
            loss=loss.get(version, {}),
            confusion=confusion.get(version, {}),
            errors=counts.errors if counts else 0,
            requests=counts.requests if counts else 0,
            latency_p99_ms=latency.get(version),
            agreement=agreement.get(version),
            psi_max=psi_max,
            looked_at=earlier_looks(store, rid, version) if rp.design == "group_sequential" else (),
            ipw=ipw.get(version),
            rate_per_hour=matured_n / hours,
        ))
    # The sample-ratio test counts what was randomised: units in ab/abn (sticky by unit id), requests else.
    by_unit = rollout.mode in UNIT_SPLIT_MODES
    served = (sums.units or {}) if by_unit else {v: c.requests for v, c in traffic.items()}
    shares = {} if rollout.mode == "shadow" else {rollout.versions[a]: w for a, w in rollout.weights.items()
                                                   if a in rollout.versions}
    return Evidence(
        mode=rollout.mode,
        started_at=rollout.started_at,
        now=now,
        champion=champion,
        challengers=tuple(challengers),
        champion_loss=loss.get(champion, {}),
        champion_confusion=confusion.get(champion, {}),
        champion_ipw=ipw.get(champion),
        served=served,
        served_unit="units" if by_unit else "requests",
        expected_shares=shares,
        champion_latency_p99_ms=latency.get(champion),
    )


@dataclass
class Action:
    """What the flow did to the registry and the routing table for one decision."""

    decision: str
    alias_moves: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    weights: dict[str, float] | None = None


def act(decision: Decision, rollout: Rollout, registry: ModelRegistry, store: Store, now: datetime) -> Action:
    """Carry out a decision: compare-and-set aliases, mirror stages, end or re-weight the rollout.

    The caller holds the store's evaluation lock, so two runs never act at once; the alias
    compare-and-set protects against anyone else moving @champion in between.
    """
    champion = rollout.champion
    challengers = rollout.challengers
    out = Action(decision.action)
    if decision.action == "promote" and decision.winner:
        registry.set_alias(Role.CHAMPION, decision.winner, expected=champion)
        out.alias_moves.append({"alias": Role.CHAMPION, "from": champion, "to": decision.winner})
        registry.set_alias(Role.PREVIOUS, champion)
        out.alias_moves.append({"alias": Role.PREVIOUS, "to": champion})
        registry.mirror_stage(champion, ARCHIVED)
        for alias, version in challengers.items():
            registry.remove_alias(alias)
            out.alias_moves.append({"alias": alias, "from": version, "to": None})
            if version != decision.winner:
                registry.mirror_stage(version, ARCHIVED)
        store.end_rollout(rollout.rollout_id, now, f"promoted version {decision.winner}")
        out.ended = True
    elif decision.action in ("reject", "inconclusive"):
        for alias, version in challengers.items():
            registry.remove_alias(alias)
            registry.mirror_stage(version, ARCHIVED)
            out.alias_moves.append({"alias": alias, "from": version, "to": None})
        store.end_rollout(rollout.rollout_id, now, f"{decision.action}: traffic returns to the champion")
        out.ended = True
    elif decision.bandit_weights and rollout.mode == "bandit":
        alias_of = {v: a for a, v in rollout.versions.items()}
        weights = {alias_of[v]: w for v, w in decision.bandit_weights.items() if v in alias_of}
        store.set_weights(rollout.rollout_id, weights)
        out.weights = weights
    for version in {champion, *challengers.values()}:
        registry.set_tags(version, {f"rollout.{rollout.rollout_id}.decision": decision.action,
                                    "last_evaluation": now.isoformat(timespec="seconds")})
    return out


@dataclass(frozen=True)
class Outcome:
    """What one evaluation run did: acted (with what) or not, and why not."""

    acted: bool
    action: Action | None = None
    reason: str = ""


def act_once(decision: Decision, rollout_id: int, registry: ModelRegistry, store: Store, now: datetime,
             actor: str) -> Outcome:
    """Act on a decision and record it, under the store's evaluation lock. A run that finds the lock held, or
    the rollout already ended by another run, acts on nothing and says so (two runs never promote twice)."""
    try:
        with store.lock("evaluation"):
            fresh = store.rollout(rollout_id)
            if fresh is None or fresh.ended_at is not None:
                return Outcome(False, reason="rollout already ended by another run")
            action = act(decision, fresh, registry, store, now)
            store.record_decision(rollout_id, decision.action, decision.to_dict(), action.alias_moves, actor, ts=now)
            return Outcome(True, action)
    except LockHeld as exc:
        return Outcome(False, reason=f"another evaluation is acting: {exc}")


def rollback(registry: ModelRegistry, store: Store, now: datetime, actor: str) -> dict[str, Any]:
    """Restore @previous-champion as @champion (the current one becomes previous), recorded."""
    current = registry.version_for_alias(Role.CHAMPION)
    previous = registry.version_for_alias(Role.PREVIOUS)
    if previous is None:
        raise RuntimeError("nothing to roll back to: no @previous-champion in the registry")
    registry.set_alias(Role.CHAMPION, previous, expected=current)
    if current is not None:
        registry.set_alias(Role.PREVIOUS, current)
        registry.mirror_stage(current, ARCHIVED)
    moves = [{"alias": Role.CHAMPION, "from": current, "to": previous},
             {"alias": Role.PREVIOUS, "from": previous, "to": current}]
    open_rollout = store.current_rollout()
    if open_rollout is not None:
        store.end_rollout(open_rollout.rollout_id, now, "rollback")
    store.record_decision(open_rollout.rollout_id if open_rollout else None, "rollback",
                          {"reasons": [f"rollback: version {previous} restored as champion, replacing {current}"]},
                          moves, actor, ts=now)
    return {"champion": previous, "replaced": current, "alias_moves": moves}
