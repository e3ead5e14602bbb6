"""Response-path lanes batch as one service: an arm's lane gathers while another arm's call runs (A/B batches
grow under load like the champion's alone), and a lone request on an idle service is scored at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout.models import Outputs
from serving.batching import Calls, MicroBatcher


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
