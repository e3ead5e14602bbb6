"""A challenger's failure is charged to the rows that fail, not to every request that shared their batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from rollout.models import LoadedModel
from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import FakeModel, app_for, make_policy, record, serve


class FailsOnSome(FakeModel):
    """Raises for any batch holding a poisoned input (income ending in .5): 5% of the traffic below."""

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if (frame["income"].to_numpy(dtype=float) % 1 == 0.5).any():
            raise ValueError("cannot score income ending in .5")
        return super().predict_proba(frame)


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = record(i)
        r["income"] = float(rng.integers(-3, 4)) + (0.5 if rng.random() < 0.05 else 0.0)
        out.append(r)
    return out


@pytest.mark.parametrize("batch", [8, 64, 512])
def test_only_the_failing_rows_carry_the_error(batch: int) -> None:
    records = _records(batch, seed=batch)
    bad = {i for i, r in enumerate(records) if r["income"] % 1 == 0.5}
    out = LoadedModel(FailsOnSome()).score_each(records, budget=10_000)
    assert {i for i, e in enumerate(out.errors) if e} == bad
    assert all(p is not None for i, p in enumerate(out.predictions) if i not in bad)


def test_the_default_budget_tells_apart_every_row_of_batches_with_5_percent_bad() -> None:
    # The batches a shadow lane forms (about 100 rows at concurrency 1): half the rows plus 16 extra calls left 5%
    # of them charging rows that did not fail, and the test below flaky.
    model = LoadedModel(FailsOnSome())
    charged = 0
    for seed in range(60):
        records = _records(128, seed=1000 + seed)
        bad = sum(r["income"] % 1 == 0.5 for r in records)
        charged += sum(1 for e in model.score_each(records).errors if e) - bad
    assert charged == 0


def test_a_model_failing_on_everything_costs_four_calls_not_a_search() -> None:
    class Always(FakeModel):
        def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
            self.calls.append(len(frame))
            raise RuntimeError("broken")

    model = Always()
    out = LoadedModel(model).score_each([record(i) for i in range(2048)])
    assert all(out.errors) and len(model.calls) == 1 + 3  # the batch, then three rows alone


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 64])
async def test_a_shadow_challenger_failing_on_5_percent_is_logged_near_5_percent_at_any_load(
        tmp_path, concurrency: int) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "s")
    registry = InMemoryRegistry()
    registry.set_alias("champion", registry.add(FakeModel()))
    registry.set_alias("challenger", registry.add(FailsOnSome()))
    records = _records(400, seed=concurrency)
    expected = sum(r["income"] % 1 == 0.5 for r in records)
    policy = make_policy(shadow_max_wait_ms=50.0, shadow_max_batch_size=512)
    async with serve(app_for(policy, registry, store)) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                assert (await client.post("/predict", json={"record": records[i]})).status_code == 200

        await asyncio.gather(*(one(i) for i in range(len(records))))
    traffic = store.evidence(rid).traffic["2"]
    # Not the whole batches they were in. Exactly the bad rows, but for the rare batch whose halving budget runs
    # out (or whose three probe rows all fail): its rows not yet told apart carry the error too, by design
    # (models.score_each). CI once saw 16 for 15 at concurrency 64.
    assert traffic.requests == 400 and expected <= traffic.errors <= expected + 4
