"""Streaming rollouts: requests read from a Redis Stream, answers written to another, through the HTTP
service's own predict path (routing, micro-batching, challengers in child processes, logging), without HTTP.

- Each input message holds one field `body`: a /predict body as JSON (`{"record": ...}`, `{"records": [...],
  "unit_ids": [...]}`, or a bare list). Its request id is the message's stream id (`<ms>-<seq>`); a message of
  n > 1 records logs them as `<id>-0` .. `<id>-<n-1>`.
- A consumer group gives at-least-once delivery: a message is acknowledged (XACK) only after its answer is on
  the output stream and its served rows are written to the outcome store. A consumer killed mid-batch leaves
  its messages pending; when it (or another consumer of the group) starts again it claims them and answers
  them again, but a request whose rows are already logged is scored without logging: no prediction is
  lost, none is logged twice. (Shadow rows are written by the shadow lanes as in the service: a kill can
  lose the last moments of them, as it can in `rollout serve`.)
- Each output message: `request_id`, `answer` (JSON: the /predict answer, or `{"error": ...}` for a body the
  service would refuse with a 4xx; such a message is acknowledged, not retried).

Kafka is the production path for larger fleets: the same consumer shape (a consumer group, commit the offset
after logging), not built here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rollout.config import Policy
from rollout.outcomes import OutcomeStore
from serving.errors import RequestError
from serving.loading import ModelSource

log = logging.getLogger("rollout.serving.stream")


@dataclass
class StreamSummary:
    read: int = 0  # messages taken from the stream (new and reclaimed)
    answered: int = 0
    reclaimed: int = 0  # pending messages of a consumer that stopped, taken over
    relogged_skipped: int = 0  # requests answered again without logging (their rows were logged before)
    refused: int = 0  # bodies answered with an error


def request_ids(message_id: str, payload: Any) -> list[str]:
    """The request ids of a message: its stream id, or `<id>-<i>` for each of several records."""
    if isinstance(payload, dict) and "records" in payload and isinstance(payload["records"], list):
        n = len(payload["records"])
    elif isinstance(payload, list):
        n = len(payload)
    else:
        n = 1
    return [message_id] if n == 1 else [f"{message_id}-{i}" for i in range(n)]


class StreamConsumer:
    """One consumer of a group on a Redis Stream, answering with a `serving.app.Service` of the policy."""

    def __init__(self, policy: Policy, redis_url: str, input_stream: str, output_stream: str, group: str,
                 consumer: str, *, registry: ModelSource | None = None, store: OutcomeStore | None = None,
                 count: int = 200, block_ms: int = 1000, claim_idle_ms: int = 30_000,
                 on_batch: Callable[[StreamSummary], None] | None = None) -> None:
        self.policy = policy
        self.redis_url = redis_url
        self.input, self.output, self.group, self.consumer = input_stream, output_stream, group, consumer
        self.registry = registry
        self.store = store
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        self.on_batch = on_batch
        self.summary = StreamSummary()

    async def run(self, stop: asyncio.Event | None = None, max_messages: int | None = None) -> StreamSummary:
        """Consume until `stop` is set or `max_messages` were answered; then drain the service's logging."""
        import redis.asyncio as aioredis

        from serving.app import Service

        if self.registry is None:
            from rollout.registry import MlflowRegistry

            self.registry = MlflowRegistry.for_policy(self.policy, cached=True)
        store = self.store or OutcomeStore(self.policy.outcome_url)
        service = Service(self.policy, self.registry, store)
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        await service.start()
        try:
            await self._ensure_group(client)
            # first what this consumer had taken before it stopped, then what others left pending, then new messages
            backlog = await self._own_pending(client)
            while True:
                if stop is not None and stop.is_set():
                    break
                if max_messages is not None and self.summary.answered >= max_messages:
                    break
                messages = backlog or await self._claim(client) or await self._read(client)
                backlog = []
                if messages:
                    await self._handle(client, service, store, messages)
        finally:
            await service.stop()
            await client.aclose()
        return self.summary

    async def _ensure_group(self, client: Any) -> None:
        from redis.exceptions import ResponseError

        try:  # from the stream's start: messages written before the first consumer are answered too
            await client.xgroup_create(self.input, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _own_pending(self, client: Any) -> list[tuple[str, dict[str, str]]]:
        reply = await client.xreadgroup(self.group, self.consumer, {self.input: "0"}, count=self.count)
        messages = [(mid, fields) for _, entries in reply or [] for mid, fields in entries if fields]
        self.summary.reclaimed += len(messages)
        return messages

    async def _claim(self, client: Any) -> list[tuple[str, dict[str, str]]]:
        """Messages another consumer took and left unacknowledged for `claim_idle_ms` (it stopped)."""
        reply = await client.xautoclaim(self.input, self.group, self.consumer, self.claim_idle_ms, "0-0",
                                        count=self.count)
        messages = [(mid, fields) for mid, fields in reply[1] if fields]
        self.summary.reclaimed += len(messages)
        return messages

    async def _read(self, client: Any) -> list[tuple[str, dict[str, str]]]:
        reply = await client.xreadgroup(self.group, self.consumer, {self.input: ">"}, count=self.count,
                                        block=self.block_ms)
        return [(mid, fields) for _, entries in reply or [] for mid, fields in entries]

    async def _handle(self, client: Any, service: Any, store: OutcomeStore,
                      messages: list[tuple[str, dict[str, str]]]) -> None:
        self.summary.read += len(messages)
        parsed: list[tuple[str, Any, list[str]]] = []
        answers: dict[str, dict[str, Any]] = {}
        for mid, fields in messages:
            try:
                payload = json.loads(fields.get("body", ""))
            except ValueError as exc:
                answers[mid] = {"error": f"body: invalid JSON ({exc})"}
                continue
            if isinstance(payload, list):
                payload = {"records": payload}
            if isinstance(payload, dict):  # the ids are the stream's: a redelivery carries the same ones
                payload = {k: v for k, v in payload.items() if k not in ("request_id", "request_ids", "ts")}
                ids = request_ids(mid, payload)
                if "records" in payload:
                    payload["request_ids"] = ids
                else:
                    payload["request_id"] = ids[0]
            else:
                ids = [mid]
            parsed.append((mid, payload, ids))
        logged = await asyncio.to_thread(store.logged_requests, [r for _, _, ids in parsed for r in ids])
        started = time.perf_counter()

        async def one(mid: str, payload: Any, ids: list[str]) -> None:
            again = any(r in logged for r in ids)  # logged before a stop: answered again, not logged again
            try:
                out, single = await service.predictor.predict(payload, None, started, log=not again)
                answers[mid] = out[0] if single else {"predictions": out}
                self.summary.relogged_skipped += len(ids) if again else 0
            except RequestError as exc:
                if exc.status >= 500:
                    raise  # the champion failed or the log is full: not acknowledged, retried
                answers[mid] = {"error": exc.message}

        results = await asyncio.gather(*(one(*p) for p in parsed), return_exceptions=True)
        failed = {p[0] for p, r in zip(parsed, results, strict=True) if isinstance(r, BaseException)}
        for r in results:
            if isinstance(r, BaseException):
                log.warning("stream message not answered, left pending for a retry: %s", r)
        if not await service.writer.flush(timeout_s=30):
            log.warning("prediction log not written within 30 s: %d messages left pending", len(messages))
            return  # not acknowledged: redelivered, and logged then if they were not
        done = [mid for mid, _ in messages if mid not in failed and mid in answers]
        if done:
            await self._deliver(client, done, answers)
        self.summary.answered += len(done)
        self.summary.refused += sum(1 for mid in done if "error" in answers[mid])
        if self.on_batch is not None:
            self.on_batch(self.summary)

    async def _deliver(self, client: Any, done: list[str], answers: dict[str, dict[str, Any]]) -> None:
        """The answers on the output stream, then the acknowledgements (a stop in between redelivers them)."""
        async with client.pipeline(transaction=False) as pipe:
            for mid in done:
                pipe.xadd(self.output, {"request_id": mid, "answer": json.dumps(answers[mid])})
            await pipe.execute()
        await client.xack(self.input, self.group, *done)
