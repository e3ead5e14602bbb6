"""The label-requests flow and `rollout label-requests`: a batch of predictions to label, as a file people can use."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine

from flows.label_requests import LabelRequestParameters, label_requests
from rollout.config import ConfigError, load_policy
from rollout.outcomes import OutcomeStore
from tests.conftest import ROOT, write_policy
from tests.unit.test_label_requests import T0, _shadow_hour

pytestmark = [pytest.mark.usefixtures("prefect_harness")]


def test_label_requests_are_written_for_labellers_and_each_request_is_offered_once(tmp_path: Path) -> None:
    path = write_policy(tmp_path, rollout={"primary_metric": "accuracy", "label_requests": {"enabled": True}})
    store = OutcomeStore(load_policy(path).outcome_url, clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, None, "salt", T0)
    truth: dict[str, float] = {}
    _shadow_hour(store, rid, 0, np.random.default_rng(2), 400, truth)

    result = label_requests(params=LabelRequestParameters(budget=40, output=str(tmp_path / "ask.csv")),
                            config=str(path))
    asked = pd.read_csv(tmp_path / "ask.csv")
    assert result["considered"] == 400 and len(asked) == result["requested"] and abs(len(asked) - 40) <= 1
    assert list(asked.columns[:5]) == ["request_id", "probability", "unit_id", "ts", "segment"]
    assert "x" in asked.columns  # the logged features, one column each
    assert asked["probability"].between(0, 1, inclusive="right").all()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", "label-requests", "--config", str(path), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    refused = cli("--budget", "10", "--output", str(tmp_path / "ask.txt"))
    assert refused.returncode == 2 and "csv or .parquet" in refused.stdout
    empty = cli("--budget", "10", "--output", str(tmp_path / "none.parquet"))  # nothing logged since the flow's batch
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert len(pd.read_parquet(tmp_path / "none.parquet")) == 0
    _shadow_hour(store, rid, 1, np.random.default_rng(3), 300, truth)
    more = cli("--budget", "30", "--output", str(tmp_path / "more.parquet"))
    assert more.returncode == 0 and "of 300 requests" in more.stdout, more.stdout + more.stderr
    again = pd.read_parquet(tmp_path / "more.parquet")
    assert not set(again["request_id"]) & set(asked["request_id"])
    assert (T0 + timedelta(hours=1)).isoformat() <= again["ts"].min()


def test_label_requests_can_queue_in_a_table_of_your_database(tmp_path: Path) -> None:
    """A labelling team that works from a database gets each batch appended to a table, with its batch number."""
    path = write_policy(tmp_path, rollout={"primary_metric": "accuracy", "label_requests": {"enabled": True}})
    store = OutcomeStore(load_policy(path).outcome_url, clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, None, "salt", T0)
    truth: dict[str, float] = {}
    queue = f"sqlite:///{tmp_path / 'labelling.db'}"
    with pytest.raises(ConfigError, match="params.output or params.output_table"):
        label_requests(params=LabelRequestParameters(budget=5), config=str(path))
    with pytest.raises(ConfigError, match="params.database: params.output_table needs"):
        label_requests(params=LabelRequestParameters(budget=5, output_table="queue"), config=str(path))
    for hour in (0, 1):
        _shadow_hour(store, rid, hour, np.random.default_rng(hour), 300, truth)
        result = label_requests(params=LabelRequestParameters(budget=30, output_table="to_label", database=queue),
                                config=str(path))
        assert result["output"].startswith("table to_label on sqlite:///")
    engine = create_engine(queue)
    asked = pd.read_sql("SELECT * FROM to_label", engine)
    engine.dispose()
    assert list(asked.columns[:4]) == ["rollout_id", "batch", "request_id", "probability"]
    assert asked["batch"].nunique() == 2 and not asked["request_id"].duplicated().any()
    assert set(asked["request_id"]) <= set(truth) and (asked["rollout_id"] == rid).all()
