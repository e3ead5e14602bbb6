"""The last CI step: log the candidate's run (params, metrics, every gate report, plots) and register it."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from rollout import registry
from rollout.ci.gates import GateResult
from rollout.ci.training import CVResult, HeldOut
from rollout.config import Policy
from rollout.data import Schema, data_hash
from rollout.models import Predictor
from rollout.report import cv_figure


def git_sha(where: Path) -> str:
    """The commit the model was built from (CI's GITHUB_SHA when set)."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def version_tags(policy: Policy, frame: pd.DataFrame, cv: CVResult, held: HeldOut,
                 results: list[GateResult]) -> dict[str, str]:
    """Tags every registered version carries: data hash, git sha, estimator, held-out metric, gate verdicts."""
    return {"data_hash": data_hash(frame), "git_sha": git_sha(policy.base_dir), "estimator": policy.estimator.name,
            f"holdout_{cv.metric}": f"{held.candidate:.6f}",
            "gates": json.dumps({r.gate: r.verdict for r in results}),
            **{f"gate.{r.gate}": r.verdict for r in results}}


def candidate_record(policy: Policy, schema: Schema, frame: pd.DataFrame, cv: CVResult, held: HeldOut,
                     results: list[GateResult]) -> registry.RunRecord:
    """What the candidate's MLflow run holds besides the model."""
    metric = cv.metric
    metrics = {f"cv_train_{metric}": cv.train_mean, f"cv_val_{metric}": cv.val_mean,
               f"cv_val_{metric}_std": cv.val_std, f"holdout_{metric}": held.candidate,
               f"baseline_{metric}": held.baseline}
    if held.champion is not None:
        metrics[f"champion_{metric}"] = held.champion
    texts = {f"gates/{r.gate}.md": r.to_markdown() for r in results}
    dicts: dict[str, dict[str, Any]] = {f"gates/{r.gate}.json": r.to_dict() for r in results}
    dicts["schema.json"] = asdict(schema)
    return registry.RunRecord(
        name=f"ci-{policy.estimator.name}",
        params={"estimator": policy.estimator.name, **{f"param.{k}": v for k, v in policy.estimator.params.items()},
                "cv_folds": policy.ci.cv_folds, "rows": len(frame), "data_hash": data_hash(frame)},
        metrics=metrics, texts=texts, dicts=dicts, figures={"plots/cv.png": cv_figure(cv)},
    )


def register(policy: Policy, model: Predictor, schema: Schema, frame: pd.DataFrame, cv: CVResult, held: HeldOut,
             results: list[GateResult], x_example: pd.DataFrame) -> registry.Logged:
    """Log the candidate's run with its model and register it as a new version of the policy's model."""
    experiment = registry.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    return registry.log_run(experiment, candidate_record(policy, schema, frame, cv, held, results), model, x_example,
                            schema.task, policy.registry.model_name, version_tags(policy, frame, cv, held, results),
                            policy.registry.trusted_modules)
