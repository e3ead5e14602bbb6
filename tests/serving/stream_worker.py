"""A stream consumer in its own process, for the kill test: `python -m tests.serving.stream_worker ARGS`."""

from __future__ import annotations

import asyncio
import sys
import time

import pandas as pd

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from serving.stream import StreamConsumer
from tests.serving.conftest import FakeModel, make_policy


class SlowModel(FakeModel):
    """The champion, a little slow, so a kill lands mid-batch."""

    def predict_proba(self, frame: pd.DataFrame):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return super().predict_proba(frame)


def registry() -> InMemoryRegistry:
    reg = InMemoryRegistry()
    reg.set_alias("champion", reg.add(SlowModel(0.0)))
    reg.set_alias("challenger", reg.add(FakeModel(1.0)))
    return reg


def main(redis_url: str, store_url: str, input_stream: str, output_stream: str, consumer: str) -> None:
    consumer_ = StreamConsumer(make_policy(), redis_url, input_stream, output_stream, "rollout", consumer,
                               registry=registry(), store=OutcomeStore(store_url), count=20, claim_idle_ms=500)
    asyncio.run(consumer_.run())


if __name__ == "__main__":
    main(*sys.argv[1:6])
