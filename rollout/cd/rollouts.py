"""Opening a rollout when CI registers a version: which versions, under which aliases, with what weights."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from rollout.config import Policy, RolloutPolicy
from rollout.outcomes import Store
from rollout.registry import ModelRegistry
from rollout.roles import ARCHIVED, Role, challenger_alias, is_challenger

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Assignment:
    """The aliases a newly registered version got, and the rollout opened for it (none for a first model)."""

    version: str
    aliases: list[str]
    rollout_id: int | None = None
    plan: RolloutPlan | None = None
    superseded: int | None = None  # the rollout that was open, ended by this one before its decision

    def summary(self) -> str:
        """One Markdown sentence for the run's artifact."""
        if self.plan is None:
            return f"Version **{self.version}** is the first model: set as " + ", ".join(f"`@{a}`" for a in self.aliases)
        return (f"Registered version **{self.version}** as " + ", ".join(f"`@{a}`" for a in self.aliases)
                + f"; opened rollout **{self.rollout_id}** in `{self.plan.mode}` mode: "
                + ", ".join(f"`{a}` = v{v}" for a, v in self.plan.versions.items())
                + (f"; weights {self.plan.weights}" if self.plan.weights else "")
                + (f". {self.superseded_note()}" if self.superseded is not None else ""))

    def superseded_note(self) -> str:
        return (f"Rollout {self.superseded} was still open: it ended undecided (superseded), its evidence and "
                "decisions stay in `rollout history`")


def assign(policy: Policy, registry: ModelRegistry, store: Store, version: str,
           start: datetime | None = None, actor: str = "ci-pipeline", attempt: str | None = None) -> Assignment:
    """First model: @champion when the policy allows (it has no champion to be judged against online), else
    @challenger with no rollout. Otherwise @challenger (or the next `challenger-N` in abn mode) and a rollout
    opened in the policy's mode, starting at `start` (default: now). A rollout still open ends undecided: an audit
    row `superseded` and, on the challengers it drops, a tag and the Archived stage.

    `attempt` names this step across its retries (the calling task's run id): the rollout's salt is derived from it,
    so a retry finds the rollout an earlier attempt opened rather than opening another, and finishes what that
    attempt left undone. Every other step is safe to repeat: aliases are set to what the plan says, the audit row is
    written once per (rollout, version), and the tags and stage are best effort (a version deleted from the
    registry meanwhile does not fail the run)."""
    aliases = registry.aliases()
    if Role.CHAMPION not in aliases:
        if policy.ci.first_model_becomes_champion:
            registry.set_alias(Role.CHAMPION, version, expected=None)  # unless another run just set one
            return Assignment(version, [Role.CHAMPION])
        registry.set_alias(Role.CHALLENGER, version)
        return Assignment(version, [Role.CHALLENGER])
    plan = plan_rollout(policy.rollout, aliases, version)
    for alias in plan.retired_aliases:
        registry.remove_alias(alias)
    for alias, v in plan.versions.items():
        if alias != Role.CHAMPION and aliases.get(alias) != v:
            registry.set_alias(alias, v)
    mine = [a for a, v in plan.versions.items() if v == version]
    salt = None if attempt is None else hashlib.sha256(f"rollout-attempt:{attempt}".encode()).hexdigest()[:32]
    current = store.current_rollout()
    if salt is not None and current is not None and current.salt == salt:  # an earlier attempt of this step opened it
        rollout_id = current.rollout_id
        previous = next((r for r in store.rollouts() if r.rollout_id != rollout_id and r.ended_at is not None
                         and r.ended_at == current.started_at and (r.end_reason or "").startswith("superseded")), None)
    else:
        previous = current
        rollout_id = store.open_rollout(plan.mode, plan.versions, plan.weights, salt=salt, started_at=start)
    if previous is None:
        return Assignment(version, mine, rollout_id, plan)
    # The ended rollout's challengers the new one drops: no alias left (a version under two aliases would be in
    # the plan's versions)
    gone = sorted({v for r, v in previous.versions.items() if r != Role.CHAMPION} - set(plan.versions.values()))
    if not any(e.decision == "superseded" and e.stats.get("by_rollout") == rollout_id
               for e in store.audit_log(previous.rollout_id)):
        store.record_decision(previous.rollout_id, "superseded", {
            "reasons": [f"superseded by rollout {rollout_id} before a decision: version {version} registered; "
                        f"version(s) {', '.join(gone) or '-'} no longer serve"],
            "by_rollout": rollout_id, "by_version": version, "versions": dict(previous.versions)}, actor=actor,
            ts=start)
    for v in gone:
        try:
            registry.set_tags(v, {f"rollout.{previous.rollout_id}.decision": "superseded"})
            registry.mirror_stage(v, ARCHIVED)
        except Exception as exc:  # noqa: BLE001 - bookkeeping on an old version; the new rollout is open
            log.warning("version %s of superseded rollout %s: tags and stage not updated: %s", v,
                        previous.rollout_id, exc)
    return Assignment(version, mine, rollout_id, plan, previous.rollout_id)
