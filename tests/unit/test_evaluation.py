"""The CD phase's steps on the in-memory store and registry: gather evidence, act on a decision, roll back."""

from __future__ import annotations

import contextlib
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rollout.cd.decision import Decision
from rollout.cd.evaluation import act, act_once, gather, rollback
from rollout.config import parse_policy
from rollout.outcomes import PredictionRow
from rollout.outcomes.memory import InMemoryStore
from rollout.registry import InMemoryRegistry

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore(clock=lambda: T0)


@pytest.fixture
def registry() -> InMemoryRegistry:
    reg = InMemoryRegistry()
    for _ in range(3):
        reg.add(object())
    reg.set_alias("champion", "1")
    reg.set_alias("challenger", "2")
    return reg


def _traffic(store: InMemoryStore, rid: int, mode: str, hours: int = 48) -> None:
    """One request a minute; in shadow both versions score it, in ab unit u<k> sticks to one version."""
    rows, labels = [], []
    for i in range(hours * 60):
        ts = T0 + timedelta(minutes=i)
        unit = f"u{i % 30}"
        versions = ["1", "2"] if mode == "shadow" else ["2" if i % 30 < 9 else "1"]
        for v in versions:
            rows.append(PredictionRow(f"r{i}", v, "champion" if v == "1" else "challenger", ts, unit, rid,
                                      served=mode != "shadow" or v == "1", propensity=0.7 if v == "1" else 0.3,
                                      prediction=float(i % 3 == 0), score=0.6 if i % 3 == 0 else 0.3,
                                      latency_ms=4.0, segment="VIP" if i % 5 == 0 else "standard"))
        labels.append((f"r{i}", float(i % 2 == 0), ts + timedelta(hours=1)))
    store.log_predictions(rows)
    store.add_labels(labels)


def test_gather_in_shadow_pairs_matured_requests_and_counts_requests(store: InMemoryStore) -> None:
    policy = parse_policy({"rollout": {"mode": "shadow", "label_delay_hours": 12, "primary_metric": "accuracy"}})
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    _traffic(store, rid, "shadow")
    now = T0 + timedelta(hours=48)
    evidence = gather(store, store.rollout(rid), policy, now)
    (ch,) = evidence.challengers
    assert ch.version == "2" and evidence.champion == "1" and evidence.mode == "shadow"
    assert sum(m.n for m in ch.paired.values()) == 36 * 60  # only requests made 12 h before `now` count
    assert all(m.total == 0.0 for m in ch.paired.values())  # same predictions: no difference
    assert evidence.served == {"1": 48 * 60, "2": 48 * 60} and evidence.served_unit == "requests"
    assert evidence.expected_shares == {}
    assert ch.agreement is not None and ch.agreement.n == ch.agreement.n_agree == 48 * 60
    assert ch.latency_p99_ms == pytest.approx(4.0, rel=0.03)


def test_gather_in_ab_counts_units_and_expects_the_configured_split(store: InMemoryStore) -> None:
    policy = parse_policy({"rollout": {"mode": "ab", "primary_metric": "accuracy"}})
    rid = store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"champion": 0.7, "challenger": 0.3},
                             started_at=T0)
    _traffic(store, rid, "ab", hours=10)
    evidence = gather(store, store.rollout(rid), policy, T0 + timedelta(hours=10))
    assert evidence.served == {"1": 21, "2": 9} and evidence.served_unit == "units"
    assert evidence.expected_shares == {"1": 0.7, "2": 0.3}
    assert evidence.challengers[0].paired == {}  # unpaired in A/B: the effect comes from each arm's loss


def _decision(action: str, winner: str | None = None, weights: dict[str, float] | None = None) -> Decision:
    return Decision(action, winner, [f"{action} for a test"], {}, weights)


def test_promote_moves_aliases_mirrors_stages_and_ends_the_rollout(store: InMemoryStore,
                                                                    registry: InMemoryRegistry) -> None:
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    done = act(_decision("promote", "2"), store.rollout(rid), registry, store, T0)
    assert registry.aliases() == {"champion": "2", "previous-champion": "1"}
    assert registry.stages == {"1": "Archived", "2": "Production"}
    assert done.ended and store.current_rollout() is None and "promoted version 2" in str(store.rollout(rid).end_reason)
    assert {m["alias"] for m in done.alias_moves} == {"champion", "previous-champion", "challenger"}
    assert registry.get_tags("2")[f"rollout.{rid}.decision"] == "promote"


def test_reject_retires_every_challenger_and_keeps_the_champion(store: InMemoryStore,
                                                                registry: InMemoryRegistry) -> None:
    registry.set_alias("challenger-2", "3")
    rid = store.open_rollout("abn", {"champion": "1", "challenger": "2", "challenger-2": "3"}, started_at=T0)
    act(_decision("reject"), store.rollout(rid), registry, store, T0)
    assert registry.aliases() == {"champion": "1"}
    assert registry.stages["2"] == registry.stages["3"] == "Archived"
    assert store.current_rollout() is None


def test_a_continuing_bandit_gets_its_new_weights_by_role(store: InMemoryStore, registry: InMemoryRegistry) -> None:
    rid = store.open_rollout("bandit", {"champion": "1", "challenger": "2"}, {"champion": 0.5, "challenger": 0.5},
                             started_at=T0)
    done = act(_decision("continue", weights={"1": 0.2, "2": 0.8}), store.rollout(rid), registry, store, T0)
    assert store.rollout(rid).weights == {"champion": 0.2, "challenger": 0.8} == done.weights
    assert registry.aliases() == {"champion": "1", "challenger": "2"} and not done.ended


def test_rollback_restores_the_previous_champion_and_records_it(store: InMemoryStore,
                                                                registry: InMemoryRegistry) -> None:
    registry.set_alias("previous-champion", "3")
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    result = rollback(registry, store, T0, "on-call")
    assert result["champion"] == "3" and result["replaced"] == "1"
    assert registry.aliases()["champion"] == "3" and registry.aliases()["previous-champion"] == "1"
    assert store.current_rollout() is None
    (entry,) = store.audit_log(rid)
    assert entry.decision == "rollback" and entry.actor == "on-call" and "version 3 restored" in entry.stats["reasons"][0]


def test_rollback_without_a_previous_champion_says_so_and_changes_nothing(store: InMemoryStore,
                                                                          registry: InMemoryRegistry) -> None:
    with pytest.raises(RuntimeError, match="previous-champion"):
        rollback(registry, store, T0, "on-call")
    assert registry.aliases() == {"champion": "1", "challenger": "2"} and store.audit_log() == []


class _Meeting(InMemoryRegistry):
    """A registry whose first alias move waits (up to 2 s) for a second one: two runs inside act at once meet."""

    def __init__(self, inside: threading.Event, barrier: threading.Barrier) -> None:
        super().__init__()
        self.inside, self.barrier = inside, barrier

    def set_alias(self, alias: str, version: str, expected: object = object()) -> None:  # noqa: B008
        self.inside.set()
        try:
            self.barrier.wait(timeout=2.0)
        except threading.BrokenBarrierError:
            pass
        if isinstance(expected, str | type(None)):
            super().set_alias(alias, version, expected=expected)
        else:
            super().set_alias(alias, version)


@pytest.mark.parametrize("locked", [True, False])
def test_two_evaluations_acting_at_once_promote_once(tmp_path, monkeypatch: pytest.MonkeyPatch, locked: bool) -> None:
    """The second run starts while the first is inside the lock, moving aliases; it must act on nothing and say
    so. Without the lock (locked=False) the two overlap inside act, and the second fails mid-way: the test's
    own check that the overlap it builds is real."""
    from rollout.outcomes import OutcomeStore

    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}", clock=lambda: T0)
    if not locked:
        monkeypatch.setattr(OutcomeStore, "lock", lambda self, name, ttl_s=3600.0: contextlib.nullcontext())
    inside, barrier = threading.Event(), threading.Barrier(2)
    registry = _Meeting(inside, barrier)
    for _ in range(2):
        registry.add(object())
    InMemoryRegistry.set_alias(registry, "champion", "1")
    InMemoryRegistry.set_alias(registry, "challenger", "2")
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            results[name] = act_once(_decision("promote", "2"), rid, registry, store, T0, name)
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            results[name] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert inside.wait(5.0)  # the first run is moving aliases, under the lock
    run("second")
    first.join()
    if locked:
        assert results["first"].acted and not results["second"].acted
        assert "another evaluation is acting" in results["second"].reason
        assert [e.decision for e in store.audit_log(rid)] == ["promote"]
        assert registry.aliases() == {"champion": "2", "previous-champion": "1"}
    else:
        assert any(isinstance(r, Exception) for r in results.values())


def test_gather_reads_back_the_looks_and_the_maximum_the_first_look_planned(store: InMemoryStore) -> None:
    policy = parse_policy({"rollout": {"mode": "shadow", "primary_metric": "accuracy", "design": "group_sequential"}})
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, started_at=T0)
    _traffic(store, rid, "shadow", hours=10)
    for n, cap, planned in ((300, None, False), (700, 12_345.0, True), (900, 99_999.0, True)):
        store.record_decision(rid, "continue", {"stats": {"2": {"n": n, "cap": cap, "cap_planned": planned}}})
    (ch,) = gather(store, store.rollout(rid), policy, T0 + timedelta(hours=10)).challengers
    assert ch.looked_at == (300, 700, 900)
    assert ch.planned_max == 12_345.0  # the first plan holds: re-planning would move the spent alpha
