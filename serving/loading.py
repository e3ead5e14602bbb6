"""What the service has loaded: model versions, the lanes that score them and the routing view, as one snapshot.

`Loader.load` polls the registry's aliases and the open routing row, loads the versions that moved and
builds the next `Lanes`; the service swaps it in with one assignment, so a request sees the old snapshot
or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollout.config import Policy, ServingConfig
from rollout.models import LoadedModel, allowed_columns
from rollout.outcomes import OutcomeStore, Rollout
from rollout.roles import Role
from serving.batching import Calls, MicroBatcher, Sink
from serving.isolation import CHILD_NICE, PipedScorer, freeze_heap
from serving.routing import RoutingView, build_view

log = logging.getLogger("rollout.serving")


def shadow_queue_rows(cfg: ServingConfig) -> int:
    """Rows a shadow lane holds before it refuses more (logged unscored, "challenger cannot keep up"): a quarter of
    the log queue, or eight of its batches when that is more. A queued shadow job holds its request's served rows
    for the log (`LogWriter.hold`, counted against the log queue's room), so a challenger that falls behind takes at
    most a quarter of that room from the champion's traffic. Eight 512-row batches are four 1,000-row requests: a
    burst of them found the queue full, and 78% of shadow rows were refused under `benchmarks/log_load.py` (SQLite)
    against ~45% at ~30,000 rows, with 6% more rows answered."""
    return max(cfg.shadow_max_batch_size * 8, cfg.log_queue_size // 4)


class ModelSource(Protocol):
    """What the loader asks of a registry (rollout.registry.MlflowRegistry, or a fake in tests)."""

    def aliases(self) -> dict[str, str]: ...
    def load(self, version: str) -> Any: ...
    def has_version(self, version: str) -> bool: ...
    def cached_aliases(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Lanes:
    """An immutable snapshot of what serves: replaced as a whole by each refresh."""

    view: RoutingView | None = None  # None until a champion is loaded
    models: Mapping[str, LoadedModel] = field(default_factory=dict)
    serve: Mapping[str, MicroBatcher] = field(default_factory=dict)  # by version: the response path
    shadow: Mapping[str, MicroBatcher] = field(default_factory=dict)  # by version: off the response path
    allowed: set[str] | None = None  # columns some live model reads (None: a model without a contract)
    aliases: Mapping[str, str] = field(default_factory=dict)
    rollout: Rollout | None = None  # the open routing row

    def all(self) -> list[MicroBatcher]:
        return [*self.serve.values(), *self.shadow.values()]


class Loader:
    """Builds the next snapshot from the registry and the routing row, making and retiring lanes."""

    def __init__(
        self,
        policy: Policy,
        registry: ModelSource,
        store: OutcomeStore,
        on_batch: Callable[[str, int, float, bool], None],
        shadow_sink: Sink,
    ) -> None:
        self.cfg = policy.serving
        self.exposure = policy.rollout.exposure
        self.registry = registry
        self.store = store
        self.on_batch = on_batch
        self.shadow_sink = shadow_sink
        self.registry_ok = False
        self.reload_errors = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self.calls = Calls()  # the response-path lanes' calls in flight (serving.batching.Calls)

    async def load(self, old: Lanes) -> Lanes:
        """The next snapshot: moved versions loaded, lanes made for new versions, the old ones reused."""
        aliases, rollout = await self._poll(old)
        wanted = {v for a, v in aliases.items() if a == Role.CHAMPION}
        if rollout is not None:
            wanted |= {aliases.get(role, pinned) for role, pinned in rollout.versions.items()}
        models = {v: m for v, m in old.models.items() if v in wanted}
        loaded = False
        for version in sorted(wanted - set(models)):
            try:
                raw = await asyncio.to_thread(self.registry.load, version)
                models[version] = await asyncio.to_thread(LoadedModel, raw, version)
                loaded = True
                log.info("loaded model version %s", version)
            except Exception as exc:  # noqa: BLE001 - a bad version must not take the service down
                self.reload_errors += 1
                log.error("could not load version %s: %s", version, exc)

        effective = dict(aliases)
        if effective.get(Role.CHAMPION) not in models and old.view is not None:
            # The new champion failed to load: the one already loaded keeps answering.
            kept = old.view.champion.version
            effective[Role.CHAMPION] = kept
            models.setdefault(kept, old.models[kept])
        view = build_view(rollout, effective, set(models), self.exposure)
        if view is None:
            new = Lanes(None, models, {}, {}, allowed_columns(models.values()), aliases, rollout)
        else:
            serving = {a.version for a in view.arms}
            shadowing = {a.version for a in view.shadows}
            models = {v: m for v, m in models.items() if v in serving | shadowing}
            champion = view.champion.version
            # a lane is kept while its version keeps its kind: a promoted challenger gets a champion's lane
            serve = {v: lane if (lane := old.serve.get(v)) is not None and lane.name == self._serve_name(v, champion)
                     else self._lane(models[v], shadow=False, champion=v == champion) for v in serving}
            shadow = {v: old.shadow.get(v) or self._lane(models[v], shadow=True) for v in shadowing}
            # New lanes join once they can score: a challenger's child process takes a second or two to start,
            # and requests routed to it meanwhile would be logged as its timeouts.
            await asyncio.gather(*(lane.started() for lane in (*serve.values(), *shadow.values())
                                   if lane not in old.all()))
            new = Lanes(view, models, serve, shadow, allowed_columns(models.values()), aliases, rollout)
        if old.view is None or view is None or old.view.arms != view.arms or old.view.shadows != view.shadows:
            log.info("routing: %s", view.as_dict() if view else "no champion loaded")
        if loaded:
            freeze_heap()
        return new

    async def _poll(self, old: Lanes) -> tuple[Mapping[str, str], Rollout | None]:
        """Aliases and the open routing row; what `old` knew when either source is unreachable."""
        aliases = old.aliases
        try:
            aliases = await asyncio.to_thread(self.registry.aliases)
            self.registry_ok = True
        except Exception as exc:  # noqa: BLE001 - registry down: keep the loaded models
            self.registry_ok = False
            self.reload_errors += 1
            if not aliases:  # a start during the outage: the aliases the registry last answered, from the cache
                aliases = await asyncio.to_thread(self.registry.cached_aliases)
            log.warning("registry unreachable, keeping loaded models: %s", exc)
        rollout = old.rollout
        try:
            rollout = await asyncio.to_thread(self.store.current_rollout)
        except Exception as exc:  # noqa: BLE001 - store down: keep the cached routing
            log.warning("outcome store unreachable, keeping cached routing: %s", exc)
        return aliases, rollout

    def retire(self, old: Lanes, new: Lanes) -> None:
        """Close the lanes of `old` that `new` does not keep; jobs already queued there still finish."""
        retired = [lane for v, lane in old.serve.items() if new.serve.get(v) is not lane]
        retired += [lane for v, lane in old.shadow.items() if new.shadow.get(v) is not lane]
        for lane in retired:
            task = asyncio.get_running_loop().create_task(lane.close(timeout_s=self.cfg.shadow_timeout_s + 1))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def close(self, lanes: Lanes) -> None:
        """Finish the scoring queued on every lane of `lanes` and on those still retiring."""
        timeout_s = self.cfg.shadow_timeout_s + 1
        await asyncio.gather(*(lane.close(timeout_s=timeout_s) for lane in lanes.all()))
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout_s)

    def _child_scorer(self, model: LoadedModel, shadow: bool) -> PipedScorer | None:
        """A child process for a challenger (serving.shadow_isolation / challenger_isolation), or None: a thread.
        A shadow child also logs what it scores; a response-path one only answers, over a pipe the event loop
        reads (serving.isolation.PipedScorer), at the service's priority: callers wait on it."""
        if (self.cfg.shadow_isolation if shadow else self.cfg.challenger_isolation) != "process":
            return None
        try:
            return PipedScorer(model, CHILD_NICE, self.store.url) if shadow else PipedScorer(model)
        except Exception as exc:  # noqa: BLE001 - e.g. a model that cannot be pickled: threads still work
            log.warning("challenger %s scores in a thread, not a child process: %s", model.version, exc)
            return None

    @staticmethod
    def _serve_name(version: str, champion: str | None) -> str:
        return f"{version}/serve" if version == champion else f"{version}/challenger"

    def _lane(self, model: LoadedModel, shadow: bool, champion: bool = False) -> MicroBatcher:
        cfg = self.cfg
        if shadow:
            lane = MicroBatcher(
                model,
                name=f"{model.version}/shadow",
                max_batch=cfg.shadow_max_batch_size,
                max_wait_s=cfg.shadow_max_wait_ms / 1000.0,
                timeout_s=cfg.shadow_timeout_s,
                in_flight=1,
                eager=False,  # nobody waits on shadow rows: always gather, fewer and larger calls
                max_queue_rows=shadow_queue_rows(cfg),
                sink=self.shadow_sink,
                on_batch=self.on_batch,
                scorer=self._child_scorer(model, shadow=True),  # scores and logs in a child process
            )
        else:
            challenger = not champion
            scorer = self._child_scorer(model, shadow=False) if challenger else None
            lane = MicroBatcher(
                model,
                name=self._serve_name(model.version, model.version if champion else None),
                max_batch=cfg.max_batch_size,
                max_wait_s=cfg.max_wait_ms / 1000.0,
                # a hung call frees its slot at the deadline: a hung challenger's child is killed and replaced
                timeout_s=cfg.challenger_timeout_ms / 1000.0 if challenger else cfg.champion_timeout_s,
                # In this process's threads one call at a time: a second call beside it would only split the
                # batch, both holding one interpreter lock, each paying the pipeline's fixed cost (~2.5 ms for
                # the example's, at 1 row or 30): with one, the example's champion-only service answered 17%
                # more requests at 20% less CPU each (benchmarks/serving.py). A child process's lane keeps two:
                # the next batch is pickled and sent while the child scores the one before.
                in_flight=1 if scorer is None else 2,
                on_batch=self.on_batch,
                scorer=scorer,
                calls=self.calls,
            )
        return lane.start()

