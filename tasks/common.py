"""Shared task plumbing: loading the policy, publishing gate verdicts as Prefect artifacts."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from typing import Any

from rollout.config import ConfigError, Policy, load_policy
from rollout.ci.gates import GateFailed, GateResult
from rollout.registry import MlflowRegistry, experiment_id


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry what a second try may fix (a store or registry outage), never a policy
    or data the run cannot use (a ConfigError says what to change; retrying only delays saying it)."""
    return not isinstance(getattr(state, "data", None), ConfigError)


@task(name="load-policy", cache_policy=NO_CACHE)
def load_policy_task(path: str) -> Policy:
    """Read and validate the policy file (a bad field fails here, named)."""
    return load_policy(path)


def open_registry(policy: Policy) -> MlflowRegistry:
    """The policy's registered model in its MLflow registry."""
    return MlflowRegistry.for_policy(policy)


def mlflow_experiment(policy: Policy, name: str) -> str:
    """Point MLflow at the policy's tracking URI; the id of experiment `name`, created if needed."""
    return experiment_id(policy.tracking_uri, name, policy.artifact_location)


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def prefect_origin() -> dict[str, str]:
    """The current flow run's id, name and UI page, as tags for what it writes to MLflow (empty outside a run)."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    origin = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if flow_run.ui_url:
        origin["prefect.flow_run_url"] = str(flow_run.ui_url)
    return origin


def publish_gate(result: GateResult, reports_dir: Path | None = None, model: str = "") -> GateResult:
    """Publish a gate's verdict as a Markdown artifact (keyed by model: one model's history is its own) and file;
    raise GateFailed when it failed.

    A plain function called in the flow (not a task): the verdict belongs to the task that computed it,
    and a task run per verdict cost ~35 ms of orchestration each (benchmarks/pipeline.py).
    """
    logger = get_run_logger()
    markdown = result.to_markdown()
    create_markdown_artifact(markdown, key=artifact_key(f"{model}-gate-{result.gate}"),
                             description=f"{result.headline}: gate {result.gate}")
    if reports_dir is not None:
        reports_dir.mkdir(parents=True, exist_ok=True)
        (reports_dir / f"gate_{result.gate}.md").write_text(markdown)
    (logger.info if result.passed else logger.error)("gate %s: %s - %s", result.gate, result.verdict, result.reason)
    if not result.passed:
        raise GateFailed(result)
    return result


def publish_summary(model: str, results: list[GateResult], stopped: str = "") -> None:
    """One table of every verdict of a CI or adopt run, and where it stopped if it did (the ci-summary artifact)."""
    from prefect.artifacts import create_table_artifact

    rows = [{"gate": r.gate, "verdict": r.headline, "reason": r.reason} for r in results]
    if stopped:
        rows.append({"gate": "(run)", "verdict": "STOPPED", "reason": stopped})
    failed = next((r for r in results if not r.passed), None)
    headline = f"FAIL: gate {failed.gate}" if failed else ("STOPPED" if stopped else "PASS: every gate")
    create_table_artifact(rows, key=artifact_key(f"{model}-ci-summary"), description=headline)
