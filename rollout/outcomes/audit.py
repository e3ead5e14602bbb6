"""Routing and audit: the rollout rows the service routes by, and the log of every decision and alias move."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from rollout.outcomes.engine import default_actor, wall_clock, write
from rollout.outcomes.schema import decisions, plans, routing, to_json
from rollout.roles import Role
from rollout.times import from_epoch


@dataclass(frozen=True)
class Rollout:
    """One row of the routing table: how traffic is split while a rollout runs."""

    rollout_id: int
    mode: str
    versions: dict[str, str]  # role (alias) -> version
    weights: dict[str, float]  # role or version -> share of traffic (ab/abn/bandit)
    salt: str
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None

    @property
    def champion(self) -> str:
        return self.versions[Role.CHAMPION]

    @property
    def challengers(self) -> dict[str, str]:
        """alias -> version of every challenger (everything but the champion)."""
        return {alias: v for alias, v in self.versions.items() if alias != Role.CHAMPION}


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log: a decision (or rollback) with its statistics and the alias moves it made."""

    id: int
    ts: datetime
    rollout_id: int | None
    decision: str
    stats: dict[str, Any]
    alias_moves: list[Any]
    actor: str


def open_rollout(engine: Engine, mode: str, versions: Mapping[str, str], weights: Mapping[str, float],
                 salt: str, start: float) -> int:
    """Record a new rollout, ending any open one, and return its id."""
    if Role.CHAMPION not in versions:
        raise ValueError("versions needs a 'champion' entry")
    with engine.begin() as conn:
        conn.execute(update(routing).where(routing.c.ended_at.is_(None))
                     .values(ended_at=start, end_reason="superseded by a new rollout"))
        return int(conn.execute(insert(routing).values(
            mode=mode,
            versions=to_json({str(k): str(v) for k, v in versions.items()}),
            weights=to_json({str(k): float(v) for k, v in weights.items()}),
            salt=salt,
            started_at=start,
            updated_at=start,
        ).returning(routing.c.rollout_id)).scalar_one())


def current_rollout(engine: Engine) -> Rollout | None:
    """The open rollout (the latest if several), or None."""
    query = select(routing).where(routing.c.ended_at.is_(None)).order_by(routing.c.rollout_id.desc()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(query).mappings().first()
    return _rollout(row) if row else None


def rollouts(engine: Engine, rollout_id: int | None = None) -> list[Rollout]:
    """Every rollout, oldest first (or the one with this id)."""
    query = select(routing).order_by(routing.c.rollout_id)
    if rollout_id is not None:
        query = query.where(routing.c.rollout_id == rollout_id)
    with engine.connect() as conn:
        return [_rollout(r) for r in conn.execute(query).mappings()]


def set_weights(engine: Engine, rollout_id: int, weights: Mapping[str, float], now: float) -> None:
    """Replace the traffic weights of a rollout (bandit allocation, exposure change)."""
    with engine.begin() as conn:
        done = conn.execute(update(routing).where(routing.c.rollout_id == rollout_id).values(
            weights=to_json({str(k): float(v) for k, v in weights.items()}), updated_at=now))
        if done.rowcount == 0:
            raise KeyError(f"no rollout {rollout_id}")


def end_rollout(engine: Engine, rollout_id: int, end: float, reason: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(routing).where(routing.c.rollout_id == rollout_id, routing.c.ended_at.is_(None))
                     .values(ended_at=end, end_reason=reason, updated_at=end))


def record_decision(engine: Engine, rollout_id: int | None, decision: str, stats: Mapping[str, Any],
                    alias_moves: list[Any], actor: str, ts: float) -> int:
    """Append to the audit log; returns the entry's id."""
    with engine.begin() as conn:
        return int(conn.execute(insert(decisions).values(
            ts=ts, rollout_id=rollout_id, decision=decision, stats=to_json(stats), alias_moves=to_json(alias_moves),
            actor=actor or default_actor()).returning(decisions.c.id)).scalar_one())


def audit_log(engine: Engine, rollout_id: int | None = None) -> list[AuditEntry]:
    """The audit log, oldest first (optionally of one rollout)."""
    query = select(decisions).order_by(decisions.c.ts, decisions.c.id)
    if rollout_id is not None:
        query = query.where(decisions.c.rollout_id == rollout_id)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [AuditEntry(id=r["id"], ts=from_epoch(r["ts"]), rollout_id=r["rollout_id"], decision=r["decision"],
                       stats=json.loads(r["stats"]), alias_moves=json.loads(r["alias_moves"]), actor=r["actor"])
            for r in rows]


@dataclass(frozen=True)
class StoredPlan:
    """A recorded plan as the store keeps it: steps as JSON-able dicts, progress and status."""

    id: int
    rollout_id: int | None
    decision: str
    steps: list[dict[str, Any]]
    done: int
    status: str
    stats: dict[str, Any]
    actor: str
    ts: float


def save_plan(engine: Engine, rollout_id: int | None, decision: str, steps: list[dict[str, Any]],
              stats: Mapping[str, Any], actor: str, ts: float) -> int:
    """Record a plan before its first step runs; returns its id."""
    with engine.begin() as conn:
        return int(conn.execute(insert(plans).values(
            rollout_id=rollout_id, decision=decision, steps=to_json(steps), done=0, status="pending",
            stats=to_json(stats), actor=actor or default_actor(), ts=ts, created_at=wall_clock(),
        ).returning(plans.c.id)).scalar_one())


def plan_progress(engine: Engine, plan_id: int, done: int) -> None:
    """Record that the plan's first `done` steps have been applied."""
    with engine.begin() as conn:
        conn.execute(update(plans).where(plans.c.id == plan_id, plans.c.done < done).values(done=done))


def finish_plan(engine: Engine, plan_id: int, status: str, alias_moves: list[Any]) -> int | None:
    """Mark a pending plan done (or reversed) and write its audit row, in one transaction; None if it was not
    pending any more (another run finished it)."""
    with write(engine) as conn:
        row = conn.execute(select(plans).where(plans.c.id == plan_id, plans.c.status == "pending")).mappings().first()
        if row is None:
            return None
        conn.execute(update(plans).where(plans.c.id == plan_id).values(status=status, finished_at=wall_clock()))
        decision = row["decision"] if status == "done" else f"{row['decision']} reversed"
        return int(conn.execute(insert(decisions).values(
            ts=row["ts"], rollout_id=row["rollout_id"], decision=decision, stats=row["stats"],
            alias_moves=to_json(alias_moves), actor=row["actor"]).returning(decisions.c.id)).scalar_one())


def pending_plans(engine: Engine) -> list[StoredPlan]:
    with engine.connect() as conn:
        rows = conn.execute(select(plans).where(plans.c.status == "pending").order_by(plans.c.id)).mappings().all()
    return [StoredPlan(r["id"], r["rollout_id"], r["decision"], json.loads(r["steps"]), int(r["done"]), r["status"],
                       json.loads(r["stats"]), r["actor"], float(r["ts"])) for r in rows]


def reopen_rollout(engine: Engine, rollout_id: int, now: float) -> None:
    """Undo an end (a reversed plan): the rollout is open again, unless another was opened since."""
    with write(engine) as conn:
        newer = conn.execute(select(routing.c.rollout_id).where(routing.c.rollout_id > rollout_id)).first()
        if newer is None:
            conn.execute(update(routing).where(routing.c.rollout_id == rollout_id)
                         .values(ended_at=None, end_reason=None, updated_at=now))


def _rollout(row: Any) -> Rollout:
    return Rollout(
        rollout_id=int(row["rollout_id"]),
        mode=row["mode"],
        versions=json.loads(row["versions"]),
        weights=json.loads(row["weights"]),
        salt=row["salt"],
        started_at=from_epoch(row["started_at"]),
        updated_at=from_epoch(row["updated_at"]),
        ended_at=None if row["ended_at"] is None else from_epoch(row["ended_at"]),
        end_reason=row["end_reason"],
    )
