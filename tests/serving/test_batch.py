"""Batch rollouts: a file scored by the champion and the open rollout's challengers, logged as the service logs,
with the service's own A/B assignment, and a rerun after a crash that logs nothing twice."""

from __future__ import annotations

import functools
import http.server
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, inspect, select

from rollout.config import ConfigError
from rollout.outcomes import OutcomeStore
from rollout.outcomes.schema import predictions
from rollout.registry import InMemoryRegistry
from serving.batch import SqlQuery, SqlTable, request_id, score_file, sink_of, source_of
from tests.serving.conftest import FakeModel, RaisingModel, SleepingModel, app_for, make_policy

pytestmark = pytest.mark.slow  # two tests start challengers in child processes, as the service does

N = 250


def _input(tmp_path: Path, kind: str = "csv", n: int = N) -> Path:
    frame = pd.DataFrame({
        "application": [f"a{i:04d}" for i in range(n)],
        "customer_id": [f"c{i % 40}" for i in range(n)],
        "income": [float((i % 9) - 4) for i in range(n)],
        "tier": [("standard", "gold", "VIP")[i % 3] for i in range(n)],
        "purpose": ["car"] * n,
    })
    path = tmp_path / f"applications.{kind}"
    frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path, index=False)
    return path


def _logged(store: OutcomeStore) -> pd.DataFrame:
    with store.engine.connect() as conn:
        return pd.DataFrame(conn.execute(select(predictions.c.request_id, predictions.c.version, predictions.c.role,
                                                predictions.c.served, predictions.c.prediction, predictions.c.error,
                                                predictions.c.unit_id, predictions.c.features)).all())


def test_shadow_batch_logs_both_versions_and_answers_with_the_champion(registry: InMemoryRegistry,
                                                                       store: OutcomeStore, tmp_path: Path) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    out = tmp_path / "answers.csv"
    policy = make_policy(shadow_isolation="process")  # the challenger in a child process, as `rollout serve` has it
    summary = score_file(policy, _input(tmp_path), out, key_column="application", chunk_rows=100,
                         registry=registry, store=store)
    assert (summary.rows, summary.logged, summary.mode, summary.answered_by) == (N, N, "shadow", {"1": N})
    answers = pd.read_csv(out)
    assert len(answers) == N and list(answers["application"]) == [f"a{i:04d}" for i in range(N)]  # input order
    expected = (answers["income"] > 0).astype(int)  # P(1) = sigmoid(income); a tie is class 0, as argmax decides
    assert (answers["prediction"] == expected).all() and set(answers["version"]) == {1}
    assert answers["request_id"].iloc[3] == request_id("applications", "a0003") == "applications:a0003"
    logged = _logged(store)
    assert len(logged) == 2 * N  # the champion's served row and the challenger's shadow row of every request
    by_version = logged.groupby("version")["served"].agg(["count", "sum"]).to_dict("index")
    assert by_version == {"1": {"count": N, "sum": N}, "2": {"count": N, "sum": 0}}
    shadow = logged[logged["version"] == "2"].set_index("request_id")["prediction"]
    income = answers.set_index("request_id")["income"]
    assert (shadow.sort_index() == (income.sort_index() - 1.0 > 0).astype(float)).all()  # v2 = sigmoid(income-1)
    assert logged[logged["served"] == 1]["features"].notna().all() and set(logged["unit_id"]) == {
        f"c{i}" for i in range(40)}


def test_ab_batch_assigns_units_as_the_service_does(registry: InMemoryRegistry, store: OutcomeStore,
                                                    tmp_path: Path) -> None:
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt-7")
    path = _input(tmp_path, "parquet")
    summary = score_file(make_policy(), path, tmp_path / "answers.parquet", registry=registry, store=store)
    answers = pd.read_parquet(tmp_path / "answers.parquet")
    batch_arm = answers.groupby("customer_id")["version"].agg(set).to_dict()
    assert all(len(v) == 1 for v in batch_arm.values())  # sticky by unit
    assert set(summary.answered_by) == {"1", "2"}
    with TestClient(app_for(make_policy(), registry, store)) as client:
        for unit, versions in batch_arm.items():
            body = {"record": {"income": 1.0, "tier": "gold", "purpose": "car"}, "unit_id": unit}
            assert client.post("/predict", json=body).json()["version"] == next(iter(versions)), unit


def test_a_rerun_after_a_crash_logs_nothing_twice(registry: InMemoryRegistry, store: OutcomeStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    path, out = _input(tmp_path), tmp_path / "answers.csv"
    real = store.log_predictions
    calls: list[int] = []

    def dies_on_the_third_chunk(rows: Any) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(rows)

    monkeypatch.setattr(store, "log_predictions", dies_on_the_third_chunk)
    with pytest.raises(OSError, match="disk full"):
        score_file(make_policy(), path, out, chunk_rows=50, registry=registry, store=store)
    assert not out.exists() and not list(tmp_path.glob(".answers.csv.*"))  # no half-written output
    assert len(_logged(store)) == 2 * 100  # two chunks of 50 requests were logged whole
    monkeypatch.setattr(store, "log_predictions", real)
    again = score_file(make_policy(), path, out, chunk_rows=50, registry=registry, store=store)
    assert (again.logged, again.already_logged, again.rows) == (N - 100, 100, N)
    logged = _logged(store)
    assert len(logged) == 2 * N and not logged.duplicated(["request_id", "version"]).any()
    assert len(pd.read_csv(out)) == N


def test_a_failing_challenger_costs_its_rows_only_and_bad_rows_are_refused(store: OutcomeStore,
                                                                          tmp_path: Path) -> None:
    registry = InMemoryRegistry()
    registry.set_alias("champion", registry.add(FakeModel(0.0)))
    registry.set_alias("challenger", registry.add(RaisingModel()))
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "s")
    frame = pd.read_csv(_input(tmp_path)).astype({"income": object})
    frame.loc[7, "income"] = "a lot"  # a row the champion's contract refuses
    path = tmp_path / "mixed.csv"
    frame.to_csv(path, index=False)
    summary = score_file(make_policy(challenger_isolation="process"), path, tmp_path / "out.csv", registry=registry,
                         store=store)
    answers = pd.read_csv(tmp_path / "out.csv")
    assert summary.refused == 1 and answers.loc[7, "error"].startswith("income: expected number")
    assert np.isnan(answers.loc[7, "prediction"])
    assert answers.drop(index=7)["version"].eq(1).all()  # the champion answered the challenger's rows
    assert summary.challenger_errors["2"] > 0
    logged = _logged(store)
    failures = logged[(logged["version"] == "2")]
    assert len(failures) == summary.challenger_errors["2"] and failures["error"].str.contains("exploded").all()
    fallback = logged[(logged["version"] == "1")]
    assert len(fallback) == N - 1 and not logged["request_id"].eq("mixed:7").any()


def test_inputs_it_cannot_score_are_named(registry: InMemoryRegistry, store: OutcomeStore, tmp_path: Path) -> None:
    policy = make_policy()
    with pytest.raises(ConfigError, match="expected a .csv or .parquet"):
        score_file(policy, tmp_path / "rows.json", tmp_path / "o.csv", registry=registry, store=store)
    pd.DataFrame({"tier": ["gold"]}).to_csv(tmp_path / "thin.csv", index=False)
    with pytest.raises(ConfigError, match=r"lacks the champion's required columns \['income'\]"):
        score_file(policy, tmp_path / "thin.csv", tmp_path / "o.csv", registry=registry, store=store)
    with pytest.raises(ConfigError, match="--key-column 'id'"):
        score_file(policy, _input(tmp_path), tmp_path / "o.csv", key_column="id", registry=registry, store=store)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(predictions)).scalar_one() == 0


def test_a_hung_challenger_is_cut_off_at_its_deadline(store: OutcomeStore, tmp_path: Path) -> None:
    registry = InMemoryRegistry()
    registry.set_alias("champion", registry.add(FakeModel(0.0)))
    registry.set_alias("challenger", registry.add(SleepingModel(120.0)))
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    summary = score_file(make_policy(shadow_isolation="process"), _input(tmp_path, n=20), tmp_path / "o.csv",
                         registry=registry, store=store)  # deadline: the 5 s floor, not the sleep's 120 s
    assert summary.seconds < 60 and summary.answered_by == {"1": 20} and summary.challenger_errors == {"2": 20}
    logged = _logged(store)
    assert logged[logged["version"] == "2"]["error"].str.startswith("timeout").all()


def test_a_first_run_does_not_look_up_each_request_and_a_rerun_does(registry: InMemoryRegistry, store: OutcomeStore,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    path, out = _input(tmp_path), tmp_path / "answers.csv"
    asked: list[int] = []
    real = store.logged_requests
    monkeypatch.setattr(store, "logged_requests", lambda ids: asked.append(len(ids)) or real(ids))
    first = score_file(make_policy(), path, out, chunk_rows=50, registry=registry, store=store)
    assert first.logged == N and len(asked) == 1  # the first chunk only: nothing of this batch was logged
    assert store.any_request_with_prefix("answers:") is False and store.any_request_with_prefix("applications:")
    again = score_file(make_policy(), path, out, chunk_rows=50, registry=registry, store=store)
    assert (again.logged, again.already_logged) == (0, N) and len(asked) == 1 + N // 50
    assert len(_logged(store)) == 2 * N


def test_rows_from_a_query_answered_into_a_table_on_each_database(registry: InMemoryRegistry, store_url: str) -> None:
    """The nightly rows come from a SQL query and the answers go to a table of the same database; a rerun
    replaces the table and logs nothing twice (here the outcome store shares the database)."""
    store = OutcomeStore(store_url).create()
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    engine = create_engine(store_url)
    frame = pd.read_csv(_input(Path(tempfile.mkdtemp())))
    frame.to_sql("applications", engine, if_exists="replace", index=False)
    query = SqlQuery(store_url, "SELECT * FROM applications WHERE purpose = 'car' AND application >= 'a0050'")
    pd.DataFrame({"junk": [1]}).to_sql("scored__partial", engine, index=False)  # what a killed run leaves
    try:
        for run in (1, 2):
            summary = score_file(make_policy(), query, SqlTable(store_url, "scored"), batch_id="nightly",
                                 key_column="application", chunk_rows=64, registry=registry, store=store)
            assert (summary.rows, summary.logged, summary.already_logged) == ((N - 50, N - 50, 0) if run == 1
                                                                              else (N - 50, 0, N - 50))
            scored = pd.read_sql("SELECT * FROM scored", engine)
            assert len(scored) == N - 50 and scored["request_id"].iloc[0] == "nightly:a0050"
            assert (scored["prediction"] == (scored["income"] > 0).astype(int)).all()
            tables = set(inspect(engine).get_table_names())
            assert not any(t.startswith("scored__partial") for t in tables)  # the staging table became `scored`
        logged = _logged(store)
        assert len(logged) == 2 * (N - 50) and not logged.duplicated(["request_id", "version"]).any()
        assert str(summary.output).startswith("table scored on ") and "***" not in str(summary.output)
        with pytest.raises(ConfigError, match="--query failed"):
            score_file(make_policy(), SqlQuery(store_url, "SELECT * FROM no_such_table"), SqlTable(store_url, "x"),
                       batch_id="b", key_column="application", registry=registry, store=store)
        assert "x" not in set(inspect(engine).get_table_names())  # a failed run leaves no table behind
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS applications")
            conn.exec_driver_sql("DROP TABLE IF EXISTS scored")
            conn.exec_driver_sql("DROP TABLE IF EXISTS scored__partial")
        engine.dispose()
        store.dispose()


def test_a_file_by_its_http_url(registry: InMemoryRegistry, store: OutcomeStore, tmp_path: Path) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    served = tmp_path / "served"
    served.mkdir()
    _input(served, "parquet")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/applications.parquet"
        summary = score_file(make_policy(), url, tmp_path / "out.csv", key_column="application", registry=registry,
                             store=store)
        assert (summary.rows, summary.logged) == (N, N)
        assert pd.read_csv(tmp_path / "out.csv")["request_id"].iloc[0] == "applications:a0000"
        with pytest.raises(ConfigError, match="could not download"):
            score_file(make_policy(), url.replace("applications", "missing"), tmp_path / "o.csv", registry=registry,
                       store=store)
    finally:
        server.shutdown()
        server.server_close()


def test_sources_and_sinks_are_named_when_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input or --query"):
        source_of(None, None, None)
    with pytest.raises(ConfigError, match="--input or --query"):
        source_of("a.csv", "SELECT 1", "sqlite://")
    with pytest.raises(ConfigError, match="--database: a --query needs"):
        source_of(None, "SELECT 1", None)
    with pytest.raises(ConfigError, match="--database 'nope'"):
        source_of(None, "SELECT 1", "nope")
    with pytest.raises(ConfigError, match="--output-table 'scored; DROP TABLE x'"):
        sink_of(None, "scored; DROP TABLE x", "sqlite://")
    with pytest.raises(ConfigError, match="--output or --output-table"):
        sink_of("a.csv", "t", "sqlite://")
    assert source_of("https://host/x.parquet", None, None) == "https://host/x.parquet"
    (tmp_path / "x.csv").write_text("a\n1\n")
    assert source_of(str(tmp_path / "x.csv"), None, None) == tmp_path / "x.csv"
    with pytest.raises(ConfigError, match=f"--input {tmp_path / 'y.csv'}: no such file"):  # before any model loads
        source_of(str(tmp_path / "y.csv"), None, None)
    with pytest.raises(ConfigError, match="--batch-id and --key-column"):
        score_file(make_policy(), SqlQuery("sqlite://", "SELECT 1"), Path("o.csv"))
