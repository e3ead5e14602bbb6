"""A shadow call that fails after its batch reached the child: the child may have written the batch (served rows and
shadow rows, one transaction) before it died or was killed at its deadline. The service then logs only what the
store does not have: a request's prediction is never in the log twice, and never missing."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from rollout.outcomes import OutcomeStore, PredictionRow
from serving.batching import Job
from serving.logwriter import LogWriter, ShadowMeta, shadow_rows
from serving.metrics import Metrics
from serving.predict import ShadowSink
from tests.serving.conftest import record

pytestmark = pytest.mark.anyio


def _jobs(rid: int, n: int) -> list[Job]:
    jobs = []
    for i in range(n):
        request = f"req-{i:04d}"
        served = [PredictionRow(request, "1", "champion", 1.7e9, None, rid, True, 1.0, 1.0, 0.8, 0.3, None, None, None)]
        jobs.append(Job([record(i)], None, ShadowMeta([request], [None], [None], 1.7e9, rid, "challenger", "2", served)))
    return jobs


def _counts(store: OutcomeStore) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT version, served, count(*), count(DISTINCT request_id), count(error) "
                                 "FROM predictions GROUP BY version, served ORDER BY version")).fetchall()


@pytest.mark.parametrize("child_wrote", [40, 0], ids=["child-wrote-then-died", "child-died-before-writing"])
async def test_a_failed_shadow_call_logs_each_prediction_exactly_once(store_url: str, child_wrote: int) -> None:
    store = OutcomeStore(store_url).create()  # on PostgreSQL a pair is one row of the paired log
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    jobs = _jobs(rid, 40)
    metas = [job.meta for job in jobs]
    if child_wrote:  # what the child commits: the served rows and its own, in one call
        store.log_predictions([*(row for meta in metas for row in meta.served),
                               *shadow_rows(metas, [1.0] * 40, [0.7] * 40, [None] * 40, 0.2, None)])
    writer = LogWriter(store, queue_size=1_000, batch_size=100).start()
    writer.hold(40)  # as Predictor._offer_shadows does for the served rows the jobs carry
    ShadowSink(writer, Metrics())(jobs, None, "BrokenProcessPool: child process died")
    assert await writer.flush(10.0)
    await writer.stop()
    scored = 0 if child_wrote else 40  # rows the sink writes carry the call's error
    assert _counts(store) == [("1", 1, 40, 40, 0), ("2", 0, 40, 40, scored)]
    assert writer.held == 0 and writer.dropped == 0 and writer.written == 80
    store.dispose()
