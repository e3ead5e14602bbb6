"""Streaming rollouts on the machine's Redis: a consumer group answers a stream of requests through the
service's predict path, logging as the service does; a consumer killed mid-batch loses and doubles nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import select

from rollout.outcomes import OutcomeStore
from rollout.outcomes.schema import predictions
from serving.stream import StreamConsumer
from tests.serving.conftest import make_policy, record
from tests.serving.stream_worker import registry as slow_registry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis on 6379, or one started for these tests (skipped, with the reason, when neither)."""
    pytest.importorskip("redis", reason="the redis client is a test extra: pip install -e '.[test]'")
    if _reachable(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start one (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not _reachable(port) and time.time() < deadline:
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def streams(redis_url: str) -> Iterator[tuple[str, str]]:
    import redis

    tag = uuid.uuid4().hex[:8]
    names = (f"test:{tag}:requests", f"test:{tag}:answers")
    yield names
    redis.Redis.from_url(redis_url).delete(*names)


def _send(redis_url: str, stream: str, n: int) -> list[str]:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ids = []
    for i in range(n):
        body = {"record": record(i), "unit_id": f"u{i % 13}"} if i % 5 else {"records": [record(i), record(i + 1)]}
        ids.append(client.xadd(stream, {"body": json.dumps(body)}))
    client.xadd(stream, {"body": "{not json"})  # refused with a reason, acknowledged, never retried
    return ids


def _answers(redis_url: str, stream: str) -> list[dict[str, Any]]:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return [{"request_id": f["request_id"], **json.loads(f["answer"])} for _, f in client.xrange(stream)]


def _logged(store: OutcomeStore) -> pd.DataFrame:
    with store.engine.connect() as conn:
        return pd.DataFrame(conn.execute(select(predictions.c.request_id, predictions.c.version,
                                                predictions.c.served)).all(), columns=["request_id", "version",
                                                                                        "served"])


def test_a_stream_is_answered_and_logged_as_the_service_would(redis_url: str, streams: tuple[str, str],
                                                              store: OutcomeStore, registry: Any) -> None:
    import redis

    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    ids = _send(redis_url, streams[0], 60)
    consumer = StreamConsumer(make_policy(), redis_url, *streams, "rollout", "c1", registry=registry, store=store,
                              count=16)
    summary = asyncio.run(consumer.run(max_messages=61))
    assert (summary.answered, summary.refused) == (61, 1)
    answers = _answers(redis_url, streams[1])
    assert {a["request_id"] for a in answers} == {*ids, answers[-1]["request_id"]}
    bad = next(a for a in answers if "error" in a)
    assert bad["error"].startswith("body: invalid JSON")
    single = next(a for a in answers if a["request_id"] == ids[1])
    assert single["version"] == "1" and single["request_id"] == ids[1]  # the message id is the request id
    several = next(a for a in answers if a["request_id"] == ids[0])["predictions"]
    assert [p["request_id"] for p in several] == [f"{ids[0]}-0", f"{ids[0]}-1"]
    client = redis.Redis.from_url(redis_url)
    assert client.xpending(streams[0], "rollout")["pending"] == 0  # every message acknowledged
    logged = _logged(store)
    requests = 60 + 12  # every fifth message carried two records
    assert len(logged[logged["served"] == 1]) == requests and logged["request_id"].nunique() == requests
    assert len(logged[logged["version"] == "2"]) == requests  # the shadow challenger scored every request


def test_a_consumer_killed_mid_batch_loses_and_doubles_nothing(redis_url: str, streams: tuple[str, str],
                                                               tmp_path: Path) -> None:
    import redis

    url = f"sqlite:///{tmp_path / 'outcomes.db'}"
    store = OutcomeStore(url).create()
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    ids = _send(redis_url, streams[0], 300)
    env = {**os.environ, "ROLLOUT_TOKEN": "t", "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "tests.serving.stream_worker", redis_url, url, *streams, "w1"],
                              cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 60
    client = redis.Redis.from_url(redis_url)
    while client.xlen(streams[1]) < 60 and time.time() < deadline and worker.poll() is None:
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # mid-stream, no goodbye: its taken messages stay pending
    worker.wait(timeout=10)
    before = client.xlen(streams[1])
    assert 0 < before < 301, before
    pending = client.xpending(streams[0], "rollout")["pending"]  # 0 when the kill fell between two batches
    assert pending > 0 or before < 301

    # the same consumer name starts again: it takes its own pending messages first, then the rest
    again = StreamConsumer(make_policy(), redis_url, *streams, "rollout", "w1", registry=slow_registry(),
                           store=store, count=50)
    summary = asyncio.run(again.run(max_messages=301 - before))
    assert client.xpending(streams[0], "rollout")["pending"] == 0
    answered = {a["request_id"] for a in _answers(redis_url, streams[1])}
    assert set(ids) <= answered  # none lost: every request answered at least once
    logged = _logged(store)
    served = logged[logged["served"] == 1]
    assert len(served) == 300 + 60 and served["request_id"].is_unique  # each served row logged exactly once
    assert not logged.duplicated(["request_id", "version"]).any()
    # what the kill left taken but unacknowledged is taken again by the restarted consumer
    assert summary.reclaimed > 0 or summary.relogged_skipped > 0 or pending == 0


class _DiesBeforeAcknowledging(StreamConsumer):
    """Stops after its rows are logged and before the acknowledgement: the window a kill can hit."""

    async def _deliver(self, client: Any, done: list[str], answers: dict[str, dict[str, Any]]) -> None:
        raise ConnectionError("killed between logging and acknowledging")


def test_a_redelivered_request_already_logged_is_answered_not_logged_again(
        redis_url: str, streams: tuple[str, str], store: OutcomeStore, registry: Any) -> None:
    store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    ids = _send(redis_url, streams[0], 10)
    dying = _DiesBeforeAcknowledging(make_policy(), redis_url, *streams, "rollout", "c1", registry=registry,
                                     store=store, count=20)
    with pytest.raises(ConnectionError):
        asyncio.run(dying.run(max_messages=11))
    served = _logged(store).query("served == 1")
    assert len(served) == 12 and _answers(redis_url, streams[1]) == []  # logged, not answered, not acknowledged
    again = StreamConsumer(make_policy(), redis_url, *streams, "rollout", "c1", registry=registry, store=store)
    summary = asyncio.run(again.run(max_messages=11))
    assert summary.reclaimed == 11 and summary.relogged_skipped == 12
    assert {a["request_id"] for a in _answers(redis_url, streams[1])} >= set(ids)
    logged = _logged(store)
    assert len(logged.query("served == 1")) == 12 and not logged.duplicated(["request_id", "version"]).any()
