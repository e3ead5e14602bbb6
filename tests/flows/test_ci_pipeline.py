"""The ci-pipeline flow under Prefect's test harness, with MLflow on a temporary SQLite store."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from flows.ci_pipeline import CIParameters, ci_pipeline
from rollout.ci import training
from rollout.config import EXAMPLE_ROLES, ConfigError, load_policy
from rollout.data import example_dataset
from rollout.ci.gates import GateFailed
from rollout.registry import MlflowRegistry
from tests.conftest import write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _registry(policy_path: Path) -> MlflowRegistry:
    policy = load_policy(policy_path)
    return MlflowRegistry(policy.tracking_uri, policy.registry.model_name)


def _registered_versions(policy_path: Path) -> list:
    policy = load_policy(policy_path)
    client = MlflowClient(tracking_uri=policy.tracking_uri, registry_uri=policy.tracking_uri)
    return client.search_model_versions(f"name='{policy.registry.model_name}'")


def _fail(policy_path: Path, **params) -> GateFailed:
    with pytest.raises(GateFailed) as err:
        ci_pipeline(config=str(policy_path), params=CIParameters(**params))
    return err.value


def test_first_model_becomes_champion_then_a_challenger_is_registered_with_tags_and_reports(policy_file):
    first = ci_pipeline(config=str(policy_file))
    assert first.aliases == ["champion"]
    assert next(g for g in first.gates if g.gate == "champion").numbers["no_champion"] is True

    second = ci_pipeline(config=str(policy_file), params=CIParameters(example_seed=12))
    assert second.aliases == ["challenger"] and second.version == "2"
    reg = _registry(policy_file)
    assert reg.aliases() == {"champion": "1", "challenger": "2"}
    tags = reg.get_tags("2")
    assert len(tags["data_hash"]) == 16 and tags["git_sha"]
    expected = {f"gate.{g.gate}": "skipped" if g.numbers.get("skipped") else "pass" for g in second.gates}
    assert {k: v for k, v in tags.items() if k.startswith("gate.")} == expected
    assert "skipped" in expected.values()  # no production sample: the drift gate did not look, and says so
    assert "gates" not in tags  # each verdict once, as its own tag
    assert tags["gate.champion"] == "pass"
    version = reg.client.get_model_version("loan-approval", "2")
    assert version.current_stage == "Staging"
    # Said in words in the registry UI, and linked to the Prefect flow run that made it.
    assert version.description.startswith("logistic_regression, trained on 2000 rows")
    assert "against the naive baseline 0.5000 and champion v1 " in version.description
    assert "drift skipped" in version.description and "stress pass" in version.description
    run_tags = reg.client.get_run(second.run_id).data.tags
    assert tags["prefect.flow_run_id"] == run_tags["prefect.flow_run_id"] != ""
    assert run_tags["prefect.flow_run_url"].endswith(f"/flow-run/{tags['prefect.flow_run_id']}")
    assert re.fullmatch(rf"ci-v{second.version}-logistic_regression-\d{{8}}-\d{{6}}", run_tags["mlflow.runName"])
    assert reg.client.get_model_version("loan-approval", "1").current_stage == "Production"

    champion_gate = next(g for g in second.gates if g.gate == "champion")
    assert champion_gate.numbers["champion_version"] == "1" and champion_gate.numbers["no_champion"] is False

    artifacts = {a.path for a in reg.client.list_artifacts(second.run_id, "gates")}
    assert {"gates/overfit.md", "gates/overfit.json", "gates/stress.json", "gates/robustness.md"} <= artifacts
    assert [a.path for a in reg.client.list_artifacts(second.run_id, "plots")] == ["plots/cv.png"]
    run = reg.client.get_run(second.run_id)
    assert run.data.metrics["holdout_roc_auc"] > 0.7
    # The registered model serves probabilities, as the service and the stress gate expect.
    model = reg.load("2")
    proba = np.asarray(model.predict(example_dataset(rows=5, seed=99).drop(columns=["approved"])))
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1)
    assert (Path(second.reports_dir) / "gate_stress.md").exists()


def test_corrupted_data_fails_validation_lists_expectations_and_registers_nothing(tmp_path):
    frame = example_dataset(rows=2000, seed=5)
    frame["income"] = np.nan
    frame["credit_score"] = frame["credit_score"].astype(object)
    frame.loc[:5, "credit_score"] = "excellent"
    frame.loc[:50, "debt_to_income"] = 7.5
    frame.to_csv(tmp_path / "bad.csv", index=False)
    policy_path = write_policy(tmp_path, data={"source": "bad.csv", **EXAMPLE_ROLES})

    failure = _fail(policy_path)
    assert failure.result.gate == "data_validation"
    listed = "\n".join(failure.result.details)
    assert "`income`" in listed and "`credit_score`" in listed and "`debt_to_income`" in listed
    assert [g.gate for g in failure.outcome.gates] == ["data_validation"]
    assert _registered_versions(policy_path) == []
    policy = load_policy(policy_path)  # the stopped run is in MLflow too: FAILED, with its failed gate
    client = MlflowClient(tracking_uri=policy.tracking_uri, registry_uri=policy.tracking_uri)
    found = client.get_experiment_by_name(policy.registry.experiment)
    assert found.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's UI: the training view
    experiment = found.experiment_id
    failed = client.search_runs([experiment], "tags.`rollout.failed_gate` = 'data_validation'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["gate.data_validation"] == "fail" and "gate 'data_validation' failed" in \
        failed[0].data.tags["rollout.failure"]
    summary = _artifact("loan-approval-ci-summary")  # the run's verdicts at a glance, keyed by model
    assert summary.description == "FAIL: gate data_validation" and "data_validation" in str(summary.data)

    from typer.testing import CliRunner

    from cli.main import app

    _schedule_a_run_ahead(summary.flow_run_id)  # as a deployment's schedule does: not the latest run to report
    said = CliRunner().invoke(app, ["last-run", "--flow", "ci-pipeline"], terminal_width=200)  # what a CI log shows
    text = " ".join(said.output.split())
    assert said.exit_code == 1 and ": Failed" in text and "gate 'data_validation' failed" in text, said.output
    assert "FAIL: gate data_validation" in text
    logs = _run_logs(summary.flow_run_id)
    assert any("gate data_validation" in line for line in logs)
    assert not any("Traceback" in line for line in logs)  # a gate that did its job ends the run without one


def _schedule_a_run_ahead(flow_run_id) -> None:
    """A run of the same flow scheduled an hour from now (what prefect.yaml's schedules keep on the server)."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    from flows.ci_pipeline import ci_pipeline

    async def schedule() -> None:
        async with get_client() as client:
            assert (await client.read_flow_run(flow_run_id)).state.is_final()
            await client.create_flow_run(ci_pipeline, name="scheduled-ahead",
                                         state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=1)))

    asyncio.run(schedule())


def _run_logs(flow_run_id) -> list[str]:
    """Every log line of a flow run, as the Prefect UI shows them."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in background batches: send what is queued first

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(read())]


def _artifact(key: str):
    """The latest Prefect artifact with this key."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])))

    return next(a for a in asyncio.run(read()) if a.key == key)


def test_overfitting_estimator_fails_the_overfit_gate(tmp_path):
    policy_path = write_policy(tmp_path, estimator={"name": "decision_tree", "params": {"max_depth": None}})
    failure = _fail(policy_path)
    assert failure.result.gate == "overfit" and "training folds" in failure.result.reason
    assert _registered_versions(policy_path) == []


def _unknown_levels_crash(schema, estimator, seed=0):
    """A pipeline a careless data scientist might write: its encoder refuses category levels it never saw."""
    from sklearn.impute import SimpleImputer

    prep = ColumnTransformer(
        [("num", SimpleImputer(), list(schema.numeric)),
         ("cat", Pipeline([("fill", SimpleImputer(strategy="most_frequent")),
                           ("onehot", OneHotEncoder(handle_unknown="error"))]), list(schema.categorical))]
    )
    return Pipeline([("prep", prep), ("model", LogisticRegression(max_iter=2000))])


def test_pipeline_crashing_on_unseen_levels_fails_robustness_naming_the_case(tmp_path, monkeypatch):
    """An unseen category is a valid request (a string where a string is due), so the service would send it
    to the model: a model that crashes on it fails the gate. A null where training had none is not sent (the
    input contract refuses it with a clean 422 before any model sees it)."""
    example_dataset(rows=2500, seed=8).dropna().to_csv(tmp_path / "clean.csv", index=False)
    policy_path = write_policy(tmp_path, data={"source": "clean.csv", **EXAMPLE_ROLES}, ci={
        "cv_folds": 3, "max_train_val_gap": 0.2, "max_fold_std": 0.2, "floor": 0.5, "min_margin_over_baseline": 0.0,
        "expectations_suite": str(Path(__file__).resolve().parents[2] / "expectations" / "loan_training.json"),
        "stress": {"single_requests": 20, "batch_size": 100, "batches": 3},
    })
    monkeypatch.setattr(training, "build_pipeline", _unknown_levels_crash)
    failure = _fail(policy_path)
    assert failure.result.gate == "robustness"
    assert "unseen_tier (ValueError: Found unknown categories" in failure.result.reason
    assert not any(d.startswith("null_credit_score") for d in failure.result.details)  # it never had nulls
    assert _registered_versions(policy_path) == []


def test_over_budget_candidate_fails_the_stress_gate(tmp_path):
    policy_path = write_policy(tmp_path, ci={
        "cv_folds": 3,
        "expectations_suite": str(Path(__file__).resolve().parents[2] / "expectations" / "loan_training.json"),
        "stress": {"single_requests": 20, "batch_size": 100, "batches": 3, "budget": {"p99_single_ms": 0.01}},
    })
    failure = _fail(policy_path)
    assert failure.result.gate == "stress" and "exceeds the budget 0.01 ms" in failure.result.reason
    assert _registered_versions(policy_path) == []


def test_bad_policy_file_names_the_field(tmp_path):
    policy_path = write_policy(tmp_path, rollout={"mode": "canary"})
    with pytest.raises(ConfigError, match=r"rollout\.mode.*'shadow'"):
        ci_pipeline(config=str(policy_path))


def test_another_dataset_by_changing_the_policy_file_alone(tmp_path):
    from sklearn.datasets import load_diabetes

    from rollout.config import DataConfig
    from rollout.data import infer_schema
    from rollout.ci.validation import build_suite, write_suite

    frame = load_diabetes(as_frame=True).frame
    frame.to_csv(tmp_path / "diabetes.csv", index=False)
    cfg = DataConfig(source="diabetes.csv", target="target", task="regression", timestamp_column=None,
                     segment_column=None, unit_column=None)
    write_suite(build_suite(frame, infer_schema(frame, cfg), "diabetes", min_rows=100), tmp_path / "diabetes.json")
    policy_path = write_policy(
        tmp_path,
        registry={"model_name": "diabetes"},
        data=cfg.model_dump(mode="json", exclude={"example", "features", "drop_columns", "production_sample"}),
        estimator={"name": "ridge", "params": {"alpha": 1.0}},
        ci={"cv_folds": 3, "metric": "r2", "floor": 0.3, "min_margin_over_baseline": 0.1, "max_train_val_gap": 0.1,
            "max_fold_std": 0.1, "expectations_suite": "diabetes.json",
            "stress": {"single_requests": 20, "batch_size": 100, "batches": 3, "budget": {"p99_single_ms": 2000}}},
        rollout={"primary_metric": "mse", "margin": 30.0, "min_detectable_effect": 150.0, "segment_guardrails": []},
    )
    outcome = ci_pipeline(config=str(policy_path))
    assert outcome.aliases == ["champion"]
    held = next(g for g in outcome.gates if g.gate == "floor").numbers["holdout"]
    assert 0.3 < held < 0.7
    registry = MlflowRegistry(load_policy(policy_path).tracking_uri, "diabetes")
    assert registry.aliases() == {"champion": outcome.version}
    tags = registry.get_tags(outcome.version)
    assert tags["estimator"] == "ridge" and float(tags["holdout_r2"]) == pytest.approx(held, abs=1e-6)
    assert {k: v for k, v in tags.items() if k.startswith("gate.")} == {
        f"gate.{g.gate}": "skipped" if g.numbers.get("skipped") else "pass" for g in outcome.gates}
    metrics = registry.client.get_run(outcome.run_id).data.metrics
    assert metrics["holdout_r2"] == pytest.approx(held) and metrics["baseline_r2"] < 0.05  # the mean predicts nothing
    model = registry.load(outcome.version)
    pred = np.asarray(model.predict(frame.drop(columns=["target"]).head(4)))
    assert pred.shape == (4,) and np.all(np.isfinite(pred))


@pytest.mark.parametrize(("dataset", "found"), [
    ("load_diabetes", "214 distinct numbers such as 100.0, 101.0, 102.0, 103.0, 104.0, ...: a continuous target; "
                      "set data.task: regression"),
    ("load_wine", "3 classes (0, 1, 2)"),
])
def test_a_target_the_task_cannot_learn_is_refused_before_training_naming_the_column(tmp_path, dataset, found):
    from typer.testing import CliRunner

    import sklearn.datasets

    from cli.main import app

    getattr(sklearn.datasets, dataset)(as_frame=True).frame.to_csv(tmp_path / "data.csv", index=False)
    policy_path = write_policy(tmp_path, data={"source": "data.csv", "target": "target", "task": "classification",
                                               "timestamp_column": None, "segment_column": None, "unit_column": None},
                               rollout={"segment_guardrails": []})
    result = CliRunner().invoke(app, ["ci", "--config", str(policy_path)], terminal_width=400)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "data.target 'target' (data.task 'classification')" in said and found in said
    assert _registered_versions(policy_path) == []
    policy = load_policy(policy_path)
    assert MlflowClient(tracking_uri=policy.tracking_uri).search_experiments(filter_string="name != 'Default'") == []


def test_a_daily_series_from_a_policy_file_alone_validates_forward_in_time(tmp_path):
    """A generated daily series with a date column, as a CSV: without a timestamp column `rollout ci` says what to
    set; with `ci.split: time` it holds out the latest days and records the split on the version's run."""
    from typer.testing import CliRunner

    from cli.main import app
    from tests.unit.test_time_split import daily

    daily().to_csv(tmp_path / "weather.csv", index=False)
    data = {"source": "weather.csv", "target": "rain_tomorrow", "task": "classification", "timestamp_column": None,
            "segment_column": None, "unit_column": None}
    ci = {"expectations_suite": "weather.json", "floor": 0.6, "max_fold_std": 0.1, "min_margin_over_baseline": 0.05}
    rollout = {"primary_metric": "accuracy", "segment_guardrails": []}
    path = write_policy(tmp_path, registry={"model_name": "weather"}, data=data, ci=ci, rollout=rollout)
    refused = CliRunner().invoke(app, ["make-suite", "--config", str(path), "--output", str(tmp_path / "weather.json")],
                                 terminal_width=400)
    assert refused.exit_code == 2 and "set data.timestamp_column: date" in " ".join(refused.output.split())

    path = write_policy(tmp_path, registry={"model_name": "weather"}, data={**data, "timestamp_column": "date"},
                        ci={**ci, "split": "time"}, rollout=rollout)
    missing = CliRunner().invoke(app, ["ci", "--config", str(path)], terminal_width=400)
    said = " ".join(missing.output.split())  # no suite yet: the field to set and the command that writes one
    assert missing.exit_code != 0 and "set ci.expectations_suite" in said and "rollout make-suite" in said, said
    made = CliRunner().invoke(app, ["make-suite", "--config", str(path)])  # to where `rollout ci` reads it
    assert made.exit_code == 0, made.output
    kept = (tmp_path / "weather.json").read_text()
    again = CliRunner().invoke(app, ["make-suite", "--config", str(path)], terminal_width=400)
    assert again.exit_code == 2 and "--force" in again.output  # a reviewed suite is not overwritten unasked
    assert (tmp_path / "weather.json").read_text() == kept
    assert "2024-01-01" not in (tmp_path / "weather.json").read_text()  # no rule listing the dates
    result = CliRunner().invoke(app, ["ci", "--config", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output
    policy = load_policy(path)
    registry = MlflowRegistry(policy.tracking_uri, "weather")
    run = registry.client.get_run(registry.client.get_model_version("weather", registry.aliases()["champion"]).run_id)
    assert run.data.params["split"] == "time" and run.data.params["rows"] == "730"


@pytest.mark.postgres
def test_training_rows_from_a_postgresql_query(tmp_path, pg_url, monkeypatch):
    """data.source a database URL (its database name from the environment), data.query the SQL: CI trains on
    exactly the rows the query selects; a bad query is a clear error naming data.query, and nothing registers."""
    import sqlalchemy as sa

    frame = example_dataset(rows=2400, seed=11)
    engine = sa.create_engine(pg_url)
    frame.to_sql("applications", engine, index=False, if_exists="replace")
    engine.dispose()
    base, database = pg_url.rsplit("/", 1)
    monkeypatch.setenv("WAREHOUSE_DB", database)
    query = "SELECT * FROM applications WHERE applied_at < '2026-05-01' ORDER BY applied_at"
    path = write_policy(tmp_path, data={"source": base + "/${WAREHOUSE_DB}", "query": query, **EXAMPLE_ROLES})
    outcome = ci_pipeline(config=str(path))
    assert outcome.aliases == ["champion"]
    run = MlflowRegistry.for_policy(load_policy(path)).client.get_run(outcome.run_id)
    expected = int((frame["applied_at"] < "2026-05-01").sum())
    assert run.data.params["rows"] == str(expected) and expected < len(frame)

    bad = write_policy(tmp_path, data={"source": base + "/${WAREHOUSE_DB}", "query": "SELECT * FROM aplications", **EXAMPLE_ROLES})
    with pytest.raises(ConfigError, match=r"data.query: failed on postgresql\+psycopg://postgres@.*aplications"):
        ci_pipeline(config=str(bad))
    missing = write_policy(tmp_path, data={"source": base + "/${WAREHOUSE_DB}", "query": None, **EXAMPLE_ROLES})
    with pytest.raises(ConfigError, match="data.query: data.source is a database URL"):
        ci_pipeline(config=str(missing))


def test_a_failure_that_is_not_a_gate_prints_one_line_and_keeps_the_traceback_in_the_log(tmp_path, monkeypatch):
    """A team's estimator that crashes in fit: the terminal gets the verdicts so far and one line saying where
    it stopped and why, never a traceback; the run's log file has the traceback."""
    from typer.testing import CliRunner

    from cli.main import app
    from tests.conftest import cancer_policy

    package = tmp_path / "crashy"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n"
        "class Crashy(LogisticRegression):\n"
        "    def fit(self, x, y, **kw):\n"
        "        raise RuntimeError('the feature store timed out')\n\n"
        "def build(schema, **params):\n"
        "    return Crashy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = cancer_policy(tmp_path, estimator={"factory": "crashy:build"}, registry={"model_name": "cancer",
                                                                                    "trusted_modules": ["crashy"]})
    result = CliRunner().invoke(app, ["ci", "--config", str(path)], terminal_width=200)
    said = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "data_validation │ pass" in said and "Traceback" not in result.output
    assert ("ci-pipeline stopped while training (fit, CV folds, loss curve): RuntimeError: the feature store timed "
            "out") in said and "Nothing was registered." in said
    log = (tmp_path / "reports" / "ci-pipeline.log").read_text()
    assert "Traceback (most recent call last)" in log and "the feature store timed out" in log
    assert _registered_versions(path) == []


def test_your_own_metric_judges_every_gate_and_is_recorded(tmp_path, monkeypatch):
    """A cost per case as the CI metric (a false approval costs five times a false refusal): CV, floor,
    baseline and champion gates all read it; the version records it under an MLflow-safe name."""
    from tests.conftest import cancer_policy

    (tmp_path / "team_costs.py").write_text(
        "import numpy as np\n\n"
        "def cost(y_true, prediction, score):\n"
        "    false_approval = (prediction == 1) & (y_true == 0)\n"
        "    false_refusal = (prediction == 0) & (y_true == 1)\n"
        "    return -float(np.mean(5.0 * false_approval + 1.0 * false_refusal))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = cancer_policy(tmp_path, ci={"metric": "team_costs:cost", "floor": -0.5},
                         registry={"model_name": "cancer", "trusted_modules": ["team_costs"]})
    outcome = ci_pipeline(config=str(path))
    floor = next(g for g in outcome.gates if g.gate == "floor")
    baseline = next(g for g in outcome.gates if g.gate == "baseline")
    assert floor.numbers["metric"] == "team_costs:cost" and -0.5 < floor.numbers["holdout"] <= 0
    assert baseline.numbers["baseline"] < floor.numbers["holdout"]  # predicting the majority class costs more
    tags = MlflowRegistry.for_policy(load_policy(path)).get_tags(outcome.version)
    assert float(tags["holdout_team_costs.cost"]) == pytest.approx(floor.numbers["holdout"], abs=1e-6)
