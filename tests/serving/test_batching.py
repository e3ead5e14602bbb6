"""Response-path lanes batch as one service: an arm's lane gathers while another arm's call runs (A/B batches
grow under load like the champion's alone), and a lone request on an idle service is scored at once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pandas as pd
import pytest

from rollout.models import LoadedModel, Outputs
from serving.batching import INLINE_MAX_VALUES, INLINE_MAX_VALUES_CHILD, Calls, MicroBatcher, Scored


class Slow:
    """A model whose every call takes `delay` seconds; records each call's batch size."""

    def __init__(self, version: str, delay: float) -> None:
        self.version = version
        self.delay = delay
        self.batches: list[int] = []

    def score_each(self, rows: list[dict]) -> Outputs:
        self.batches.append(len(rows))
        time.sleep(self.delay)
        return Outputs([1.0] * len(rows), [0.5] * len(rows), [None] * len(rows))


def _lane(model: Slow, calls: Calls | None) -> MicroBatcher:
    # a long max_wait: what is asserted is which requests share a call, not how long anything took
    return MicroBatcher(model, name=f"{model.version}/serve", max_batch=64, max_wait_s=0.5,  # type: ignore[arg-type]
                        calls=calls).start()


@pytest.mark.anyio
@pytest.mark.parametrize("shared", [True, False])
async def test_an_arm_gathers_while_the_other_arms_call_runs(shared: bool) -> None:
    champion, challenger = Slow("1", 0.2), Slow("2", 0.01)
    calls = Calls() if shared else None
    a, b = _lane(champion, calls), _lane(challenger, calls)
    first = a.submit([{"x": 0}])  # the champion's call is now in flight for 0.2 s
    await asyncio.sleep(0.02)
    answers = []
    for i in range(3):  # the challenger's requests arrive 5 ms apart meanwhile
        answers.append(b.submit([{"x": i}]))
        await asyncio.sleep(0.005)
    await asyncio.gather(first, *answers)
    await a.close()
    await b.close()
    if shared:
        assert challenger.batches == [3]  # one call for the three, not a call for the first alone
    else:
        assert challenger.batches[0] == 1  # each lane alone: its idle model scores the first at once


@pytest.mark.anyio
async def test_a_lone_request_on_an_idle_service_is_scored_at_once() -> None:
    calls = Calls()
    model = Slow("1", 0.0)
    lane, other = _lane(model, calls), _lane(Slow("2", 0.0), calls)
    started = time.perf_counter()
    await lane.submit([{"x": 1}])
    waited = time.perf_counter() - started
    await lane.close()
    await other.close()
    assert model.batches == [1] and waited < 0.25  # scored at once, not after gathering for max_wait (0.5 s)


@pytest.mark.anyio
async def test_an_arm_gathering_behind_the_other_arms_call_scores_when_that_call_ends() -> None:
    # At concurrency 8 an A/B request waited the whole max_wait_ms whenever the other arm had a call in flight
    # (p50 2.0 ms against 0.7 champion-only); the rows that call answers are what would come next, after it ends.
    calls = Calls()
    champion, challenger = Slow("1", 0.1), Slow("2", 0.0)
    a, b = _lane(champion, calls), _lane(challenger, calls)
    started = time.perf_counter()
    first = a.submit([{"x": 0}])  # the champion's call is in flight for 0.1 s
    await asyncio.sleep(0.02)
    answers = [b.submit([{"x": i}]) for i in range(3)]
    await asyncio.gather(*answers)
    waited = time.perf_counter() - started
    await first
    await a.close()
    await b.close()
    assert challenger.batches == [3]  # gathered behind the champion's call
    assert waited < 0.35  # scored once that call ended (~0.1 s), not at max_wait (0.5 s after they came)


THREAD_ROWS, CHILD_ROWS = INLINE_MAX_VALUES // 10, INLINE_MAX_VALUES_CHILD // 10  # the example's 10 columns


def _linear(frame: pd.DataFrame, target: str, version: str, **params: Any) -> tuple[LoadedModel, list[dict]]:
    """A table's pipeline (rollout's ColumnTransformer, then LogisticRegression), loaded as the service loads it, and
    its feature rows as a JSON body brings them (a missing value null)."""
    from rollout.ci.training import build_pipeline
    from rollout.config import DataConfig, EstimatorConfig
    from rollout.data import infer_schema

    cfg = DataConfig(source="x.csv", target=target, task="classification", timestamp_column=None,
                     segment_column=None, unit_column=None)
    schema = infer_schema(frame, cfg)
    pipe = build_pipeline(schema, EstimatorConfig(name="logistic_regression", params=params))
    pipe.fit(frame[list(schema.features)], frame[target])
    rows = [{k: (None if v != v else v) for k, v in r.items()} for r in frame[list(schema.features)].to_dict("records")]
    return LoadedModel(pipe, version), rows


def _pure_model() -> LoadedModel:
    """The example's pipeline: compiled, with a plain linear end."""
    from rollout.data import example_dataset

    frame = example_dataset(600, seed=4).drop(columns=["applied_at", "customer_id"], errors="ignore")
    model, rows = _linear(frame, "approved", "7")
    assert model.pure and model.compiled is not None and model.compiled.width == 10
    model.rows = rows  # type: ignore[attr-defined]
    return model


def _where(model: LoadedModel) -> list[tuple[str, int]]:
    """Each call to the model's own code path (`score_each`): the thread it ran in and its rows."""
    calls: list[tuple[str, int]] = []
    own = model.score_each

    def score_each(rows: list[dict], budget: int | None = None) -> Outputs:
        calls.append((threading.current_thread().name, len(rows)))
        return own(rows, budget)

    model.score_each = score_each  # type: ignore[method-assign]
    return calls


@pytest.mark.anyio
async def test_a_pure_models_small_batches_are_scored_on_the_event_loop_and_large_ones_in_its_thread() -> None:
    model = _pure_model()
    rows = model.rows  # type: ignore[attr-defined]
    expected = model.score_each(rows[:40])
    calls = _where(model)
    lane = MicroBatcher(model, name="7/serve", max_batch=64, max_wait_s=0.002).start()

    async def request(row: dict, passes: int) -> Scored:  # read by the event loop `passes` passes after the first
        for _ in range(passes):
            await asyncio.sleep(0)
        return await lane.submit([row])

    # requests read over consecutive loop passes join one batch (taken at once, the first would go alone)
    small = await asyncio.gather(*(request(row, i // 2) for i, row in enumerate(rows[:5])))
    large = await lane.submit(rows[:THREAD_ROWS + 16])
    odd = await lane.submit([{**rows[0], "income": "a lot"}])  # the compiled path refuses it: the model's call
    await lane.close()
    assert [s.predictions[0] for s in small] == expected.predictions[:5]
    assert [s.scores[0] for s in small] == expected.scores[:5]  # type: ignore[index]
    assert [s.batch_rows for s in small] == [5] * 5
    assert large.predictions == expected.predictions[:THREAD_ROWS + 16]
    assert odd.errors[0] is not None  # scored (and refused) by the model's own path, in its thread
    # the model's own code ran only for the large batch and the odd record, each in the lane's thread
    assert [n for _, n in calls] == [THREAD_ROWS + 16, 1]
    assert all(name.startswith("score-7/serve") for name, _ in calls)


@pytest.mark.anyio
@pytest.mark.slow  # a child process
async def test_a_pure_challengers_small_batches_skip_its_child_and_others_still_go_there() -> None:
    from serving.isolation import PipedScorer

    model = _pure_model()
    rows = model.rows  # type: ignore[attr-defined]
    expected = model.score_each(rows[:CHILD_ROWS + 8])
    scorer = PipedScorer(model)
    sent: list[int] = []
    submit = scorer.submit

    def counted(batch: list[dict], metas: list | None = None) -> Any:
        sent.append(len(batch))
        return submit(batch, metas)

    scorer.submit = counted  # type: ignore[method-assign]
    lane = MicroBatcher(model, name="7/challenger", max_batch=512, max_wait_s=0.002, timeout_s=30.0,
                        scorer=scorer).start()
    await lane.started()
    small = await lane.submit(rows[:3])
    large = await lane.submit(rows[:CHILD_ROWS + 8])
    await lane.close()
    assert small.predictions == expected.predictions[:3]
    assert large.predictions == expected.predictions
    assert sent == [CHILD_ROWS + 8]  # only the large batch crossed to the child


@pytest.mark.anyio
async def test_inline_batches_free_their_slot_and_a_failing_metrics_hook_breaks_nothing() -> None:
    # the champion's lane has one call in flight: a batch scored on the loop that kept its slot would hang the next
    model = _pure_model()
    rows = model.rows  # type: ignore[attr-defined]
    expected = model.score_each(rows[:5])
    seen: list[tuple[int, bool]] = []

    def on_batch(name: str, n: int, seconds: float, ok: bool) -> None:
        seen.append((n, ok))
        if len(seen) == 1:
            raise RuntimeError("metrics exporter down")

    lane = MicroBatcher(model, name="7/serve", max_batch=64, max_wait_s=0.002, in_flight=1, on_batch=on_batch).start()
    answers = [await asyncio.wait_for(lane.submit([row]), 5) for row in rows[:5]]
    await lane.close()
    assert [a.predictions[0] for a in answers] == expected.predictions
    assert seen == [(1, True)] * 5


@pytest.mark.anyio
async def test_a_wider_model_scores_fewer_rows_on_the_event_loop() -> None:
    # what runs on the loop is bounded by values read, not rows: breast cancer's 30 columns against the example's 10
    from sklearn.datasets import load_breast_cancer

    model, rows = _linear(load_breast_cancer(as_frame=True).frame, "target", "3", max_iter=2000)
    assert model.pure and model.compiled is not None and model.compiled.width == 30
    calls = _where(model)
    lane = MicroBatcher(model, name="3/serve", max_batch=64, max_wait_s=0.002).start()
    most = INLINE_MAX_VALUES // 30
    inline, threaded = await lane.submit(rows[:most]), await lane.submit(rows[:most + 1])
    await lane.close()
    assert inline.predictions == threaded.predictions[:most]
    assert [n for _, n in calls] == [most + 1]  # only the batch over the bound ran the model's own call
