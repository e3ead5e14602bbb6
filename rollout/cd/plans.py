"""Every multi-step change (a promotion, a rejection, a rollback) as a recorded plan of idempotent steps.

A plan is written to the outcome store before its first step, and its progress after each one. A step
that finds its target already reached does nothing, so the next run (an evaluation, `rollout repair`)
finishes a half-applied plan; if someone else moved an alias meanwhile, it reverses the steps done instead.
The audit row is written with the plan's completion, in one transaction: no audit row, no finished plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rollout.cd.decision import Decision
from rollout.outcomes import Rollout, StoredPlan, Store
from rollout.registry import AliasConflict, ModelRegistry
from rollout.roles import ARCHIVED, Role, stage_of

Step = dict[str, Any]


def _alias(alias: str, to: str | None, frm: str | None) -> Step:
    return {"op": "alias", "alias": alias, "to": to, "from": frm}


def _stage(version: str, stage: str) -> Step:
    return {"op": "stage", "version": version, "stage": stage}


@dataclass(frozen=True)
class Planned:
    """A plan not yet recorded: its decision, steps and the audit row's statistics."""

    rollout_id: int | None
    decision: str
    steps: list[Step]
    stats: dict[str, Any]


def for_decision(decision: Decision, rollout: Rollout, aliases: Mapping[str, str], now: datetime) -> Planned:
    """The steps that carry out a decision on a rollout, given the registry's aliases now."""
    champion, challengers, rid = rollout.champion, rollout.challengers, rollout.rollout_id
    steps: list[Step] = []
    end_reason = None
    if decision.action == "promote" and decision.winner:
        steps += [_alias(Role.CHAMPION, decision.winner, champion), _stage(decision.winner, "Production"),
                  _alias(Role.PREVIOUS, champion, aliases.get(Role.PREVIOUS)), _stage(champion, ARCHIVED)]
        steps += [_alias(a, None, v) for a, v in challengers.items()]
        steps += [_stage(v, ARCHIVED) for v in challengers.values() if v != decision.winner]
        end_reason = f"promoted version {decision.winner}"
    elif decision.action in ("reject", "inconclusive"):
        steps += [_alias(a, None, v) for a, v in challengers.items()]
        steps += [_stage(v, ARCHIVED) for v in challengers.values()]
        end_reason = f"{decision.action}: traffic returns to the champion"
    elif decision.bandit_weights and rollout.mode == "bandit":
        alias_of = {v: a for a, v in rollout.versions.items()}
        weights = {alias_of[v]: w for v, w in decision.bandit_weights.items() if v in alias_of}
        steps.append({"op": "weights", "rollout_id": rid, "to": weights, "from": dict(rollout.weights)})
    when = now.isoformat(timespec="seconds")
    steps += [{"op": "tags", "version": v, "tags": {f"rollout.{rid}.role": role, f"rollout.{rid}.decision": said,
                                                    "last_evaluation": when}}
              for v, (role, said) in sorted(_what_it_meant(decision, champion, challengers).items())]
    if end_reason is not None:
        steps.append({"op": "end", "rollout_id": rid, "reason": end_reason, "at": now.timestamp()})
    return Planned(rid, decision.action, steps, decision.to_dict())


def _what_it_meant(decision: Decision, champion: str | None,
                   challengers: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Per version of the rollout, its role and what the decision meant for it, as its tags say: the winner
    'promote', the champion it replaced 'replaced by vN', a rejected challenger 'reject', the champion kept
    'kept (reject of vN)'; while collecting, the challengers only ('continue')."""
    out: dict[str, tuple[str, str]] = {}
    names = ", ".join(f"v{v}" for v in sorted(challengers.values()))
    for alias, version in challengers.items():
        if decision.action == "promote":
            said = "promote" if version == decision.winner else "not chosen"
        else:
            said = decision.action
        out[version] = (str(alias), said)
    if champion is not None and decision.action == "promote" and decision.winner:
        out[champion] = ("champion", f"replaced by v{decision.winner}")
    elif champion is not None and decision.action in ("reject", "inconclusive"):
        out[champion] = ("champion", f"kept ({decision.action} of {names})")
    return out


def for_rollback(aliases: Mapping[str, str], open_rollout: Rollout | None, now: datetime) -> Planned:
    """@previous-champion back as @champion (the current one becomes previous), ending any open rollout."""
    current, previous = aliases.get(Role.CHAMPION), aliases.get(Role.PREVIOUS)
    if previous is None:
        raise RuntimeError("nothing to roll back to: no @previous-champion in the registry")
    steps = [_alias(Role.CHAMPION, previous, current), _stage(previous, "Production"),
             _alias(Role.PREVIOUS, current, previous)]
    if current is not None:
        steps.append(_stage(current, ARCHIVED))
    rid = open_rollout.rollout_id if open_rollout else None
    if open_rollout is not None:
        steps.append({"op": "end", "rollout_id": rid, "reason": "rollback", "at": now.timestamp()})
    reason = f"rollback: version {previous} restored as champion, replacing {current}"
    return Planned(rid, "rollback", steps, {"reasons": [reason]})


def alias_moves(steps: list[Step]) -> list[dict[str, Any]]:
    """The audit log's view of a plan: every alias it moves, from where to where."""
    return [{"alias": s["alias"], "from": s["from"], "to": s["to"]} for s in steps if s["op"] == "alias"]


def execute(planned: Planned, registry: ModelRegistry, store: Store, actor: str, ts: datetime) -> StoredPlan:
    """Record the plan, then run it to the end (the caller holds the evaluation lock)."""
    plan_id = store.save_plan(planned.rollout_id, planned.decision, planned.steps, planned.stats, actor, ts)
    plan = next(p for p in store.pending_plans() if p.id == plan_id)
    finish(plan, registry, store)
    return plan


def finish(plan: StoredPlan, registry: ModelRegistry, store: Store) -> None:
    """Apply the plan's remaining steps, recording progress, then its completion and audit row."""
    for i in range(plan.done, len(plan.steps)):
        _apply(plan.steps[i], registry, store)
        store.plan_progress(plan.id, i + 1)
    store.finish_plan(plan.id, "done", alias_moves(plan.steps))


def reverse(plan: StoredPlan, registry: ModelRegistry, store: Store) -> None:
    """Undo what the plan did, last first: every alias, end or weights step whose target is in place (its
    own doing; what someone else moved since stays as they left it). Stages follow the restored aliases."""
    for step in reversed(plan.steps[: plan.done + 1]):  # the step that failed may have applied before failing
        if step["op"] == "alias":
            if registry.version_for_alias(step["alias"]) != step["to"]:
                continue
            if step["from"] is None:
                registry.remove_alias(step["alias"])
            else:
                registry.set_alias(step["alias"], step["from"], expected=step["to"])
                if stage := stage_of(step["alias"]):
                    registry.mirror_stage(step["from"], stage)
        elif step["op"] == "end":
            rollout = store.rollout(step["rollout_id"])
            if rollout is not None and rollout.end_reason == step["reason"]:
                store.reopen_rollout(step["rollout_id"])
        elif step["op"] == "weights":
            rollout = store.rollout(step["rollout_id"])
            if rollout is not None and rollout.weights == step["to"]:
                store.set_weights(step["rollout_id"], step["from"])
    store.finish_plan(plan.id, "reversed", [])


@dataclass(frozen=True)
class Settled:
    """A half-applied plan a later run found: finished, or reversed, and the sentence that says so."""

    plan: StoredPlan
    finished: bool
    note: str


def settle(registry: ModelRegistry, store: Store) -> list[Settled]:
    """Finish every half-applied plan, or reverse it when an alias it needs was moved by someone else."""
    out = []
    for plan in store.pending_plans():
        what = f"plan {plan.id} ({plan.decision}, rollout {plan.rollout_id}, {plan.done} of {len(plan.steps)} steps done)"
        try:
            finish(plan, registry, store)
            out.append(Settled(plan, True, f"finished the half-applied {what}"))
        except AliasConflict as exc:
            progressed = next(p for p in store.pending_plans() if p.id == plan.id)
            reverse(progressed, registry, store)
            out.append(Settled(plan, False, f"reversed the half-applied {what}: {exc}"))
    return out


def _apply(step: Step, registry: ModelRegistry, store: Store) -> None:
    """One step, idempotently: a step whose target is already reached does nothing."""
    op = step["op"]
    if op == "alias":
        alias, to, frm = step["alias"], step["to"], step["from"]
        current = registry.version_for_alias(alias)
        if current == to:
            return
        if current != frm:
            raise AliasConflict(f"@{alias} is at {current}, expected {frm} (or {to})")
        if to is None:
            registry.remove_alias(alias)
        else:
            registry.set_alias(alias, to, expected=current)
    elif op == "stage":
        registry.mirror_stage(step["version"], step["stage"])
    elif op == "tags":
        registry.set_tags(step["version"], step["tags"])
    elif op == "end":
        store.end_rollout(step["rollout_id"], step["at"], step["reason"])
    elif op == "weights":
        store.set_weights(step["rollout_id"], step["to"])
    else:
        raise ValueError(f"unknown plan step {op!r}")
