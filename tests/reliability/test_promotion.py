"""Promotions that always finish: an outage at any step of a plan leaves a state the next run repairs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from rollout.cd import plans
from rollout.cd.decision import Decision
from rollout.cd.evaluation import act_once, rollback
from rollout.outcomes.memory import InMemoryStore
from rollout.registry import InMemoryRegistry

T0 = datetime(2026, 3, 1, tzinfo=UTC)
REGISTRY_WRITES = {"set_alias", "remove_alias", "mirror_stage", "set_tags"}
STORE_WRITES = {"save_plan", "plan_progress", "finish_plan", "end_rollout", "set_weights", "reopen_rollout"}


class Outage:
    """Counts the writes made through the wrapped objects and fails the k-th with a ConnectionError."""

    def __init__(self, k: int) -> None:
        self.k, self.calls = k, 0

    def wrap(self, target: Any, writes: set[str]) -> Any:
        outage = self

        class Wrapped:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(target, name)
                if name not in writes:
                    return attr

                def call(*args: Any, **kwargs: Any) -> Any:
                    outage.calls += 1
                    if outage.calls == outage.k:
                        raise ConnectionError(f"outage at write {outage.k} ({name})")
                    return attr(*args, **kwargs)

                return call

        return Wrapped()


def _world() -> tuple[InMemoryRegistry, InMemoryStore, int]:
    registry = InMemoryRegistry()
    for _ in range(3):
        registry.add(object())
    registry.set_alias("champion", "1")
    registry.set_alias("challenger", "2")
    registry.mirror_stage("1", "Production")
    store = InMemoryStore(clock=lambda: T0)
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    return registry, store, rid


PROMOTE = Decision("promote", "2", ["better"], {"2": {"estimate": 0.05}})


def _state(registry: InMemoryRegistry, store: InMemoryStore, rid: int) -> tuple[Any, ...]:
    rollout = store.rollout(rid)
    assert rollout is not None
    return (registry.aliases(), dict(registry.stages), rollout.ended_at is not None, rollout.end_reason,
            [e.decision for e in store.audit_log(rid)], store.pending_plans())


def test_an_outage_at_every_step_of_a_promotion_is_finished_by_the_next_run() -> None:
    registry, store, rid = _world()
    assert act_once(PROMOTE, rid, registry, store, T0, "t").acted
    expected = _state(registry, store, rid)
    assert expected[:5] == ({"champion": "2", "previous-champion": "1"}, {"1": "Archived", "2": "Production"}, True,
                            "promoted version 2", ["promote"])
    failed_at = []
    for k in range(1, 100):
        registry, store, rid = _world()
        outage = Outage(k)
        flaky_registry, flaky_store = outage.wrap(registry, REGISTRY_WRITES), outage.wrap(store, STORE_WRITES)
        try:
            act_once(PROMOTE, rid, flaky_registry, flaky_store, T0, "t")
        except ConnectionError:
            failed_at.append(k)
        else:
            break  # k is past the last write: the whole promotion ran
        rerun = act_once(PROMOTE, rid, registry, store, T0, "t")  # the next hourly run, the outage over
        assert _state(registry, store, rid) == expected, f"outage at write {k}"
        if k > 1:  # the plan was recorded before the outage: the rerun finished it and said so
            assert any("finished the half-applied plan" in note for note in rerun.settled)
    assert len(failed_at) >= 10  # every write of the plan was tried: save, aliases, stages, tags, progress, end


def test_a_half_applied_plan_whose_alias_someone_moved_is_reversed_not_forced() -> None:
    registry, store, rid = _world()
    outage = Outage(3)  # save_plan, the champion alias, then the outage
    with pytest.raises(ConnectionError):
        act_once(PROMOTE, rid, outage.wrap(registry, REGISTRY_WRITES), outage.wrap(store, STORE_WRITES), T0, "t")
    assert registry.aliases()["champion"] == "2"
    registry.set_alias("challenger", "3")  # someone re-points the challenger by hand meanwhile
    (settled,) = plans.settle(registry, store)
    assert not settled.finished and settled.note.startswith("reversed the half-applied plan")
    assert "@challenger is at 3" in settled.note
    assert registry.aliases() == {"champion": "1", "challenger": "3"}  # ours undone, theirs kept
    assert store.rollout(rid).ended_at is None and store.pending_plans() == []
    assert [e.decision for e in store.audit_log(rid)] == ["promote reversed"]


def test_a_run_that_finds_the_rollout_ended_acts_on_nothing_and_records_nothing() -> None:
    registry, store, rid = _world()
    assert act_once(PROMOTE, rid, registry, store, T0, "first").acted
    again = act_once(PROMOTE, rid, registry, store, T0, "second")
    assert not again.acted and "already ended" in again.reason
    assert [e.actor for e in store.audit_log(rid)] == ["first"]


def test_an_outage_during_a_rollback_is_finished_by_the_next_one() -> None:
    registry, store, rid = _world()
    registry.set_alias("previous-champion", "3")
    outage = Outage(4)
    with pytest.raises(ConnectionError):
        rollback(outage.wrap(registry, REGISTRY_WRITES), outage.wrap(store, STORE_WRITES), T0, "on-call")
    result = rollback(registry, store, T0, "on-call")
    assert any("finished" in note for note in result["settled"])
    assert registry.aliases()["champion"] == "3" and registry.aliases()["previous-champion"] == "1"
    assert [e.decision for e in store.audit_log()] == ["rollback"]  # one rollback, finished, not a second one
