"""Tasks that compare production inputs with the training data (continuous training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from rollout.config import Policy
from rollout.data import infer_schema, load_dataset
from rollout.outcomes import OutcomeStore
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
    if len(recent) < 100:
        return DriftCheck(reason=f"Only {len(recent)} production rows logged; too few to judge drift.", rows=len(recent))
    training = load_dataset(policy)
    schema = infer_schema(training, policy.data)
    report = drift_report(training, recent, schema, policy.ci.drift)
    create_markdown_artifact(report.to_markdown(), key=artifact_key(f"{policy.registry.model_name}-production-drift"), description="Production vs training")
    if report.drifted:
        return DriftCheck(report.drifted, f"Production inputs drifted from the training data on "
                                          f"{', '.join(report.drifted)} ({len(recent)} rows).", len(recent))
    return DriftCheck([], f"No drift on {len(report.features)} features over {len(recent)} production rows.",
                      len(recent))
