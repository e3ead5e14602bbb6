"""The traffic simulator: simulated time reaches the store, labels arrive late, some never."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import numpy as np
import pytest

from rollout.config import Policy
from rollout.registry import InMemoryRegistry
from cli.simulate import simulate_async
from rollout.outcomes import OutcomeStore
from serving.app import create_app


class LoanModel:
    """Approves when the credit score is high; tolerates nulls, like a real pipeline would."""

    classes_ = np.array([0, 1])

    def predict_proba(self, frame):
        score = frame["credit_score"].astype(float).fillna(650.0).to_numpy()
        p = 1 / (1 + np.exp(-(score - 660.0) / 40.0))
        return np.c_[1 - p, p]

    def predict(self, frame):
        return (self.predict_proba(frame)[:, 1] >= 0.5).astype(int)


@pytest.mark.anyio
async def test_simulated_days_reach_the_store(store: OutcomeStore, token: str) -> None:
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(LoanModel()))
    reg.set_alias("challenger", reg.add(LoanModel()))
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.3}, "s")
    policy = Policy.model_validate({"serving": {"challenger_isolation": "thread"}})  # no child to wait for
    app = create_app(policy, registry=reg, store=store)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    async with app.router.lifespan_context(app):
        summary = await simulate_async(
            "http://sim",
            policy,
            requests=400,
            days=4,
            label_delay_hours=24,
            missing_rate=0.2,
            concurrency=16,
            seed=3,
            start=start,
            transport=httpx.ASGITransport(app=app),
        )
    assert summary.errors == 0 and summary.predicted == 400 and summary.label_errors == 0
    assert summary.labels_sent + summary.labels_missing + summary.labels_pending == 400
    assert summary.labels_unknown == 0 and summary.labels_pending > 0  # the last day's labels are not due yet
    assert 0.2 < summary.by_version["2"] / 400 < 0.4
    first, last = store.first_seen(rid), store.last_seen(rid)
    assert first is not None and last is not None
    assert start <= first and (last - first).total_seconds() > 3.5 * 86400 and last < datetime(2026, 1, 5, tzinfo=UTC)
    with store.engine.connect() as conn:
        lag = conn.exec_driver_sql(
            "SELECT min(l.ts - p.ts), max(l.ts - p.ts) FROM labels l JOIN predictions p ON p.request_id = l.request_id"
        ).one()
    assert 12 * 3600 <= lag[0] and lag[1] <= 36 * 3600  # label delay is 24 h ± 50 %
    moments = store.evidence(rid, datetime(2026, 1, 4, tzinfo=UTC)).loss["accuracy"]
    assert {k[0] for k in moments} == {"1", "2"} and {k[2] for k in moments} == {"2026-01-01", "2026-01-02", "2026-01-03"}


@pytest.mark.anyio
async def test_simulate_refuses_to_run_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROLLOUT_TOKEN")
    with pytest.raises(ValueError, match="ROLLOUT_TOKEN"):
        await simulate_async("http://sim", Policy(), requests=5)


def test_replaying_your_own_rows_names_what_does_not_fit(tmp_path) -> None:
    """--data FILE: the label and time columns must exist, times must read as times, delays read as 12h/2d."""
    import pandas as pd

    from cli.simulate import parse_delay, replay_from

    path = tmp_path / "rows.csv"
    pd.DataFrame({"when": ["2025-04-01T02:00", "2025-04-01T01:00"], "x": [1.0, 2.0], "y": [0, None]}).to_csv(
        path, index=False)
    policy = Policy.model_validate({"data": {"source": "rows.csv", "target": "y"}})
    replay = replay_from(str(path), policy, ts_column="when")
    assert replay.features.columns.tolist() == ["x"] and replay.features["x"].tolist() == [2.0, 1.0]  # time order
    assert replay.times is not None and replay.times[1] - replay.times[0] == 3600.0
    assert replay.labels.isna().tolist() == [True, False]  # a row without a label is sent, never labelled
    with pytest.raises(ValueError, match=r"--label-column: 'outcome' is not a column of .*rows.csv"):
        replay_from(str(path), policy, label_column="outcome")
    with pytest.raises(ValueError, match=r"--ts-column: 2 of 2 rows of 'x' are not readable times"):
        pd.DataFrame({"x": ["soon", "later"], "y": [0, 1]}).to_csv(path, index=False)
        replay_from(str(path), policy, ts_column="x")
    assert (parse_delay("12h"), parse_delay("2d"), parse_delay("90m"), parse_delay("6")) == (12.0, 48.0, 1.5, 6.0)
    with pytest.raises(ValueError, match=r"label delay 'soon': expected hours"):
        parse_delay("soon")


def test_simulate_on_a_teams_own_data_says_what_to_pass_instead_of_a_traceback(tmp_path, monkeypatch) -> None:
    """`rollout simulate` as the README's own-data steps write it: the built-in traffic is the example's loan
    applications, which a team's policy cannot score; without the token, the variable to set. Exit 2, nothing sent
    (the URL is a closed port: a request would fail differently)."""
    from typer.testing import CliRunner

    from cli.main import app
    from tests.conftest import write_policy

    (tmp_path / "diabetes.csv").write_text("age,bmi,target\n0.1,0.2,151\n0.3,0.1,75\n")
    path = write_policy(tmp_path, data={"source": "diabetes.csv", "target": "target", "task": "regression"},
                        estimator={"name": "ridge"}, rollout={"margin": 30, "min_detectable_effect": 150})
    args = ["simulate", "--config", str(path), "--url", "http://127.0.0.1:9", "--requests", "5"]
    monkeypatch.delenv("ROLLOUT_TOKEN", raising=False)
    no_token = CliRunner().invoke(app, args, terminal_width=400)
    said = " ".join(no_token.output.split())
    assert no_token.exit_code == 2 and "set the environment variable ROLLOUT_TOKEN" in said, said
    assert "Traceback" not in said and "token=" not in said
    monkeypatch.setenv("ROLLOUT_TOKEN", "secret")
    bad_start = CliRunner().invoke(app, [*args, "--data", str(tmp_path / "diabetes.csv"), "--label-column", "target",
                                         "--start", "yesterday"], terminal_width=400)
    assert bad_start.exit_code == 2 and "--start 'yesterday': expected an ISO 8601 time" in bad_start.output
    own = CliRunner().invoke(app, args, terminal_width=400)
    said = " ".join(own.output.split())
    assert own.exit_code == 2 and "not rows of diabetes.csv (data.source)" in said and "--data FILE" in said, said


def test_labels_that_came_before_their_rows_are_explained_not_left_to_look_lost(tmp_path, monkeypatch) -> None:
    """`labels_unknown` in the summary (routine with `serve --workers N`) comes with what it means: the labels are
    kept and count once their rows are written (tests/unit/test_store.py checks that they do)."""
    from typer.testing import CliRunner

    import cli.simulate
    from cli.main import app
    from cli.simulate import SimulationSummary
    from tests.conftest import write_policy

    def ran(*_args, **_kwargs) -> SimulationSummary:
        return SimulationSummary(500, 500, 0, 496, 0, 4, labels_unknown, 0, {"1": 500}, "s", "e", 1.3)

    monkeypatch.setattr(cli.simulate, "simulate", ran)
    args = ["simulate", "--config", str(write_policy(tmp_path)), "--url", "http://127.0.0.1:9"]
    for labels_unknown in (0, 22):
        result = CliRunner().invoke(app, args, terminal_width=400)
        said = " ".join(result.output.split())
        assert result.exit_code == 0, said
        explained = "22 label(s) reached the store before their prediction's row" in said
        assert explained == bool(labels_unknown) and ("kept and count once the row is written" in said) == explained
