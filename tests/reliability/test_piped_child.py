"""A response-path challenger's child process (serving.isolation.PipedScorer): answers each batch in order,
takes batches larger than the socket's buffer without blocking the event loop, reports a model that cannot load
without restarting forever, and ends with the service."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest

from rollout.models import LoadedModel
from serving.isolation import PipedScorer
from tests.serving.conftest import FakeModel, SleepingModel, record

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # child processes

class LoadsOnlyHere(FakeModel):
    """Unpickles in the service, fails to in any other process (a model whose dependency the child lacks)."""

    def __setstate__(self, state: dict) -> None:
        if multiprocessing.parent_process() is not None:  # a process this test started
            raise ImportError("no module named 'team_private_features'")
        self.__dict__.update(state)


async def _answer(scorer: PipedScorer, rows: list) -> tuple:
    return await asyncio.wrap_future(scorer.submit(rows))


async def test_pipelined_batches_each_get_their_own_answers_in_order() -> None:
    model = LoadedModel(FakeModel(), "2")
    scorer = PipedScorer(model)
    try:
        await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
        # sizes from one row to far more than a socket buffer holds (~20 MB pickled): the event loop keeps turning
        batches = [[record(i) for i in range(start, start + n)] for start, n in ((0, 1), (5, 37), (3, 60_000), (9, 2))]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        answers = await asyncio.gather(*(_answer(scorer, rows) for rows in batches))
        tick.cancel()
    finally:
        scorer.close()
    for rows, (preds, scores, errors, logged, call_ms) in zip(batches, answers, strict=True):
        expected = model.score(rows)
        assert preds == expected.predictions and scores == expected.scores and errors == expected.errors
        assert logged is False and call_ms >= 0
    assert ticks > 10  # the loop was never blocked while 60,000 records crossed


async def test_a_model_that_cannot_load_in_the_child_fails_its_calls_at_once_and_is_not_restarted() -> None:
    scorer = PipedScorer(LoadedModel(LoadsOnlyHere(), "2"))
    try:
        with pytest.raises(RuntimeError, match="team_private_features"):
            await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
        await asyncio.sleep(0.5)  # the child has ended
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(Exception, match="could not start in a child process|child process died"):
                await asyncio.wait_for(_answer(scorer, [record()]), 10)
            scorer.revive()
        assert time.monotonic() - started < 5.0
        assert scorer.restarts == 0
    finally:
        scorer.close()


async def test_a_hung_child_is_replaced_and_the_next_batch_is_answered() -> None:
    scorer = PipedScorer(LoadedModel(SleepingModel(60.0), "2"))
    try:
        await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
        hung = scorer.submit([record()])
        queued = scorer.submit([record(1)])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(hung)), 0.3)
        first = scorer.pid
        scorer.restart()  # what the lane does at the deadline
        with pytest.raises(Exception, match="restarted"):
            await asyncio.wrap_future(queued)  # it was waiting behind the hung call
        assert scorer.pid != first and scorer.restarts == 1
        await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
    finally:
        scorer.close()


async def test_close_ends_the_child_and_refuses_new_batches() -> None:
    scorer = PipedScorer(LoadedModel(FakeModel(), "2"))
    await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
    process = scorer._process
    scorer.close()
    deadline = time.monotonic() + 5
    while process.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not process.is_alive()
    with pytest.raises(RuntimeError, match="shutdown"):
        await _answer(scorer, [record()])


async def test_a_shadow_child_logs_a_batch_sent_in_parts_with_each_request_s_served_row(tmp_path) -> None:
    # A shadow lane pickles its batch a few jobs at a time (serving.batching.MicroBatcher._pickled); the child
    # scores the parts as one batch and logs every request's served row and its own row, in job order.
    from rollout.outcomes import OutcomeStore, PredictionRow
    from serving.isolation import pickled_part
    from serving.logwriter import ShadowMeta

    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    model = LoadedModel(FakeModel(), "2")
    jobs = []
    for i in range(150):
        ids = [f"r{i}-{k}" for k in range(1 + i % 3)]
        served = [PredictionRow(r, "1", "champion", 1.7e9, None, rid, True, 1.0, 1.0, 0.9, 0.1, None, None, None)
                  for r in ids]
        jobs.append(([record(i + k) for k in range(len(ids))],
                     ShadowMeta(ids, [None] * len(ids), [None] * len(ids), 1.7e9, rid, "challenger", "2", served)))
    parts = [pickled_part([r for rows, _ in jobs[k:k + 64] for r in rows], [m for _, m in jobs[k:k + 64]])
             for k in range(0, len(jobs), 64)]
    scorer = PipedScorer(model, store_url=store.url)
    try:
        await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
        preds, scores, errors, logged, _ = await asyncio.wait_for(asyncio.wrap_future(scorer.submit_parts(parts)), 60)
    finally:
        scorer.close()
    rows = [r for rows, _ in jobs for r in rows]
    expected = model.score(rows)
    assert len(parts) == 3 and logged is True
    assert preds == expected.predictions and scores == expected.scores
    with store.engine.connect() as conn:
        from sqlalchemy import text

        logged_rows = conn.execute(text("SELECT request_id, version, served, score FROM predictions")).fetchall()
    ids = [r for _, meta in jobs for r in meta.request_ids]
    assert sorted((r, v, s) for r, v, s, _ in logged_rows) == sorted([(r, "1", 1) for r in ids] + [(r, "2", 0) for r in ids])
    shadow_scores = {r: s for r, v, _, s in logged_rows if v == "2"}
    assert [shadow_scores[r] for r in ids] == expected.scores
