"""Shadow models score (and log) in a child process: off the service's GIL; a crash kills only the child.

In one process, a shadow batch (hundreds of rows through a scikit-learn pipeline, mostly Python and
pandas) holds the interpreter lock for milliseconds, and every caller in flight waits; a challenger that
segfaults, leaks or exhausts memory would take the champion's traffic down with it. A `PipedScorer` holds
one model version in a child process (multiprocessing "spawn": safe beside the server's threads) and is one
socket pair that the event loop itself writes and reads (framed pickles, non-blocking, buffered): no thread in
the service, so a hung child can only fill its own buffer until the lane's deadline kills it. A shadow lane's
child (given the store's URL) also writes the batch's log rows over its own connection, so the service's
process does almost nothing per shadow row; the lane pickles its batches a part at a time
(`pickled_part`, `submit_parts`), the event loop answering requests in between.
A child that dies is replaced on the next batch; one that hangs past the lane's timeout is killed.

A `ChildScorer` (a `ProcessPoolExecutor` of one process) is what batch scoring uses, from threads. On the event
loop it cost: a call crosses two of its threads in the service (its queue manager and its feeder), each of
which waits for the interpreter lock the busy loop holds, up to the 5 ms switch interval, for a call the
compiled pipeline answers in 0.1 ms; and its feeder pickled a 2,048-row shadow batch in one go, ~4 ms with
the lock held, which doubled the callers' p99 in shadow mode.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from rollout.models import LoadedModel
from serving.logwriter import ShadowMeta, served_rows, shadow_rows

log = logging.getLogger(__name__)

# The child yields the CPU to the service when both want it: callers wait on the service, nobody waits
# on a shadow batch. Its work is small (~15 us a request with the example model), so even a tenth of a
# busy core keeps up; when it does not, its bounded queue drops shadow rows (counted), never requests.
CHILD_NICE = 10

_MODEL: LoadedModel | None = None  # in the child: the one version it scores
_STORE: Any = None  # in the child: its own connection to the outcome store, to log what it scored


ORPHAN_CHECK_S = 0.5  # how often a child looks whether the service that started it is still alive


def _load(payload: bytes, store_url: str | None, nice: int = CHILD_NICE) -> None:
    global _MODEL, _STORE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then shuts the child down
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="orphan-watch", daemon=True).start()
    if hasattr(os, "nice") and nice:  # POSIX
        os.nice(nice)
    _MODEL = pickle.loads(payload)
    if store_url:
        from rollout.outcomes import OutcomeStore

        _STORE = OutcomeStore(store_url)
        try:  # connect and check the schema now: the first batch's deadline is for scoring and its write
            _STORE.create()
        except Exception:  # noqa: BLE001 - the first write tries again, and the service logs what it cannot
            log.warning("shadow model: the outcome store could not be opened at start; the first write retries",
                        exc_info=True)
    freeze_heap()


def _exit_with_parent(parent: int) -> None:
    """End this child when the service that started it is gone (killed with -9, it could not say so)."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


def _ready() -> bool:
    return _MODEL is not None


def _score(rows: list[dict[str, Any]], metas: list[ShadowMeta] | None) -> tuple[Any, Any, Any, bool, float]:
    """Score a batch; with its jobs' metadata, write its log rows too. Returns (preds, scores, errors, logged,
    the model's own call time in ms): when the write fails, `logged` is False and the service's log writer
    (with its retries) takes the rows. The call time leaves out the trip to the child and back, so a
    challenger's logged latency compares with the champion's, which scores in the service."""
    assert _MODEL is not None, "child started without a model"
    started = time.perf_counter()
    out = _MODEL.score_each(rows)
    preds, scores, errors = out.predictions, out.scores, out.errors
    latency_ms = (time.perf_counter() - started) * 1000.0
    if metas is None or _STORE is None:
        return preds, scores, errors, False, latency_ms
    try:  # with the requests' served rows: one call, so the paired PostgreSQL log stores each pair as one row
        _STORE.log_predictions([*served_rows(metas), *shadow_rows(metas, preds, scores, errors, latency_ms, None)])
    except Exception:  # noqa: BLE001 - the service logs them instead
        log.exception("shadow model %s: could not log %d rows from the child process", _MODEL.version, len(rows))
        return preds, scores, errors, False, latency_ms
    return preds, scores, errors, True, latency_ms


class ChildScorer:
    """One model version scored in a child process; `submit` returns a concurrent Future of `score(rows)`.

    `ready` resolves once the child holds the model (its imports take a second or two); the batcher
    waits on it before a call, so a starting child never counts against a call's timeout.
    """

    def __init__(self, model: LoadedModel, store_url: str | None = None, nice: int = CHILD_NICE) -> None:
        self.version = model.version
        self._nice = nice
        self._payload = pickle.dumps(model)  # raises for a model that cannot be pickled: the caller falls back
        self._store_url = store_url
        self._context = multiprocessing.get_context("spawn")
        self.restarts = 0
        self._pool, self.ready = self._start()

    def _start(self) -> tuple[ProcessPoolExecutor, Future[Any]]:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=self._context, initializer=_load,
                                   initargs=(self._payload, self._store_url, self._nice))
        return pool, pool.submit(_ready)  # starts the child now, not on the first batch

    def submit(self, rows: list[dict[str, Any]], metas: list[ShadowMeta] | None = None) -> Future[Any]:
        """Score `rows` in the child (and log them, given their jobs' metadata); never raises: a failure is
        the future's exception."""
        try:
            return self._pool.submit(_score, rows, metas)
        except BrokenProcessPool:
            if not self._started():  # it never held the model: a new child would fail the same way
                return _failed(RuntimeError(f"the model could not start in a child process: {self.ready.exception()}"))
            log.error("challenger %s: child process died; starting a new one", self.version)
            self._replace()  # a crash or OOM kill mid-life: a new child takes this batch
            return self._pool.submit(_score, rows, metas)
        except RuntimeError as exc:  # shut down
            return _failed(exc)

    def _started(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def restart(self) -> None:
        """Kill the child (hung past the timeout) and start a new one; its pending calls fail."""
        log.error("challenger %s: child process hung; killing it", self.version)
        self._replace()

    def revive(self) -> None:
        """After a call found the child dead: start a new one now (once, however many calls found it)."""
        if self._started() and self._pool_broken():
            log.error("challenger %s: child process died; starting a new one", self.version)
            self._replace()

    def _pool_broken(self) -> bool:
        try:
            self._pool.submit(_ready).cancel()
        except BrokenProcessPool:
            return True
        except RuntimeError:  # shut down
            return False
        return False

    def _replace(self) -> None:
        old = self._pool
        self._pool, self.ready = self._start()
        self.restarts += 1
        _stop(old, kill=True)

    def close(self) -> None:
        _stop(self._pool, kill=False)


_HEADER = 8  # bytes of a frame's length, big-endian


def _piped_main(sock: socket.socket, payload: bytes, nice: int, store_url: str | None = None) -> None:
    """A PipedScorer's child: load the model, say so, then answer each framed batch of rows in order (a shadow's
    child, given the store, also logs them)."""
    try:
        _load(payload, store_url, nice)
        sock.sendall(_frame(pickle.dumps((True, None), protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException as exc:  # noqa: BLE001 - the service hears why, then the child ends
        sock.sendall(_frame(pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}"[:500])))))
        return
    while True:
        frame = _recv_frame(sock)
        if frame is None:  # the service closed its end
            return
        try:
            answer: tuple[bool, Any] = (True, _score(*_unpacked(frame)))
        except Exception as exc:  # noqa: BLE001 - a failing model is the call's error, not the child's end
            answer = (False, exc)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - e.g. an exception that cannot be pickled
            data = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}"[:500])))
        sock.sendall(_frame(data))


def _unpacked(frame: bytes) -> tuple[list[dict[str, Any]], list[ShadowMeta] | None]:
    """A batch's rows and (for a shadow) their jobs' metadata, from a frame of `(rows, metas)` parts pickled apart
    (`PipedScorer.submit_parts`)."""
    rows: list[dict[str, Any]] = []
    metas: list[ShadowMeta] = []
    for part in pickle.loads(frame):
        part_rows, part_metas = pickle.loads(part)
        rows += part_rows
        metas += part_metas or []
    return rows, metas or None


def pickled_part(rows: list[dict[str, Any]], metas: list[ShadowMeta] | None = None) -> bytes:
    """One part of a batch for `PipedScorer.submit_parts`."""
    return pickle.dumps((rows, metas), protocol=pickle.HIGHEST_PROTOCOL)


def _frame(data: bytes) -> bytes:
    """`data` framed as both ends read it: its length first."""
    return len(data).to_bytes(_HEADER, "big") + data


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, _HEADER)
    return None if header is None else _recv_exact(sock, int.from_bytes(header, "big"))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class PipedScorer:
    """One model version scored in a child process for a lane of the service (a response-path challenger, or a
    shadow, whose child also logs given `store_url`): the same interface as ChildScorer (`ready`, `submit`,
    `restart`, `revive`, `close`), created in the event loop and used only from it. Answers come back in the order
    the batches were sent."""

    def __init__(self, model: LoadedModel, nice: int = 0, store_url: str | None = None) -> None:
        self.version = model.version
        self._nice = nice
        self._store_url = store_url  # a shadow's child logs what it scores
        self._payload = pickle.dumps(model)  # raises for a model that cannot be pickled: the caller falls back
        self._context = multiprocessing.get_context("spawn")
        self._loop = asyncio.get_running_loop()
        self.restarts = 0
        self._closed = False
        self._start()

    def _start(self) -> None:
        mine, theirs = socket.socketpair()
        self._process = self._context.Process(
            target=_piped_main, args=(theirs, self._payload, self._nice, self._store_url),
            name=f"challenger-{self.version}", daemon=True)
        self._process.start()
        theirs.close()
        mine.setblocking(False)
        self._sock = mine
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._broken = False
        # asyncio futures, resolved by the loop that awaits them: a concurrent Future would hand each answer
        # back through call_soon_threadsafe, a write to the loop's self-pipe a call
        self.ready: asyncio.Future[Any] = self._loop.create_future()
        self._waiting: deque[asyncio.Future[Any]] = deque([self.ready])  # in the order the child answers
        self._loop.add_reader(mine.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(self, rows: list[dict[str, Any]],
               metas: list[ShadowMeta] | None = None) -> asyncio.Future[Any] | Future[Any]:
        """Send `rows` to the child (with their jobs' metadata: a shadow's child logs them too); the future gets
        (preds, scores, errors, logged, call ms) or the call's error. Never raises; never blocks: what the child has
        not read yet waits in a buffer."""
        return self.submit_parts([pickled_part(rows, metas)])

    def submit_parts(self, parts: list[bytes]) -> asyncio.Future[Any] | Future[Any]:
        """As `submit`, for a batch pickled in parts (`pickled_part`): a shadow lane pickles a batch of thousands of
        rows a few jobs at a time, letting requests through in between, where one pickle held the event loop (or,
        in a ProcessPoolExecutor's feeder thread, the interpreter lock) for milliseconds."""
        if self._closed:
            return _failed(RuntimeError("cannot schedule new futures after shutdown"))
        if self._broken:
            if not self._started():  # it never held the model: a new child would fail the same way
                return _failed(RuntimeError(f"the model could not start in a child process: {self._why()}"))
            log.error("challenger %s: child process died; starting a new one", self.version)
            self._replace()  # a crash or OOM kill mid-life: a new child takes this batch
        future: asyncio.Future[Any] = self._loop.create_future()
        data = pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)
        self._waiting.append(future)
        self._write(_frame(data))
        return future

    def _started(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def _why(self) -> str:
        exc = self.ready.exception() if self.ready.done() and not self.ready.cancelled() else None
        return str(exc) if exc is not None else "it ended before it held the model"

    def _write(self, frame: bytes) -> None:
        if self._broken:
            return
        if not self._outbox:
            try:
                sent = self._sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._fail_all("child process died")
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
            self._loop.add_writer(self._sock.fileno(), self._writable)
        self._outbox += frame

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError:
            self._fail_all("child process died")
            return
        del self._outbox[:sent]
        if not self._outbox:
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        try:
            chunk = self._sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._fail_all("child process died")
            return
        inbox = self._inbox
        inbox += chunk
        while len(inbox) >= _HEADER:
            n = int.from_bytes(inbox[:_HEADER], "big")
            if len(inbox) < _HEADER + n:
                break
            ok, value = pickle.loads(inbox[_HEADER:_HEADER + n])
            del inbox[:_HEADER + n]
            future = self._waiting.popleft() if self._waiting else None
            if future is None or future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                self._reject(future, value)

    def _reject(self, future: asyncio.Future[Any], exc: BaseException) -> None:
        future.set_exception(exc)
        if future is self.ready:
            future.exception()  # read by whoever asks (_started, the lane); never "never retrieved"

    def _fail_all(self, reason: str) -> None:
        """The child is gone (or being killed): every call still waiting on it fails, as a broken pool's would."""
        if self._broken:
            return
        self._broken = True
        self._detach()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                self._reject(future, BrokenProcessPool(reason) if future is not self.ready else RuntimeError(reason))

    def _detach(self) -> None:
        fd = self._sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._sock.close()
        self._outbox.clear()

    def restart(self) -> None:
        """Kill the child (hung past the timeout) and start a new one; its pending calls fail."""
        log.error("challenger %s: child process hung; killing it", self.version)
        self._replace()

    def revive(self) -> None:
        """After a call found the child dead: start a new one now (once, however many calls found it)."""
        if self._broken and self._started() and not self._closed:
            log.error("challenger %s: child process died; starting a new one", self.version)
            self._replace()

    def _replace(self) -> None:
        old = self._process
        self._fail_all("child process restarted")
        old.kill()
        old.join(timeout=0)  # reaped now if it is already gone, else by multiprocessing's next start
        self.restarts += 1
        self._start()

    def close(self) -> None:
        """End the child: closing the socket is its signal to exit; one that does not is killed."""
        if self._closed:
            return
        self._closed = True
        process = self._process
        self._fail_all("service shutting down")
        self._loop.call_later(1.0, _kill_if_alive, process)


def _kill_if_alive(process: Any) -> None:
    if process.is_alive():
        process.kill()
    process.join(timeout=0)


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def _stop(pool: ProcessPoolExecutor, kill: bool) -> None:
    # ProcessPoolExecutor has no public way to kill a hung worker; its process table is the only handle.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if kill:
            process.kill()
        elif process.is_alive():
            process.terminate()  # the lane already waited for its calls: nothing useful is lost


def freeze_heap() -> None:
    """Take what is alive now (libraries, loaded models) out of the cyclic garbage collector's walks.

    A full collection walks every tracked object (about 235k once MLflow, scikit-learn and pandas are
    imported: 50-100 ms with every request stalled), and rows waiting in a shadow batch or the log queue
    make full collections frequent under load. Called after each model load, in the service and in each
    shadow child; gc.freeze() is O(1). Only reference cycles of a retired model stay uncollected.
    """
    gc.freeze()
