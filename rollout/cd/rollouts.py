"""Planning a rollout when CI registers a challenger: which versions, under which aliases, with what weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from rollout.config import RolloutPolicy
from rollout.roles import Role, challenger_alias, is_challenger


@dataclass(frozen=True)
class RolloutPlan:
    """The routing row to open, and the challenger aliases it retires."""

    mode: str
    versions: dict[str, str]
    weights: dict[str, float]
    retired_aliases: list[str] = field(default_factory=list)


def initial_weights(policy: RolloutPolicy, roles: list[str]) -> dict[str, float]:
    """Shadow needs none; A/B(/n) gives each challenger `exposure`; a bandit starts uniform."""
    challengers = [r for r in roles if r != Role.CHAMPION]
    if policy.mode == "shadow":
        return {}
    if policy.mode == "bandit":
        return {r: 1.0 / len(roles) for r in roles}
    exposure = min(policy.exposure, 1.0 / (len(challengers) + 1))
    return {Role.CHAMPION: 1.0 - exposure * len(challengers), **{r: exposure for r in challengers}}


def plan_rollout(policy: RolloutPolicy, aliases: dict[str, str], new_version: str) -> RolloutPlan:
    """In `abn` mode a new challenger joins those already running (next `challenger-N` alias);
    in every other mode it replaces the running challenger, whose alias is retired. The new routing
    row supersedes any open one (the store ends it)."""
    champion = aliases[Role.CHAMPION]
    running = {a: v for a, v in aliases.items() if is_challenger(a) and v != new_version}
    if policy.mode == "abn" and running:
        versions = {Role.CHAMPION: champion, **running}
        versions[challenger_alias(len(running) + 1)] = new_version
        retired: list[str] = []
    else:
        versions = {Role.CHAMPION: champion, Role.CHALLENGER: new_version}
        retired = [a for a in running if a != Role.CHALLENGER]
    return RolloutPlan(policy.mode, versions, initial_weights(policy, list(versions)), retired)
