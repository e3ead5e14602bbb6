"""Planning a rollout when CI registers a challenger: aliases and initial weights per mode."""

from __future__ import annotations

import pytest

from rollout.config import RolloutPolicy
from rollout.cd.rollouts import plan_rollout


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
