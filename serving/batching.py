"""Adaptive micro-batching: concurrent requests for one model are scored in one call, in a thread.

A scikit-learn pipeline costs about the same for 1 row as for 100, so requests arriving within
`max_wait` of the first are gathered (up to `max_batch` rows) and scored together. While a batch
is being scored, new requests keep gathering, so under load batches grow by themselves. An eager
lane (the response path) does not wait when its model is idle: a lone request is scored at once,
so batching adds no latency at low load. Shadow lanes always gather (fewer, larger calls). Each
batcher owns its threads: a hanging model can only ever block its own lane, and the slot of a
hung call is freed only when its thread really returns, so hung calls cannot pile up.

A model whose whole call is this package's own numpy code (`LoadedModel.pure`: no model code runs, so it cannot
hang or crash) has its small response-path batches scored on the event loop instead (INLINE_MAX_VALUES): the
hand-off to a thread, or to a challenger's child process, cost the service more than the call itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from rollout.models import LoadedModel, ModelError, Outputs
from rollout.outcomes.schema import UNSCORED_PREFIX
from serving.isolation import pickled_part

log = logging.getLogger(__name__)


CHILD_START_S = 60.0  # longest a new or closing lane waits for its child process to start
# A response-path batch of a `LoadedModel.pure` model (a compiled pipeline with a plain linear final step: this
# package's own numpy code, no model code) is scored on the event loop itself, without the hand-off to the lane's
# thread (or child), up to these many values (rows x the columns the model reads; the example's 10 columns: 24
# and 64 rows, ~0.05-0.15 ms on the loop). A wider model gets fewer rows: its time on the loop stays as bounded.
# Measured side by side (wrk, the example's model, docs/architecture.md): champion-only 1.18x req/s at
# concurrency 1 and 1.47x at 8 with p99 0.60x; A/B over champion-only at 32 0.89x, was 0.73x. Larger batches stay
# in the thread: scored on the loop, champion-only's ~30-row batches at concurrency 32 read the same throughput at
# 1.2x the p99. A challenger's child costs more a call (two pickles, two process wake-ups): more values here.
INLINE_MAX_VALUES = 240
INLINE_MAX_VALUES_CHILD = 640
# Loop passes an inline-scored lane lets go by before taking its batch, so the requests read in this pass join
# it: taken at once, batches at concurrency 4 were ~2 rows against ~4 in a thread, and p99 doubled.
INLINE_GATHER_PASSES = 2
PART_JOBS = 64  # jobs pickled at a time for a shadow child (`MicroBatcher._pickled`): ~0.1 ms of single-row requests


@dataclass(frozen=True, slots=True)
class Scored:
    """The outcome of one job: per-row predictions, scores and errors, and the model call time."""

    predictions: list[float | None]
    scores: list[Any] | None  # P(1) per row, or (multiclass) each row's class probabilities
    errors: list[str | None]
    latency_ms: float
    batch_rows: int
    logged: bool = False  # a shadow child process already wrote the batch's log rows


@dataclass(slots=True)
class Job:
    rows: list[dict[str, Any]]
    future: asyncio.Future[Scored] | None = None
    meta: Any = None
    enqueued: float = field(default_factory=time.perf_counter)


# A sink receives jobs submitted without a future (shadow traffic), a whole batch at a time: the jobs,
# the outcome of their rows in job order (or None) and the error text of a failed call (or None).
Sink = Callable[[list[Job], Scored | None, str | None], None]


class Calls:
    """Model calls in flight across the response-path lanes of one service: an eager lane scores at once only
    when the whole service is idle, so in A/B each arm gathers while the other arm's call runs, and its batches
    grow under load as the champion's do alone; it scores when that call ends (the rows the call answers are what
    would come next) or at `max_wait_ms`, whichever is first."""

    __slots__ = ("n", "behind")

    def __init__(self) -> None:
        self.n = 0
        self.behind: set[asyncio.Event] = set()  # lanes gathering only because another arm's call is in flight

    def done(self) -> None:
        """A call ended: when none is left, the lanes that gathered behind another arm's call score now."""
        self.n -= 1
        if not self.n and self.behind:
            for woken in self.behind:
                woken.set()
            self.behind.clear()


class MicroBatcher:
    """Gathers jobs for one model version and lane, scores them in batches off the event loop."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        name: str,
        max_batch: int,
        max_wait_s: float,
        timeout_s: float | None = None,
        in_flight: int = 2,
        eager: bool = True,
        max_queue_rows: int | None = None,
        sink: Sink | None = None,
        on_batch: Callable[[str, int, float, bool], None] | None = None,
        scorer: Any = None,
        calls: Calls | None = None,
    ) -> None:
        self.model = model
        self.calls = calls if calls is not None else Calls()  # shared by the service's response-path lanes
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.eager = eager  # score at once when no call is in flight (else always gather up to max_wait)
        self.timeout_s = timeout_s
        self.max_queue_rows = max_queue_rows
        self.sink = sink
        self.on_batch = on_batch
        self.scorer = scorer  # a serving.isolation.PipedScorer: score in its child process, not in a thread
        self._in_flight = in_flight
        self._pending: deque[Job] = deque()
        self._pending_rows = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._executor = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix=f"score-{name}")
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        self._busy = 0  # model calls in flight
        # the most rows of a batch scored on the event loop: a response-path lane of a model this package scores
        # itself (no model code), else none
        self._inline_rows = 0
        if eager and getattr(model, "pure", False):
            width = max(model.compiled.width, 1)  # type: ignore[union-attr]  # pure: compiled
            self._inline_rows = (INLINE_MAX_VALUES if scorer is None else INLINE_MAX_VALUES_CHILD) // width
        self.dropped = 0

    @property
    def depth(self) -> int:
        """Rows waiting to be scored."""
        return self._pending_rows

    def start(self) -> MicroBatcher:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        return self

    def submit(self, rows: list[dict[str, Any]]) -> asyncio.Future[Scored]:
        """Queue rows for scoring; the future gets their outcome (or ModelCallFailed)."""
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        self._enqueue(Job(rows, future))
        return future

    def offer(self, rows: list[dict[str, Any]], meta: Any) -> None:
        """Queue rows nobody waits on: the sink gets their outcome, or at once their refusal when the queue is full."""
        job = Job(rows, None, meta)
        if self.max_queue_rows is not None and self._pending_rows + len(rows) > self.max_queue_rows:
            self.dropped += len(rows)
            self._sink([job], None, f"{UNSCORED_PREFIX}challenger cannot keep up")  # not the challenger's error
            return
        self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        if self._closing:
            raise RuntimeError(f"batcher {self.name} is closed")
        rows = job.rows
        self._pending.append(job)
        self._pending_rows += len(rows)
        self._wake.set()
        if self._pending_rows >= self.max_batch:
            self._full.set()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs, score what is queued, wait for in-flight calls (at most `timeout_s`).

        A shadow child process still starting gets up to CHILD_START_S first: starting is not hanging,
        and the rows it will score are already queued. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._wake.set()
        self._full.set()
        await self._child_started(CHILD_START_S)
        runner = self._runner
        if runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(runner), timeout_s)
                if self._tasks:
                    _, late = await asyncio.wait(list(self._tasks), timeout=timeout_s)
                    if late:
                        raise TimeoutError
            except TimeoutError:
                log.warning("batcher %s: gave up waiting on in-flight calls at shutdown", self.name)
                runner.cancel()
                for task in list(self._tasks):
                    task.cancel()  # each logs its rows as "shutting down" errors
                if self._tasks:
                    await asyncio.wait(list(self._tasks), timeout=1.0)
        self._fail_pending("service shutting down")
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.scorer is not None:
            self.scorer.close()

    async def started(self) -> None:
        """Wait (at most CHILD_START_S) until the lane can score: its child process, if any, holds the model."""
        await self._child_started(CHILD_START_S)

    async def _child_started(self, timeout_s: float | None = None) -> None:
        """Wait while the shadow child process is still starting (its start is not a call's time)."""
        if self.scorer is not None and not self.scorer.ready.done():
            await asyncio.wait([asyncio.wrap_future(self.scorer.ready)], timeout=timeout_s)

    def _fail_pending(self, reason: str) -> None:
        jobs = list(self._pending)
        self._pending.clear()
        self._pending_rows = 0
        self._deliver_all(jobs, None, reason)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if (
                (self._busy or self.calls.n or not self.eager)
                and self._pending_rows < self.max_batch
                and self.max_wait_s > 0
                and not self._closing
            ):
                # Gather until the batch is full or the first request has waited max_wait. An eager
                # lane (the response path) scores at once when its model is idle: waiting would only
                # add latency there; under load its calls are in flight and batches grow anyway.
                remaining = self._pending[0].enqueued + self.max_wait_s - time.perf_counter()
                if remaining > 0:
                    self._full.clear()
                    behind = self.eager and not self._busy  # only another arm's call: stop when none is left
                    if behind:
                        self.calls.behind.add(self._full)
                    try:
                        await asyncio.wait_for(self._full.wait(), remaining)
                    except TimeoutError:
                        pass
                    if behind:
                        self.calls.behind.discard(self._full)
            await self._child_started()  # meanwhile rows keep gathering (bounded by max_queue_rows)
            await self._slots.acquire()
            if self._pending_rows <= self._inline_rows:
                for _ in range(INLINE_GATHER_PASSES):
                    await asyncio.sleep(0)
            jobs = self._take()
            if not jobs:
                self._slots.release()
                continue
            n = sum(len(job.rows) for job in jobs)
            started = time.perf_counter()
            if n <= self._inline_rows and self._scored_here(jobs, started, n):
                self._slots.release()
                continue
            self._busy += 1
            self.calls.n += 1
            if self.scorer is not None and all(job.future is None for job in jobs):  # a shadow's child also logs
                call = asyncio.wrap_future(self.scorer.submit_parts(await self._pickled(jobs)), loop=loop)
            else:
                rows = [row for job in jobs for row in job.rows]
                call = (asyncio.wrap_future(self.scorer.submit(rows), loop=loop) if self.scorer is not None
                        else loop.run_in_executor(self._executor, _timed, self.model.score_each, rows))
            call.add_done_callback(self._call_done)
            task = loop.create_task(self._finish(jobs, call, started, n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pickled(jobs: list[Job]) -> list[bytes]:
        """A shadow batch pickled for its child a part at a time, the event loop free between parts: one pickle of
        2,048 rows with their metadata held it for ~4 ms, the callers' p99 doubled (`benchmarks/serving.py`)."""
        parts: list[bytes] = []
        for k in range(0, len(jobs), PART_JOBS):
            part = jobs[k:k + PART_JOBS]
            parts.append(pickled_part([row for job in part for row in job.rows], [job.meta for job in part]))
            if k + PART_JOBS < len(jobs):
                await asyncio.sleep(0)
        return parts

    def _call_done(self, _call: asyncio.Future[Any]) -> None:
        self._busy -= 1
        self.calls.done()
        self._slots.release()

    def _take(self) -> list[Job]:
        """The next batch's jobs; a job whose caller stopped waiting (its deadline passed) is dropped unscored."""
        jobs: list[Job] = []
        rows = 0
        while self._pending and (not jobs or rows + len(self._pending[0].rows) <= self.max_batch):
            job = self._pending.popleft()
            self._pending_rows -= len(job.rows)
            if job.future is not None and job.future.cancelled():
                continue
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    async def _finish(self, jobs: list[Job], call: asyncio.Future[Any], started: float, n: int) -> None:
        try:
            await self._settle(jobs, call, started, n)
        except asyncio.CancelledError:
            # shutdown gave up on this call: its rows are still accounted for
            self._deliver_all(jobs, None, "service shutting down before the model answered")
            raise

    async def _settle(self, jobs: list[Job], call: asyncio.Future[Any], started: float, n: int) -> None:
        try:
            if self.timeout_s is not None:
                answer = await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
            else:
                answer = await call
            # (predictions, scores, errors, logged, the call's own time): in a child process, or a thread (`_timed`)
            preds, scores, errors, logged, call_ms = answer
        except TimeoutError:
            call.add_done_callback(_swallow)
            if self.scorer is not None:  # a hung child is killed: its slot frees and a new child takes over
                self.scorer.restart()
            self._report(n, started, False)
            self._deliver_all(jobs, None, f"timeout: no answer within {self.timeout_s:g} s")
            return
        except Exception as exc:  # noqa: BLE001 - a failing model is data, not a crash
            if self.scorer is not None and isinstance(exc, BrokenProcessPool):
                self.scorer.revive()  # the next batch waits for a new child to start, outside its deadline
            self._report(n, started, False)
            self._deliver_all(jobs, None, (str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}")[:500])
            return
        self._report(n, started, True)
        self._scored(jobs, preds, scores, errors, call_ms, n, logged)

    def _scored(self, jobs: list[Job], preds: list[float | None], scores: list[Any] | None,
                errors: list[str | None], latency_ms: float, n: int, logged: bool) -> None:
        """A batch's outcome to its jobs: each future its rows' part, or the sink the whole batch."""
        if all(job.future is None for job in jobs):  # shadow lane: the sink takes the batch as it is
            self._sink(jobs, Scored(preds, scores, errors, latency_ms, n, logged), None)
            return
        offset = 0
        for job in jobs:
            k = len(job.rows)
            part = Scored(
                preds[offset : offset + k],
                scores[offset : offset + k] if scores is not None else None,
                errors[offset : offset + k],
                latency_ms,
                n,
            )
            offset += k
            self._deliver(job, part, None)

    def _scored_here(self, jobs: list[Job], started: float, n: int) -> bool:
        """Score a small batch of a pure model on the event loop (no model code runs); False when it is not done
        here (the compiled path refuses a record, or anything fails) and the batch goes to the thread or child."""
        try:
            answer = self.model.score_pure([row for job in jobs for row in job.rows])
            if answer is None:
                return False
            call_ms = (time.perf_counter() - started) * 1000.0
        except Exception:  # noqa: BLE001 - never the lane's runner: the model's own call decides
            log.exception("batcher %s: scoring on the event loop failed; the batch goes to the model's call", self.name)
            return False
        self._report(n, started, True)
        self._scored(jobs, answer.predictions, answer.scores, answer.errors, call_ms, n, False)
        return True

    def _report(self, n: int, started: float, ok: bool) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(self.name, n, time.perf_counter() - started, ok)
            except Exception:  # noqa: BLE001 - metrics must never break scoring
                log.exception("batcher %s: on_batch failed", self.name)

    def _deliver(self, job: Job, scored: Scored | None, error: str | None) -> None:
        if job.future is not None:
            if not job.future.done():
                if scored is not None:
                    job.future.set_result(scored)
                else:
                    job.future.set_exception(ModelCallFailed(error or "model call failed"))
        else:
            self._sink([job], scored, error)

    def _deliver_all(self, jobs: list[Job], scored: None, error: str) -> None:
        """A failed batch: futures get the error, sink jobs go to the sink in one call."""
        sink_jobs = []
        for job in jobs:
            if job.future is None:
                sink_jobs.append(job)
            else:
                self._deliver(job, scored, error)
        if sink_jobs:
            self._sink(sink_jobs, scored, error)

    def _sink(self, jobs: list[Job], scored: Scored | None, error: str | None) -> None:
        if self.sink is None:
            return
        try:
            self.sink(jobs, scored, error)
        except Exception:  # noqa: BLE001 - logging must never break scoring
            log.exception("batcher %s: sink failed", self.name)


class ModelCallFailed(RuntimeError):
    """The model raised, returned garbage or timed out for this batch."""


def _timed(score: Callable[[list[dict[str, Any]]], Outputs], rows: list[dict[str, Any]]) -> tuple[Any, ...]:
    """A call in the lane's thread, in the form a child process answers: its outputs and its own time, without the
    wait for the thread and the hand-offs (an arm's latency is compared with the other's: `latency_ms`)."""
    started = time.perf_counter()
    out = score(rows)
    return out.predictions, out.scores, out.errors, False, (time.perf_counter() - started) * 1000.0


def _swallow(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
