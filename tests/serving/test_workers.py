"""`rollout serve --workers 2`: two processes on one port, each with its own lanes and shadow child, one
outcome store: every answered request is logged once by the champion and once by the shadow challenger."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cli.demo import Server
from rollout.config import load_policy
from rollout.outcomes import OutcomeStore
from tests.conftest import register_income_model, write_policy

pytestmark = pytest.mark.slow  # two service processes and their shadow children start (~15 s)

REQUESTS = 400


def test_two_workers_share_one_port_and_log_every_request_once(tmp_path: Path) -> None:
    config = write_policy(tmp_path, serving={"reload_interval_s": 1.0})
    champion, _ = register_income_model(config, "champion")
    challenger, _ = register_income_model(config, "challenger")
    store = OutcomeStore(load_policy(config).outcome_url).create()
    store.open_rollout("shadow", {"champion": champion, "challenger": challenger}, {}, "s")

    server = Server(config, "token", workers=2)
    try:
        # both workers answer: fresh connections from several threads reach each process's accept loop
        pids: set[int] = set()
        deadline = time.time() + 30
        with ThreadPoolExecutor(8) as pool:
            while len(pids) < 2 and time.time() < deadline:
                pids |= set(pool.map(lambda _: httpx.get(f"{server.url}/healthz", timeout=10).json()["pid"],
                                     range(32)))
        assert len(pids) == 2, pids

        def predict(i: int) -> dict:
            body = {"record": {"income": i % 4}, "request_id": f"r{i}", "unit_id": f"u{i % 50}"}
            return httpx.post(f"{server.url}/predict", json=body, timeout=30).json()

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(predict, range(REQUESTS)))
    finally:
        server.stop()  # SIGTERM: each worker drains its log queue and its shadow child's batches

    assert all(a["version"] == champion and a["request_id"] == f"r{i}" for i, a in enumerate(answers))
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT version, count(*), count(DISTINCT request_id) FROM predictions "
                                    "GROUP BY version ORDER BY version").all()
    assert [tuple(r) for r in rows] == [(champion, REQUESTS, REQUESTS), (challenger, REQUESTS, REQUESTS)]
    store.dispose()
