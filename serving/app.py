"""The prediction service: its lifecycle (start, refresh loop, drain on stop), health and gauges, and the app.

The parts: `loading` (models, lanes and routing as one snapshot), `predict` (the predict path), `admin`
(labels and routing), `http` (endpoints, token, errors, body bound), `fastpath` (POST /predict direct).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from rollout.config import Policy
from rollout.outcomes import OutcomeStore
from rollout.times import to_epoch
from serving import http
from serving.fastpath import App, FastPredict
from serving.loading import Lanes, Loader, ModelSource
from serving.logwriter import LogWriter
from serving.metrics import Metrics
from serving.predict import Predictor, ShadowSink

log = logging.getLogger("rollout.serving")

Clock = Callable[[], datetime | float]


def _wall_clock() -> datetime:
    return datetime.now(tz=UTC)


class Service:
    """What the endpoints share: the current snapshot of lanes, the predictor, the log writer, the metrics."""

    def __init__(self, policy: Policy, registry: ModelSource, store: OutcomeStore, clock: Clock | None = None,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.cfg = policy.serving
        self.store = store
        self.clock = clock or _wall_clock
        self.metrics = Metrics()
        self.writer = LogWriter(store, self.cfg.log_queue_size, self.cfg.log_batch_size)
        self.lanes = Lanes()  # swapped whole by refresh(); a request reads it once
        self.shadow_sink = ShadowSink(self.writer, self.metrics)
        self.loader = Loader(policy, registry, store, self.metrics.batch, self.shadow_sink)
        self.predictor = Predictor(policy, self.writer, self.metrics, lambda: self.lanes, self.now,
                                   rng or random.Random())
        self.dead_letters = 0
        self._refresh_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._register_gauges()

    def now(self) -> float:
        return to_epoch(self.clock())

    async def start(self) -> None:
        await asyncio.to_thread(self.store.create)
        self._refresh_lock = asyncio.Lock()
        self.writer.start()
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop(), name="refresh")

    async def stop(self) -> None:
        """Graceful shutdown: finish queued scoring (shadow included), then drain the log queue."""
        if self._refresher is not None:
            self._refresher.cancel()
        await self.loader.close(self.lanes)
        await self.writer.stop()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep serving whatever is loaded
                log.exception("refresh failed")

    async def refresh(self) -> None:
        """Poll aliases and the routing row, load moved versions, then swap the snapshot in one assignment."""
        assert self._refresh_lock is not None, "call start() first"
        async with self._refresh_lock:
            old = self.lanes
            self.lanes = await self.loader.load(old)
            self.loader.retire(old, self.lanes)
            try:  # rows the store refused, from this process and every other writer (shadow children, replicas)
                self.dead_letters = await asyncio.to_thread(self.store.dead_letters)
            except Exception as exc:  # noqa: BLE001 - the gauge keeps its last value
                log.warning("could not count dead-lettered rows: %s", exc)

    def health(self) -> tuple[int, dict[str, object]]:
        """503 until a champion is loaded; then 200, "degraded" with the reasons while something is wrong
        that callers do not see (they get the champion's answers)."""
        lanes = self.lanes
        view = lanes.view
        reasons = []
        if not self.loader.registry_ok:
            reasons.append("registry unreachable: serving the versions already loaded")
        for version, n in sorted(self.predictor.late_versions().items()):
            reasons.append(f"version {version} missed its deadline {n} times in 5 minutes (the champion answered)")
        if self.predictor.shedding_load:
            reasons.append(f"shedding load: /predict answers 503 until the prediction log queue is half empty "
                           f"({self.writer.depth} of {self.cfg.log_queue_size} rows)")
        elif self.writer.depth > 0.9 * self.cfg.log_queue_size:
            reasons.append(f"prediction log queue {self.writer.depth} of {self.cfg.log_queue_size} rows")
        status = "not ready" if view is None else ("degraded" if reasons else "ready")
        body: dict[str, object] = {
            "status": status,
            "reasons": reasons,
            "champion": view.champion.version if view else None,
            "loaded": sorted(lanes.models),
            "registry_reachable": self.loader.registry_ok,
            "mode": view.mode if view else None,
            "pid": os.getpid(),  # which worker process answered (`rollout serve --workers N`)
        }
        return (200 if view is not None else 503), body

    def _register_gauges(self) -> None:
        m = self.metrics
        w = self.writer
        m.gauge("rollout_log_queue_depth", "Prediction rows waiting to be written.", lambda: w.depth)
        m.gauge("rollout_log_rows_held", "Served rows of shadow requests waiting for their shadow's job, which logs "
                "them with its own.", lambda: w.held)
        m.gauge("rollout_log_dropped_total", "Prediction rows dropped because the log queue was full.", lambda: w.dropped)
        m.gauge("rollout_log_lost_total", "Prediction rows the store refused after every retry.", lambda: w.lost)
        m.gauge("rollout_log_written_total", "Prediction rows written to the outcome store.", lambda: w.written)
        m.gauge("rollout_log_dead_letters", "Rows the store refused, kept with the reason in its dead_letters table.",
                lambda: self.dead_letters)
        m.gauge("rollout_shadow_dropped_total", "Shadow rows skipped because the challenger queue was full.",
                lambda: self.shadow_sink.dropped)
        m.gauge("rollout_shedding_load", "1 while /predict refuses requests unread until the log queue is half empty.",
                lambda: 1.0 if self.predictor.shedding_load else 0.0)
        m.gauge("rollout_scoring_queue_depth", "Rows waiting in the micro-batchers (serve and shadow).",
                lambda: sum(lane.depth for lane in self.lanes.all()))
        m.gauge("rollout_reload_errors_total", "Failed registry polls or model loads.", lambda: self.loader.reload_errors)
        m.gauge("rollout_registry_reachable", "1 when the last registry poll was answered.",
                lambda: 1.0 if self.loader.registry_ok else 0.0)
        m.gauge("rollout_ready", "1 when a champion is loaded.", lambda: 1.0 if self.lanes.view else 0.0)

    def render_metrics(self) -> str:
        lines = [self.metrics.render().rstrip("\n")]
        lines.append("# HELP rollout_model_info Loaded versions by role (1 = answering or shadowing).")
        lines.append("# TYPE rollout_model_info gauge")
        view = self.lanes.view
        if view is not None:
            for arm in (*view.arms, *view.shadows):
                lines.append(f'rollout_model_info{{role="{arm.role}",version="{arm.version}",mode="{view.mode}"}} 1')
        return "\n".join(lines) + "\n"


def create_app(
    policy: Policy,
    registry: ModelSource | None = None,
    store: OutcomeStore | None = None,
    clock: Clock | None = None,
    *,
    rng: random.Random | None = None,
) -> FastAPI:
    """The service for a policy; registry, store, clock (datetime or epoch seconds) and rng are injectable."""
    if registry is None:
        from rollout.registry import MlflowRegistry

        registry = MlflowRegistry.for_policy(policy, cached=True)
    if store is None:
        store = OutcomeStore(policy.outcome_url)
    service = Service(policy, registry, store, clock, rng)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = App(title="rollout prediction service", lifespan=lifespan)
    app.state.service = service
    http.mount(app, service)
    app.fast_predict = FastPredict(service, http.body_limits(service.cfg)["/predict"])
    return app


WORKER_CONFIG = "ROLLOUT_SERVE_CONFIG"  # the policy file each worker process of `--workers N` loads


def run(policy: Policy, host: str | None = None, port: int | None = None, *, log_level: str = "info",
        workers: int = 1, config: str | None = None) -> None:
    """Serve the policy's model with uvicorn until interrupted; SIGINT/SIGTERM drain the log queue.

    With `workers` > 1, uvicorn runs that many processes on the one port, each with its own lanes, challenger
    children and log writer; they share the registry, the outcome store and so the routing table (each polls
    it every `serving.reload_interval_s`). Each loads the policy file `config` itself."""
    import uvicorn

    # MLflow's client retries an unreachable server for minutes by default; the service must start (from its
    # model cache) and answer health checks within seconds instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {"host": host or policy.serving.host, "port": policy.serving.port if port is None else port,
               "log_level": log_level, "access_log": False, "timeout_graceful_shutdown": 30}
    if workers > 1:
        if config is None:
            raise ValueError("workers > 1 needs the policy file's path: each worker process loads it")
        os.environ[WORKER_CONFIG] = str(Path(config).resolve())
        uvicorn.run("serving.app:worker_app", factory=True, workers=workers, **options)
        return
    uvicorn.run(create_app(policy), **options)


def worker_app() -> FastAPI:
    """The app of one worker process of `rollout serve --workers N` (uvicorn calls this in each)."""
    from rollout.config import load_policy

    return create_app(load_policy(os.environ[WORKER_CONFIG]))
