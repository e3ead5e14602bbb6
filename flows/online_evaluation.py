"""Flow `online-evaluation`: outcomes -> metrics -> anytime-valid test + guardrails -> decision -> act -> report."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, Field

from flows import forms
from tasks.common import load_policy_task
from tasks.evaluation import (
    act_task,
    current_rollout,
    data_clock,
    decide_task,
    gather_evidence,
    log_evaluation,
    report_task,
    retention_task,
)


class EvaluationParameters(BaseModel):
    """What a person can set from the Prefect UI's Run form."""

    now: forms.Time = Field(None, description="Evaluate as of this time (UTC); empty = now (or, with clock "
                                 "'data', the latest logged prediction's time). The demo compresses days.")
    clock: Literal["wall", "data"] = Field(
        "wall", description="'wall': now is the machine's time. 'data': now is the time of the rollout's latest "
        "logged prediction, for traffic replayed with its own times (rollout simulate --data --ts-column).")
    dry_run: bool = Field(False, description="Decide and report, but move no alias and change no routing.")
    actor: str = Field("online-evaluation", description="Who is recorded in the audit log.")


@dataclass
class EvaluationOutcome:
    """The decision of this run and what was done about it."""

    action: str
    rollout_id: int | None = None
    winner: str | None = None
    reasons: list[str] = field(default_factory=list)
    acted: dict[str, Any] = field(default_factory=dict)
    report: str | None = None
    retention: str | None = None  # what the retention step removed
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # by challenger version: the decision's figures


@flow(name="online-evaluation", log_prints=True)
def online_evaluation(config: str = "rollout.yaml",
                      params: EvaluationParameters = EvaluationParameters()) -> EvaluationOutcome:  # noqa: B008
    """Judge the open rollout from its logged outcomes and promote, keep collecting, or reject.

    Args:
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
        params: When to evaluate as of, whether to act, and who is recorded in the audit log.
    """
    params = params or EvaluationParameters()
    policy = load_policy_task(config)
    rollout = current_rollout(policy)
    if rollout is None:
        print("no open rollout: nothing to evaluate")
        now = _utc(params.now or datetime.now(timezone.utc))
        return EvaluationOutcome(action="idle", reasons=["No open rollout."],
                                 retention=retention_task(policy, now, params.dry_run))
    now = _utc(params.now or (data_clock(policy, rollout) if params.clock == "data" else None)
               or datetime.now(timezone.utc))

    evidence = gather_evidence(policy, rollout, now)
    decision = decide_task(policy, evidence, rollout.rollout_id, now)
    acted = {"acted": False, "reason": "dry run"} if params.dry_run else act_task(policy, decision, rollout, now,
                                                                                  params.actor)
    if not params.dry_run and not acted["acted"]:  # another run acted: nothing here may read like a decision
        print(f"rollout {rollout.rollout_id}: nothing done ({acted['reason']})")
        return EvaluationOutcome(action="idle", rollout_id=rollout.rollout_id, acted=acted,
                                 reasons=[f"Nothing done: {acted['reason']}."])
    report = report_task(policy, decision, rollout, now, evidence)
    log_evaluation(policy, decision, rollout, now, report)
    kept = retention_task(policy, now, params.dry_run)
    print(f"rollout {rollout.rollout_id}: {decision.action}" + (f" {decision.winner}" if decision.winner else ""))
    for reason in decision.reasons:
        print(f"  - {reason}")
    return EvaluationOutcome(action=decision.action, rollout_id=rollout.rollout_id, winner=decision.winner,
                             reasons=list(decision.reasons), acted=acted, report=str(report.markdown_path),
                             retention=kept, stats=decision.stats)


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
