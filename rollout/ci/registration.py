"""The last CI step: log the candidate's run (params, metrics, every gate report, plots) and register it."""

from __future__ import annotations

import json
from datetime import datetime, timezone
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from rollout import registry
from rollout.ci.gates import GateResult
from rollout.ci.search import SearchResult, Trial
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


def policy_text(policy: Policy) -> str:
    """The policy the run was judged by, every default filled in and the run's overrides applied, as YAML; a
    password in a URL (a store given by ROLLOUT_OUTCOME_STORE_URL, a database data.source) shown as ***."""
    import yaml

    def masked(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: masked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [masked(v) for v in value]
        return masked_url(value) if isinstance(value, str) else value

    dumped = masked(policy.model_dump(mode="json", exclude={"base_dir"}, by_alias=True))
    return str(yaml.safe_dump(dumped, sort_keys=False))


def masked_url(value: str) -> str:
    """A URL with the password of its user part, and any `password=` of its query, as ***; anything that is not a
    URL (`scheme://...`) as it is."""
    import re
    from urllib.parse import urlsplit

    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    out = value  # edited in place: a rebuilt URL may differ (sqlite:/// loses a slash through urlunsplit)
    if password is not None:  # user part up to the last @ (the host has none), the password after its first :
        user, _, host = parts.netloc.rpartition("@")
        out = out.replace(parts.netloc, f"{user.partition(':')[0]}:***@{host}", 1)
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    if query != parts.query:
        out = out.replace("?" + parts.query, "?" + query, 1)
    return out


def metric_key(metric: str) -> str:
    """A metric's name as an MLflow key ('pkg.mod:fn' -> 'pkg.mod.fn': MLflow keys take no colon)."""
    return metric.replace(":", ".")


def version_tags(policy: Policy, frame: pd.DataFrame, metric: str, held: HeldOut, results: list[GateResult],
                 estimator: str | None = None) -> dict[str, str]:
    """Tags every registered version carries: data hash, git sha, estimator, held-out metric, gate verdicts."""
    metric = metric_key(metric)
    return {"data_hash": data_hash(frame), "git_sha": git_sha(policy.base_dir),
            "estimator": estimator or policy.estimator.label, f"holdout_{metric}": f"{held.candidate:.6f}",
            **{f"gate.{r.gate}": r.verdict for r in results}}


def candidate_record(policy: Policy, schema: Schema, frame: pd.DataFrame, cv: CVResult, held: HeldOut,
                     results: list[GateResult], search: SearchResult | None = None,
                     search_run_id: str | None = None) -> registry.RunRecord:
    """What the candidate's MLflow run holds besides the model (with a search: the chosen params are its
    params, and the search's run and best inner-CV score are recorded)."""
    metric = metric_key(cv.metric)
    metrics = {f"cv_train_{metric}": cv.train_mean, f"cv_val_{metric}": cv.val_mean,
               f"cv_val_{metric}_std": cv.val_std, f"holdout_{metric}": held.candidate,
               f"baseline_{metric}": held.baseline}
    if held.champion is not None:
        metrics[f"champion_{metric}"] = held.champion
    texts = {f"gates/{r.gate}.md": r.to_markdown() for r in results}
    dicts: dict[str, dict[str, Any]] = {f"gates/{r.gate}.json": r.to_dict() for r in results}
    dicts["schema.json"] = asdict(schema)
    texts["policy.yaml"] = policy_text(policy)
    params: dict[str, Any] = {"estimator": policy.estimator.label,
                              **{f"param.{k}": v for k, v in policy.estimator.params.items()},
                              "cv_folds": policy.ci.cv_folds,
                              "split": "time" if policy.ci.training_data.source != "policy" else policy.ci.split, "rows": len(frame),
                              "data_hash": data_hash(frame), **frame.attrs.get("training_data", {})}
    tags: dict[str, Any] = {}
    if search is not None:
        params["search.trials"] = len(search.trials)
        metrics[f"search_best_{metric}"] = search.best_value
        dicts["search.json"] = search_summary(search)
        if search_run_id is not None:
            tags["rollout.search_run_id"] = search_run_id
    return registry.RunRecord(
        name=f"ci-{policy.estimator.label.replace(':', '.')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        params=params, tags=tags,
        metrics=metrics, texts=texts, dicts=dicts, figures={"plots/cv.png": cv_figure(cv)},
    )


def register(policy: Policy, model: Predictor, schema: Schema, frame: pd.DataFrame, cv: CVResult, held: HeldOut,
             results: list[GateResult], x_example: pd.DataFrame, search: SearchResult | None = None,
             search_run_id: str | None = None, origin: dict[str, str] | None = None) -> registry.Logged:
    """Log the candidate's run with its model and register it as a new version of the policy's model, described
    in words; `origin` (the orchestrator's run id and page) is tagged on both."""
    experiment = registry.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    tags = {**version_tags(policy, frame, cv.metric, held, results), **(origin or {})}
    if search is not None:
        tags["search_best_params"] = json.dumps(search.best_params, sort_keys=True, default=str)
        if search_run_id is not None:
            tags["search_run_id"] = search_run_id
    record = candidate_record(policy, schema, frame, cv, held, results, search, search_run_id)
    record.tags.update(origin or {})
    logged = registry.log_run(experiment, record, model, x_example, schema.task, policy.registry.model_name, tags,
                              policy.registry.trusted_modules)
    if logged.version is not None:
        reg = registry.MlflowRegistry.for_policy(policy)
        reg.describe(logged.version,
                     describe(policy.estimator.label, len(frame), data_hash(frame), cv.metric, held, results))
        # named by what it made, once that is known: ci-v7-logistic_regression-20261129-141203
        if record.name.startswith("ci-"):
            reg.rename_run(logged.run_id, f"ci-v{logged.version}-{record.name.removeprefix('ci-')}")
    return logged


def log_failed(policy: Policy, results: list[GateResult], failure: str, kind: str = "ci",
               origin: dict[str, str] | None = None) -> str:
    """Record a CI or adopt run that stopped, as a FAILED MLflow run in the policy's experiment: what stopped it
    (the failed gate's reason, or the step and error), every verdict so far, and the policy. Its run id."""
    experiment = registry.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    failed_gate = next((r.gate for r in results if not r.passed), None)
    record = registry.RunRecord(
        name=f"{kind}-failed-{policy.estimator.label.replace(':', '.')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
        params={"estimator": policy.estimator.label,
                **{f"param.{k}": v for k, v in policy.estimator.params.items()}},
        tags={"rollout.kind": kind, "rollout.failure": failure[:5000], **(origin or {}),
              **({"rollout.failed_gate": failed_gate} if failed_gate else {}),
              **{f"gate.{r.gate}": r.verdict for r in results}},
        texts={**{f"gates/{r.gate}.md": r.to_markdown() for r in results}, "policy.yaml": policy_text(policy),
               "failure.txt": failure})
    return registry.log_run(experiment, record, failed=True).run_id


def describe(what: str, rows: int, digest: str, metric: str, held: HeldOut, results: list[GateResult],
             how: str = "trained") -> str:
    """A version's description: what it is, what it beat on the held-out rows, its gates. `how` it met the
    rows: trained on them (CI), or judged on them (an adopted model)."""
    against = (f"champion v{held.champion_version} {held.champion:.4f}" if held.champion is not None
               else "no champion yet")
    gates = ", ".join(f"{r.gate} {r.headline.lower()}" for r in results)
    return (f"{what}, {how} on {rows} rows (data {digest}). Held-out {metric} {held.candidate:.4f} against "
            f"the naive baseline {held.baseline:.4f} and {against}. Gates: {gates}.")


def search_summary(search: SearchResult) -> dict[str, Any]:
    """The search as JSON: metric, best trial and params, and every trial."""
    return {"metric": search.metric, "best_trial": search.best_trial, "best_value": search.best_value,
            "best_params": search.best_params, "rows": search.rows,
            "trials": [asdict(t) for t in search.trials]}


class SearchLog:
    """The search's MLflow run, and a child run per trial written as the trial ends, so the MLflow UI shows
    the search growing under its parent."""

    def __init__(self, policy: Policy, rows: int) -> None:
        config = policy.estimator.search
        assert config is not None
        experiment = registry.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
        space = json.dumps({k: v.model_dump(exclude_none=True) for k, v in config.space.items()})
        self.run = registry.ParentRun(
            policy.tracking_uri, experiment, f"search-{policy.estimator.label.replace(':', '.')}",
            params={"estimator": policy.estimator.label, "metric": policy.ci.metric, "sampler": config.sampler,
                    "trials": config.trials, "folds": config.folds, "rows": rows, "space": space[:6000]},
            tags={"rollout.kind": "search"})
        self.run_id = self.run.run_id

    def trial(self, trial: Trial) -> None:
        metrics = {"seconds": trial.seconds, **({"cv_score": trial.value} if trial.value is not None else {})}
        tags = {"rollout.kind": "search-trial", **({"error": trial.error[:5000]} if trial.error else {})}
        self.run.child(f"trial-{trial.number}", trial.params, metrics, tags, failed=trial.error is not None)

    def finish(self, result: SearchResult | None) -> None:
        """Record the best trial on the parent run and end it (FAILED without a result)."""
        if result is None:
            self.run.finish(failed=True)
            return
        self.run.finish(params={**{f"best.{k}": v for k, v in result.best_params.items()},
                                "best_trial": result.best_trial},
                        metrics={f"best_{metric_key(result.metric)}": result.best_value})


def adopt(policy: Policy, model_uri: str, schema: Schema, frame: pd.DataFrame, held: HeldOut,
          results: list[GateResult], origin: dict[str, str] | None = None) -> registry.Logged:
    """Record the checks of a model trained elsewhere in a run of their own (gate reports, held-out metrics)
    and make the model a version of the policy's registered model, tagged as CI tags its own."""
    metric = metric_key(policy.ci.metric)
    metrics = {f"holdout_{metric}": held.candidate, f"baseline_{metric}": held.baseline}
    if held.champion is not None:
        metrics[f"champion_{metric}"] = held.champion
    record = registry.RunRecord(
        name="adopt", params={"model_uri": model_uri, "rows": len(frame), "data_hash": data_hash(frame)},
        metrics=metrics, tags={"rollout.adopted_from": model_uri, **(origin or {})},
        texts={**{f"gates/{r.gate}.md": r.to_markdown() for r in results}, "policy.yaml": policy_text(policy)},
        dicts={**{f"gates/{r.gate}.json": r.to_dict() for r in results}, "schema.json": asdict(schema)})
    experiment = registry.experiment_id(policy.tracking_uri, policy.registry.experiment, policy.artifact_location)
    logged = registry.log_run(experiment, record)
    reg = registry.MlflowRegistry.for_policy(policy)
    tags = {**version_tags(policy, frame, metric, held, results, estimator=f"adopted: {model_uri}"),
            "adopted_from": model_uri, "adoption_run_id": logged.run_id, **(origin or {})}
    version = reg.adopt(model_uri, tags)
    reg.describe(version, describe(f"Adopted from {model_uri}", len(frame), data_hash(frame), metric, held, results,
                                   how="judged"))
    return registry.Logged(logged.run_id, version)
