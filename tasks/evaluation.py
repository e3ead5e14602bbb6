"""Prefect tasks of the CD phase: gather outcomes, decide, act under a lock, report."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from rollout import registry
from rollout.cd import evaluation
from rollout.config import Policy
from rollout.data import infer_schema, load_dataset
from rollout.cd.decision import Decision, Evidence, decide
from rollout.report import Look, difference_plot, evaluation_markdown, metrics_markdown
from rollout.outcomes import OutcomeStore, Rollout
from tasks.common import mlflow_experiment


def open_registry(policy: Policy) -> registry.MlflowRegistry:
    return registry.MlflowRegistry(policy.tracking_uri, policy.registry.model_name, policy.registry.mirror_stages)


@task(name="current-rollout", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def current_rollout(policy: Policy) -> Rollout | None:
    """The open rollout in the outcome store, if any."""
    return OutcomeStore(policy.outcome_url).current_rollout()


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
    """Move aliases and routing under the store's lock; record the decision in the audit log.

    A second run that finds the lock held, or the rollout already ended by another run, acts on
    nothing and says so.
    """
    logger = get_run_logger()
    store = OutcomeStore(policy.outcome_url)
    with store.lock("evaluation"):
        fresh = store.rollout(rollout.rollout_id)
        if fresh is None or fresh.ended_at is not None:
            logger.warning("rollout %s was already ended by another run; nothing to do", rollout.rollout_id)
            return {"acted": False, "reason": "rollout already ended"}
        action = evaluation.act(decision, fresh, open_registry(policy), store, now)
        store.record_decision(rollout.rollout_id, decision.action, decision.to_dict(), action.alias_moves, actor,
                              ts=now)
    return {"acted": True, "alias_moves": action.alias_moves, "ended": action.ended, "weights": action.weights}


@task(name="report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def report_task(policy: Policy, decision: Decision, rollout: Rollout, now: datetime, evidence: Evidence) -> Path:
    """Markdown + PNG of the effect over time, as a Prefect artifact and in an MLflow run."""
    import mlflow

    store = OutcomeStore(policy.outcome_url)
    looks = [
        Look(d.ts, version, s.get("estimate"), s.get("lower"), s.get("upper"), int(s.get("n") or 0))
        for d in store.audit_log(rollout.rollout_id)
        for version, s in (d.stats.get("stats") or {}).items()
    ]
    markdown = evaluation_markdown(
        decision.to_dict(), model_name=policy.registry.model_name, rollout_id=rollout.rollout_id, mode=rollout.mode,
        metric=policy.rollout.primary_metric, margin=policy.rollout.margin, champion=rollout.versions["champion"],
        now=now,
    ) + "\n" + metrics_markdown(evidence, policy.rollout.primary_metric)
    folder = policy.path(policy.stores.reports_dir) / f"rollout-{rollout.rollout_id}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M")
    plot = difference_plot(looks, policy.rollout.margin, policy.rollout.primary_metric, folder / f"effect-{stamp}.png")
    (folder / f"evaluation-{stamp}.md").write_text(markdown + f"\n![effect over time]({plot.name})\n")
    (folder / f"evaluation-{stamp}.json").write_text(json.dumps(decision.to_dict(), indent=2))
    create_markdown_artifact(markdown, key=f"evaluation-rollout-{rollout.rollout_id}",
                             description=f"Online evaluation: {decision.action}")
    experiment_id = mlflow_experiment(policy, "rollout-evaluation")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"rollout-{rollout.rollout_id}-{stamp}"):
        mlflow.set_tags({"rollout_id": rollout.rollout_id, "decision": decision.action,
                         "champion": rollout.versions["champion"]})
        for version, s in decision.stats.items():
            for key in ("estimate", "lower", "upper", "n", "power"):
                value = s.get(key)
                if isinstance(value, (int, float)) and np.isfinite(value):
                    mlflow.log_metric(f"v{version}_{key}", float(value))
        mlflow.log_text(markdown, "evaluation.md")
        mlflow.log_artifact(str(plot), "plots")
    return folder / f"evaluation-{stamp}.md"
