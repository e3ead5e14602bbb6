"""The batch-scoring flow on a real champion from ci-pipeline: a team's nightly file, scored and logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.batch_scoring import BatchParameters, batch_scoring
from flows.ci_pipeline import ci_pipeline
from rollout.config import load_policy
from rollout.data import example_dataset
from rollout.outcomes import OutcomeStore
from tests.conftest import ROOT, write_policy

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_a_nightly_file_is_scored_by_the_champion_and_logged(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    assert ci_pipeline(config=str(path)).version == "1"
    nightly = example_dataset(rows=600, seed=77).drop(columns=["approved"])
    nightly.insert(0, "application_id", [f"app-{i}" for i in range(len(nightly))])
    nightly.to_parquet(tmp_path / "nightly.parquet", index=False)
    summary = batch_scoring(params=BatchParameters(input=str(tmp_path / "nightly.parquet"),
                                                   output=str(tmp_path / "scored.csv"), key_column="application_id",
                                                   chunk_rows=250), config=str(path))
    assert (summary.rows, summary.logged, summary.answered_by, summary.refused) == (600, 600, {"1": 600}, 0)
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert scored["score"].between(0, 1).all() and set(scored["prediction"]) <= {0, 1}
    assert scored["request_id"].iloc[0] == "nightly:app-0"
    store = OutcomeStore(load_policy(path).outcome_url)
    assert store.count_predictions() == 600
    # the same file again from the command line: nothing is logged twice
    done = subprocess.run([sys.executable, "-m", "cli.main", "score", "--config", str(path), "--input",
                           str(tmp_path / "nightly.parquet"), "--output", str(tmp_path / "again.parquet"),
                           "--key-column", "application_id"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "logged 0 requests; 600 were logged by an earlier run of batch 'nightly'" in " ".join(done.stdout.split())
    assert store.count_predictions() == 600 and len(pd.read_parquet(tmp_path / "again.parquet")) == 600


def test_rollout_stream_answers_a_redis_stream_with_the_champion(tmp_path: Path) -> None:
    """`rollout stream` as a user starts it: a real champion, the machine's Redis, stopped with Ctrl-C."""
    import json
    import signal
    import socket
    import time
    import uuid

    redis = pytest.importorskip("redis", reason="the redis client is a test extra: pip install -e '.[test]'")
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", 6379)) != 0:
            pytest.skip("no Redis on 127.0.0.1:6379 (tests/serving/test_stream.py starts one where redis-server "
                        "is installed)")
    path = write_policy(tmp_path)
    assert ci_pipeline(config=str(path)).version == "1"
    tag = uuid.uuid4().hex[:8]
    requests, answers = f"test:{tag}:requests", f"test:{tag}:answers"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    rows = example_dataset(rows=20, seed=5).drop(columns=["approved", "applied_at"])
    try:
        for record in rows.astype(object).where(rows.notna(), None).to_dict("records"):
            client.xadd(requests, {"body": json.dumps({"record": record})})  # customer_id: the unit column
        worker = subprocess.Popen([sys.executable, "-m", "cli.main", "stream", "--config", str(path), "--input",
                                   requests, "--output", answers, "--consumer", "t1"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while client.xlen(answers) < 20 and time.time() < deadline and worker.poll() is None:
            time.sleep(0.2)
        worker.send_signal(signal.SIGINT)  # finishes the batch in hand, drains the log, exits
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, out
        assert "answered 20 messages" in out
        got = [json.loads(f["answer"]) for _, f in client.xrange(answers)]
        assert len(got) == 20 and {a["version"] for a in got} == {"1"} and all(0 <= a["score"] <= 1 for a in got)
        assert OutcomeStore(load_policy(path).outcome_url).count_predictions() == 20
    finally:
        client.delete(requests, answers)
