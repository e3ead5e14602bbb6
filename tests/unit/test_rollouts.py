"""Planning a rollout when CI registers a challenger: aliases and initial weights per mode."""

from __future__ import annotations

import pytest

from rollout.config import RolloutPolicy, parse_policy
from rollout.cd.rollouts import assign, plan_rollout
from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry


def test_shadow_replaces_the_running_challenger_and_needs_no_weights():
    plan = plan_rollout(RolloutPolicy(mode="shadow"), {"champion": "1", "challenger": "2"}, "3")
    assert plan.versions == {"champion": "1", "challenger": "3"} and plan.weights == {}


def test_ab_gives_the_challenger_its_exposure():
    plan = plan_rollout(RolloutPolicy(mode="ab", exposure=0.2), {"champion": "1"}, "2")
    assert plan.weights == pytest.approx({"champion": 0.8, "challenger": 0.2})


def test_abn_adds_the_next_challenger_alongside_the_running_ones():
    aliases = {"champion": "1", "challenger": "2", "challenger-2": "3"}
    plan = plan_rollout(RolloutPolicy(mode="abn", exposure=0.2), aliases, "4")
    assert plan.versions == {"champion": "1", "challenger": "2", "challenger-2": "3", "challenger-3": "4"}
    assert sum(plan.weights.values()) == pytest.approx(1.0) and plan.weights["challenger-3"] == pytest.approx(0.2)
    assert plan.retired_aliases == []


def test_non_abn_retires_extra_challenger_aliases_and_bandit_starts_uniform():
    plan = plan_rollout(RolloutPolicy(mode="bandit"), {"champion": "1", "challenger": "2", "challenger-2": "3"}, "4")
    assert plan.versions == {"champion": "1", "challenger": "4"} and plan.retired_aliases == ["challenger-2"]
    assert plan.weights == pytest.approx({"champion": 0.5, "challenger": 0.5})


def test_a_new_candidate_ends_the_open_rollout_with_an_audit_entry_and_its_challenger_archived(tmp_path):
    """CI registering v3 while v2's A/B rollout is still deciding: the rollout ends undecided, and says so in
    `rollout history`, on v2's tags and stage, and in what the CI run prints; the champion keeps its alias."""
    policy = parse_policy({"rollout": {"mode": "ab", "exposure": 0.2}}, tmp_path)
    registry = InMemoryRegistry()
    for _ in range(3):
        registry.add(object())
    store = OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    assert assign(policy, registry, store, "1").aliases == ["champion"]
    first = assign(policy, registry, store, "2")
    assert first.superseded is None and "was still open" not in first.summary()
    second = assign(policy, registry, store, "3")
    assert second.superseded == first.rollout_id != second.rollout_id
    assert store.current_rollout().rollout_id == second.rollout_id
    entry = [e for e in store.audit_log() if e.decision == "superseded"]
    assert [(e.rollout_id, e.actor) for e in entry] == [(first.rollout_id, "ci-pipeline")]
    assert f"superseded by rollout {second.rollout_id} before a decision: version 3 registered; version(s) 2 no " \
        "longer serve" in entry[0].stats["reasons"][0]
    assert registry.tags["2"][f"rollout.{first.rollout_id}.decision"] == "superseded"
    assert registry.stages["2"] == "Archived" and registry.alias_map == {"champion": "1", "challenger": "3"}
    assert f"Rollout {first.rollout_id} was still open" in second.summary()


def test_a_retried_assign_finishes_what_the_failed_attempt_left_and_opens_no_second_rollout(tmp_path):
    """The task that assigns retries on outages, under one task-run id (`attempt`). An attempt whose rollout was
    committed but whose reply was lost, and a registry failing on the old challenger's tags: the retry opens no second
    rollout, records the supersede once, and says which rollout it ended. The same version assigned again by
    another run (a re-adopt with a new exposure) is a new rollout."""
    policy = parse_policy({"rollout": {"mode": "ab", "exposure": 0.1}}, tmp_path)

    class Flaky(InMemoryRegistry):
        def set_tags(self, version, tags):
            raise ConnectionError("registry unreachable")

    class LostReply(OutcomeStore):
        lose = 0

        def open_rollout(self, *args, **kwargs):
            rollout_id = super().open_rollout(*args, **kwargs)
            if self.lose:
                self.lose -= 1
                raise ConnectionError("connection reset after commit")
            return rollout_id

    registry = Flaky()
    for _ in range(3):
        registry.add(object())
    store = LostReply(f"sqlite:///{tmp_path / 'outcomes.db'}").create()
    assign(policy, registry, store, "1", attempt="t1")
    first = assign(policy, registry, store, "2", attempt="t2")
    store.lose = 1
    with pytest.raises(ConnectionError):
        assign(policy, registry, store, "3", attempt="t3")
    retried = assign(policy, registry, store, "3", attempt="t3")  # the tags fail again: logged, the run goes on
    assert retried.superseded == first.rollout_id != retried.rollout_id
    assert [r.rollout_id for r in store.rollouts()] == [first.rollout_id, retried.rollout_id]
    again = assign(policy, registry, store, "3", attempt="t3")
    assert again.rollout_id == retried.rollout_id and again.superseded == first.rollout_id
    supersedes = [(e.rollout_id, e.stats["by_rollout"]) for e in store.audit_log() if e.decision == "superseded"]
    assert supersedes == [(first.rollout_id, retried.rollout_id)]

    wider = parse_policy({"rollout": {"mode": "ab", "exposure": 0.3}}, tmp_path)
    readopted = assign(wider, registry, store, "3", attempt="t4")  # another run: a new rollout, its own weights
    assert readopted.rollout_id != retried.rollout_id and readopted.superseded == retried.rollout_id
    assert store.current_rollout().weights["challenger"] == pytest.approx(0.3)
