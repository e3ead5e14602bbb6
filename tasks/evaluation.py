"""Prefect tasks of the CD phase: gather outcomes, decide, act under a lock, report."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from rollout import registry
from rollout.cd import evaluation
from rollout.cd.decision import Decision, Evidence, decide
from rollout.config import Policy
from rollout.data import infer_schema, load_dataset
from rollout.outcomes import OutcomeStore, Rollout
from rollout.report import EvaluationReport, write_evaluation
from tasks.common import artifact_key, mlflow_experiment, open_registry, prefect_origin


@task(name="current-rollout", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def current_rollout(policy: Policy) -> Rollout | None:
    """The open rollout in the outcome store, if any."""
    return OutcomeStore(policy.outcome_url).current_rollout()


@task(name="data-clock", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def data_clock(policy: Policy, rollout: Rollout) -> datetime | None:
    """The time of the rollout's latest logged prediction (replayed traffic's own clock), None before any."""
    when = evaluation.data_time(OutcomeStore(policy.outcome_url), rollout)
    if when is not None:
        get_run_logger().info("evaluating as of the data's time %s (the latest logged prediction)", when.isoformat())
    return when


@task(name="retention", cache_policy=NO_CACHE)
def retention_task(policy: Policy, now: datetime, dry_run: bool = False) -> str:
    """Remove raw rows older than stores.retention_days (never an open rollout's) and say what went.
    A failure is logged and reported, never the evaluation's failure."""
    days = policy.stores.retention_days
    if days is None:
        return "Retention off (stores.retention_days: null): every row is kept."
    try:
        expired = OutcomeStore(policy.outcome_url).expire(now - timedelta(days=days), dry_run=dry_run)
    except Exception as exc:  # noqa: BLE001 - the decision above stands; the next run tries again
        get_run_logger().warning("retention failed, nothing lost, retried next run: %s", exc)
        return f"Retention failed ({type(exc).__name__}: {exc}); retried next run."
    sentence = expired.sentence() + (" (dry run)" if dry_run and "Dry run" not in expired.note else "")
    get_run_logger().info("retention (%d days): %s", days, sentence)
    return sentence


@task(name="gather-evidence", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def gather_evidence(policy: Policy, rollout: Rollout, now: datetime) -> Evidence:
    """Matured outcomes of the rollout as sufficient statistics (SQL GROUP BY, no rows in memory)."""
    training = schema = None
    if policy.data.source == "example" or policy.path(policy.data.source).exists():
        training = load_dataset(policy)
        schema = infer_schema(training, policy.data)
    return evaluation.gather(OutcomeStore(policy.outcome_url), rollout, policy, now, training, schema)


@task(name="decide", cache_policy=NO_CACHE)
def decide_task(policy: Policy, evidence: Evidence, rollout_id: int, now: datetime) -> Decision:
    """Apply the promotion rules (pure); the Thompson draw is seeded by rollout and hour, so re-runs agree."""
    seed = hash((rollout_id, int(now.timestamp() // 3600))) & 0xFFFFFFFF
    return decide(policy.rollout, evidence, np.random.default_rng(seed))


@task(name="act", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def act_task(policy: Policy, decision: Decision, rollout: Rollout, now: datetime, actor: str) -> dict[str, Any]:
    """Move aliases and routing under the store's lock and record the decision; or say why nothing was done."""
    done = evaluation.act_once(decision, rollout.rollout_id, open_registry(policy), OutcomeStore(policy.outcome_url),
                               now, actor)
    for note in done.settled:
        get_run_logger().warning("%s", note)
    if not done.acted or done.action is None:
        get_run_logger().warning("rollout %s: nothing done: %s", rollout.rollout_id, done.reason)
        return {"acted": False, "reason": done.reason, "settled": done.settled}
    return {"acted": True, "alias_moves": done.action.alias_moves, "ended": done.action.ended,
            "weights": done.action.weights, "settled": done.settled}


@task(name="report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def report_task(policy: Policy, decision: Decision, rollout: Rollout, now: datetime,
                evidence: Evidence) -> EvaluationReport:
    """Markdown, the effect-over-time PNG and JSON to the reports folder, and the Markdown as a Prefect artifact."""
    store = OutcomeStore(policy.outcome_url)
    history = store.audit_log()
    report = write_evaluation(
        policy.path(policy.stores.reports_dir) / f"rollout-{rollout.rollout_id}", decision, evidence,
        [e for e in history if e.rollout_id == rollout.rollout_id], model_name=policy.registry.model_name,
        rollout_id=rollout.rollout_id, mode=rollout.mode, metric=policy.rollout.primary_metric,
        margin=policy.rollout.margin, champion=rollout.champion, now=now,
        daily=store.daily_metric(policy.rollout.primary_metric), history=history)
    create_markdown_artifact(report.markdown, key=artifact_key(f"{policy.registry.model_name}-evaluation-rollout-{rollout.rollout_id}"),
                             description=f"Online evaluation: {decision.action}")
    return report


@task(name="log-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def log_evaluation(policy: Policy, decision: Decision, rollout: Rollout, now: datetime, report: EvaluationReport) -> str:
    """The evaluation as an MLflow run: the decision as tags, each challenger's effect as metrics, the report."""
    metrics = {f"v{version}_{key}": float(value) for version, s in decision.stats.items()
               for key in ("estimate", "lower", "upper", "n", "power")
               if isinstance(value := s.get(key), int | float) and np.isfinite(value)}
    record = registry.RunRecord(
        name=f"rollout-{rollout.rollout_id}-{now:%Y%m%dT%H%M}",
        tags={"rollout_id": rollout.rollout_id, "decision": decision.action, "champion": rollout.champion,
              **prefect_origin()},  # as every run a flow writes: the flow run's id, name and UI page
        metrics=metrics, texts={"evaluation.md": report.markdown},
        files={"plots": report.plot_path, **({"monitoring": report.monitoring_path} if report.monitoring_path else {})})
    run_id = registry.log_run(mlflow_experiment(policy, "rollout-evaluation"), record).run_id
    _show_in_prefect(policy, rollout, run_id, report)
    return run_id


def _show_in_prefect(policy: Policy, rollout: Rollout, run_id: str, report: EvaluationReport) -> None:
    """The plots as Prefect image artifacts and a link to the MLflow run, when MLflow runs behind a server: the
    Prefect UI shows an image by its URL, and the MLflow server is what hands the PNGs to a browser. With the
    embedded store the plots are in the reports folder and the local MLflow store only."""
    reg = open_registry(policy)
    run_url = reg.run_url(run_id)
    if run_url is None:  # no server: artifact_url would be None too
        return
    model = policy.registry.model_name
    key = f"{model}-rollout-{rollout.rollout_id}"
    create_link_artifact(run_url, link_text=f"MLflow run of rollout {rollout.rollout_id}'s evaluation",
                         key=artifact_key(f"{key}-evaluation-run"), description=f"{model}: the evaluation in MLflow")
    plots = [("plots", report.plot_path, "effect", "effect of each challenger with its band, over time")]
    if report.monitoring_path is not None:
        plots.append(("monitoring", report.monitoring_path, "monitoring",
                      f"{policy.rollout.primary_metric} per day of every version, with each decision marked"))
    for folder, path, name, what in plots:
        create_image_artifact(str(reg.artifact_url(run_id, f"{folder}/{path.name}")),
                              key=artifact_key(f"{key}-{name}-plot"), description=f"{model}: {what}")
