"""Tasks that compare production inputs with the training data (continuous training)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from rollout.config import Policy
from rollout.data import infer_schema, load_dataset
from rollout.outcomes import OutcomeStore
from rollout.outcomes.redaction import Redaction
from rollout.ci.validation import drift_report
from tasks.common import artifact_key


@dataclass(frozen=True)
class DriftCheck:
    """The verdict on the training data: stale (features drifted) or not, in words."""

    drifted: list[str] = field(default_factory=list)
    reason: str = ""
    rows: int = 0


@task(name="production-drift", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def production_drift(policy: Policy, window: int) -> DriftCheck:
    """Drift of the latest `window` served inputs against the training data, feature by feature."""
    recent = OutcomeStore(policy.outcome_url).recent_features(limit=window)
    kept = Redaction.for_policy(policy, require_key=False).describe()
    if len(recent) < 100:
        return DriftCheck(reason=f"Only {len(recent)} production rows logged with their features; too few to judge "
                                 f"drift.{f' Logged: {kept}.' if kept else ''}", rows=len(recent))
    training = load_dataset(policy)
    schema = infer_schema(training, policy.data)
    # only what the log keeps in clear: a column not logged (serving.log_features) or a PII column is not judged
    judged = [c for c in schema.features if c in recent.columns and c not in policy.data.pii_columns]
    left_out = sorted(set(schema.features) - set(judged))
    schema = replace(schema, numeric=tuple(c for c in schema.numeric if c in judged),
                     categorical=tuple(c for c in schema.categorical if c in judged),
                     text=tuple(c for c in schema.text if c in judged))
    parts = [f"Logged: {kept}" if kept else "", f"Not judged (not logged in clear): {', '.join(left_out)}"
             if left_out else ""]
    note = "".join(f" {part}." for part in parts if part)
    report = drift_report(training, recent, schema, policy.ci.drift)
    create_markdown_artifact(report.to_markdown() + (f"\n\n{note.strip()}" if note else ""),
                             key=artifact_key(f"{policy.registry.model_name}-production-drift"),
                             description="Production vs training")
    if report.drifted:
        return DriftCheck(report.drifted, f"Production inputs drifted from the training data on "
                                          f"{', '.join(report.drifted)} ({len(recent)} rows).{note}", len(recent))
    return DriftCheck([], f"No drift on {len(report.features)} features over {len(recent)} production rows.{note}",
                      len(recent))


@dataclass(frozen=True)
class Trigger:
    """Whether continuous training retrains now, and why (recorded in the audit log either way)."""

    fire: bool
    reason: str
    consecutive: int = 0  # drifted checks in a row, this one included


@task(name="retrain-trigger", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def retrain_trigger(policy: Policy, check: DriftCheck, persist: int, force: bool) -> Trigger:
    """Retrain only when drift persisted over `persist` consecutive checks (a one-hour blip does not retrain),
    never while a rollout is open (its evaluation would compare against a moving target); every check is an
    audit entry (`drift-check`, or `retrain` when it fired) and a Prefect artifact."""
    store = OutcomeStore(policy.outcome_url)
    earlier = [e for e in store.audit_log() if e.decision in ("drift-check", "retrain")]
    consecutive = 0
    if check.drifted:
        consecutive = 1
        for entry in reversed(earlier):
            if entry.decision == "retrain" or not entry.stats.get("drifted"):
                break
            consecutive += 1
    rollout = store.current_rollout()
    if rollout is not None:
        trigger = Trigger(False, f"{check.reason} Rollout {rollout.rollout_id} is open: retraining waits until it "
                                 "ends.", consecutive)
    elif force:
        trigger = Trigger(True, f"{check.reason} Retraining: forced.", consecutive)
    elif not check.drifted:
        trigger = Trigger(False, check.reason, 0)
    elif consecutive < persist:
        trigger = Trigger(False, f"{check.reason} Drift in {consecutive} consecutive check(s) of the {persist} "
                                 "needed before retraining.", consecutive)
    else:
        trigger = Trigger(True, f"{check.reason} Drift in {consecutive} consecutive checks: retraining.", consecutive)
    store.record_decision(None, "retrain" if trigger.fire else "drift-check",
                          {"drifted": check.drifted, "rows": check.rows, "consecutive": consecutive,
                           "persist": persist, "reasons": [trigger.reason]}, actor="continuous-training")
    create_markdown_artifact(
        f"## Continuous training: {'retrain' if trigger.fire else 'no retraining'}\n\n{trigger.reason}\n\n"
        f"| drifted features | production rows | consecutive drifted checks | needed |\n|---|---|---|---|\n"
        f"| {', '.join(check.drifted) or '-'} | {check.rows:,} | {consecutive} | {persist} |\n",
        key=artifact_key(f"{policy.registry.model_name}-retrain-trigger"), description="Why it retrained, or not")
    return trigger

