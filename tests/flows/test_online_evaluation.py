"""The online-evaluation flow on a real MLflow registry and outcome store, with simulated outcomes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
import numpy as np
import pytest

from flows.online_evaluation import EvaluationParameters, online_evaluation
from rollout import registry
from rollout.roles import Role
from rollout.cd import evaluation
from rollout.ci import training
from rollout.config import BanditConfig, EstimatorConfig, load_policy
from rollout.data import example_dataset, infer_schema
from rollout.outcomes import OutcomeStore, PredictionRow
from tasks.common import mlflow_experiment
from tests.conftest import write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
START = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _register_two_versions(policy) -> registry.MlflowRegistry:
    """Two real registered versions (champion 1, challenger 2) without running the CI flow."""
    frame = example_dataset(rows=400, seed=1)
    schema = infer_schema(frame, policy.data)
    model = training.build_pipeline(schema, EstimatorConfig()).fit(frame[list(schema.features)], frame["approved"])
    experiment = mlflow_experiment(policy, "t")  # sets tracking and registry URI to this test's store
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            registry.log_model(model, frame[list(schema.features)].head(5), "classification", policy.registry.model_name)
    reg = registry.MlflowRegistry(policy.tracking_uri, policy.registry.model_name)
    reg.set_alias(Role.CHAMPION, "1")
    reg.set_alias(Role.CHALLENGER, "2")
    return reg


@pytest.fixture
def world(tmp_path: Path):
    path = write_policy(tmp_path, rollout={
        "mode": "shadow", "primary_metric": "accuracy", "margin": 0.01, "min_samples": 300,
        "min_duration_hours": 24, "max_duration_days": 14, "label_delay_hours": 1,  # labels come an hour later
        "segment_guardrails": [{"segment": "VIP", "metric": "precision", "min": 0.7}],
        "max_latency_p99_ms": 250,
    })
    policy = load_policy(path)
    reg = _register_two_versions(policy)
    store = OutcomeStore(policy.outcome_url)
    rollout_id = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, started_at=START)
    return path, policy, reg, store, rollout_id


def log_shadow(store: OutcomeStore, rollout_id: int, n: int, champion_acc: float, challenger_acc: float,
               seed: int = 0, days: float = 3.0, vip_challenger_fp: bool = False, challenger_share: float = 1.0,
               start: datetime = START, label_after: timedelta = timedelta(hours=1)):
    """Paired shadow outcomes: both versions score each request; labels arrive for all of them, `label_after`
    each prediction."""
    rng = np.random.default_rng(seed)
    ts = start + timedelta(seconds=1)
    rows, labels = [], []
    for i in range(n):
        at = ts + timedelta(seconds=float(i) * days * 86400 / n)
        y = int(rng.random() < 0.5)
        segment = "VIP" if rng.random() < 0.15 else "standard"
        rid = f"r{seed}-{i}"
        for version, role, served, acc in (("1", "champion", 1, champion_acc), ("2", "challenger", 0, challenger_acc)):
            if role == "challenger" and rng.random() > challenger_share:
                continue
            pred = y if rng.random() < acc else 1 - y
            if role == "challenger" and vip_challenger_fp and segment == "VIP" and y == 0:
                pred = 1
            rows.append(PredictionRow(rid, version, role, at, f"u{i % 500}", rollout_id, bool(served), 1.0,
                                      float(pred), 0.8 * pred + 0.1, 3.0, segment=segment))
        labels.append((rid, y, at + label_after))
    store.log_predictions(rows)
    store.add_labels(labels)


def _run(path: Path, days: float = 3.5):
    return online_evaluation(config=str(path), params=EvaluationParameters(now=START + timedelta(days=days)))


def test_better_challenger_is_promoted_and_registry_store_and_report_agree(world):
    path, policy, reg, store, rollout_id = world
    log_shadow(store, rollout_id, 4000, champion_acc=0.78, challenger_acc=0.86)
    outcome = _run(path)
    assert outcome.action == "promote" and outcome.winner == "2"
    assert reg.aliases() == {"champion": "2", "previous-champion": "1"}
    assert reg.client.get_model_version("loan-approval", "2").current_stage == "Production"
    assert reg.client.get_model_version("loan-approval", "1").current_stage == "Archived"
    assert store.current_rollout() is None
    audit = store.audit_log(rollout_id)
    assert [d.decision for d in audit] == ["promote"]
    assert {"alias": "champion", "from": "1", "to": "2"} in audit[0].alias_moves
    assert reg.get_tags("2")[f"rollout.{rollout_id}.decision"] == "promote"
    replaced = reg.get_tags("1")  # the old champion says what happened to it, not "promote"
    assert (replaced[f"rollout.{rollout_id}.decision"], replaced[f"rollout.{rollout_id}.role"]) == (
        "replaced by v2", "champion")
    report = Path(outcome.report)
    text = report.read_text()
    assert "PROMOTE" in text and list(report.parent.glob("effect-*.png"))
    # the model's history at a glance: the metric per day for each version, the promotion marked
    assert "## Monitoring" in text and list(report.parent.glob("monitoring-*.png"))
    daily = store.daily_metric("accuracy")
    assert {v for _, v, _, _ in daily} == {"1", "2"} and all(0 <= m <= 1 for *_, m in daily)
    errors = {v: sum(k * m for _, w, k, m in daily if w == v) / sum(k for _, w, k, _ in daily if w == v)
              for v in ("1", "2")}
    assert errors["1"] > errors["2"]  # the error rates the versions were simulated with (0.22, 0.14)
    assert "| 2 | VIP |" in text and "## Daily metric" in text  # per segment and per day, per version
    ranking = text.split("## Ranking quality", 1)[1].splitlines()
    row = next(line for line in ranking if line.startswith("| 2 |"))
    assert float(row.split("|")[2]) > float(next(line for line in ranking if line.startswith("| 1 |")).split("|")[2])

    back = evaluation.rollback(reg, store, START + timedelta(days=4), actor="test")
    assert back["champion"] == "1" and reg.aliases()["champion"] == "1"
    assert store.audit_log()[-1].decision == "rollback"

    # 40 days on, nothing open: the hourly run still runs the retention step (stores.retention_days 35), as of
    # its own time; the closed rollout's rows go, its decisions and alias moves stay
    assert outcome.retention is not None and outcome.retention.startswith("Removed 0 prediction rows")
    with store.engine.connect() as conn:
        logged = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
    later = _run(path, days=40)
    assert later.action == "idle" and later.retention.startswith(f"Removed {logged:,} prediction rows")
    assert [d.decision for d in store.audit_log()] == ["promote", "rollback"]


def test_worse_challenger_is_rejected_and_traffic_returns_to_the_champion(world):
    path, policy, reg, store, rollout_id = world
    log_shadow(store, rollout_id, 3000, champion_acc=0.84, challenger_acc=0.74)
    outcome = _run(path)
    assert outcome.action == "reject"
    assert reg.aliases() == {"champion": "1"}
    assert reg.client.get_model_version("loan-approval", "2").current_stage == "Archived"
    assert store.current_rollout() is None and store.audit_log(rollout_id)[0].decision == "reject"


def test_vip_segment_breach_rejects_even_when_overall_is_better(world):
    path, policy, reg, store, rollout_id = world
    log_shadow(store, rollout_id, 4000, champion_acc=0.80, challenger_acc=0.90, vip_challenger_fp=True)
    outcome = _run(path)
    assert outcome.action == "reject"
    assert any("VIP" in r for r in outcome.reasons)
    assert reg.version_for_alias("champion") == "1"


def test_sample_ratio_mismatch_blocks_any_decision(world):
    path, policy, reg, store, rollout_id = world
    log_shadow(store, rollout_id, 4000, champion_acc=0.78, challenger_acc=0.88, challenger_share=0.8)
    outcome = _run(path)
    assert outcome.action == "continue"
    assert any("sample-ratio mismatch" in r for r in outcome.reasons)
    assert reg.aliases() == {"champion": "1", "challenger": "2"}
    assert store.current_rollout() is not None


def test_young_rollout_keeps_collecting_and_says_what_it_needs(world):
    path, policy, reg, store, rollout_id = world
    log_shadow(store, rollout_id, 400, champion_acc=0.80, challenger_acc=0.80, days=0.4)
    outcome = _run(path, days=0.5)
    assert outcome.action == "continue"
    assert reg.aliases() == {"champion": "1", "challenger": "2"}
    assert [d.decision for d in store.audit_log(rollout_id)] == ["continue"]


def test_serving_follows_a_promotion(world):
    import time

    from fastapi.testclient import TestClient

    from serving.app import create_app

    path, policy, reg, store, rollout_id = world
    fast = policy.model_copy(update={"serving": policy.serving.model_copy(update={"reload_interval_s": 0.2})})
    with TestClient(create_app(fast)) as client:
        before = client.get("/routing").json()
        assert before["mode"] == "shadow" and before["arms"][0]["version"] == "1"
        assert [s["version"] for s in before["shadows"]] == ["2"]
        log_shadow(store, rollout_id, 4000, champion_acc=0.78, challenger_acc=0.86)
        assert _run(path).action == "promote"
        deadline = time.time() + 20
        view = client.get("/routing").json()
        while (view["arms"][0]["version"] != "2" or view["shadows"]) and time.time() < deadline:
            time.sleep(0.2)
            view = client.get("/routing").json()
        assert view["arms"][0]["version"] == "2" and view["shadows"] == []
        answer = client.post("/predict", json={"record": example_dataset(rows=1, seed=3).drop(
            columns=["approved", "applied_at"]).iloc[0].to_dict()}).json()
        assert answer["version"] == "2"


def test_bandit_mode_writes_thompson_weights_to_the_routing_table(world):
    path, policy, reg, store, _ = world
    rollout_id = store.open_rollout("bandit", {"champion": "1", "challenger": "2"},
                                    {"champion": 0.5, "challenger": 0.5}, started_at=START)
    rng = np.random.default_rng(4)
    rows, labels = [], []
    for i in range(1500):
        at = START + timedelta(minutes=i)
        arm = "2" if rng.random() < 0.5 else "1"
        y = int(rng.random() < 0.5)
        acc = 0.9 if arm == "2" else 0.7
        pred = y if rng.random() < acc else 1 - y
        rows.append(PredictionRow(f"b{i}", arm, "challenger" if arm == "2" else "champion", at,
                                  rollout_id=rollout_id, propensity=0.5, prediction=float(pred),
                                  score=0.8 * pred + 0.1, latency_ms=3.0, segment="standard"))
        labels.append((f"b{i}", y, at))
    store.log_predictions(rows)
    store.add_labels(labels)
    outcome = online_evaluation(config=str(path), params=EvaluationParameters(now=START + timedelta(hours=20)))
    assert outcome.action == "continue"  # younger than min_duration_hours: it keeps learning
    weights = store.current_rollout().weights
    floor = BanditConfig().floor
    # the better arm gets all it can; the floor keeps the champion alive (and the comparison decidable)
    assert weights["challenger"] == pytest.approx(1 - floor, abs=0.01) and weights["champion"] >= floor - 1e-9
    assert outcome.acted["weights"] == weights
