"""Which version answers a request: the routing view of the open rollout, and arm assignment.

The routing row (outcome store) gives mode, salt and weights; registry aliases say which version
each role is (aliases are the source of truth; a role without an alias keeps the version pinned
in the routing row). Weights may be keyed by role (`champion`, `challenger-2`) or by version.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from rollout.outcomes import Rollout
from rollout.roles import Role


@dataclass(frozen=True)
class Arm:
    role: str
    version: str
    weight: float


@dataclass(frozen=True)
class RoutingView:
    """An immutable snapshot of how to route; replaced as a whole when anything changes."""

    rollout_id: int | None
    mode: str  # shadow, ab, abn, bandit, or champion-only when no rollout is open
    salt: str
    arms: tuple[Arm, ...]
    shadows: tuple[Arm, ...] = ()
    rollout: Rollout | None = None
    _cumulative: tuple[float, ...] = field(default=(), repr=False)

    @property
    def champion(self) -> Arm:
        return self.arms[0]

    def choose(self, unit_id: str | None, request_id: str, rng: random.Random) -> Arm:
        """The arm of one request: sticky salted hash in ab/abn, a random draw in bandit."""
        if len(self.arms) == 1:
            return self.arms[0]
        u = rng.random() if self.mode == "bandit" else unit_hash(self.salt, unit_id or request_id)
        index = bisect_right(self._cumulative, u)
        return self.arms[min(index, len(self.arms) - 1)]

    def as_dict(self) -> dict[str, Any]:
        row = self.rollout
        return {
            "rollout_id": self.rollout_id,
            "mode": self.mode,
            "arms": [{"role": a.role, "version": a.version, "weight": a.weight} for a in self.arms],
            "shadows": [{"role": a.role, "version": a.version} for a in self.shadows],
            "versions": dict(row.versions) if row else {},
            "weights": dict(row.weights) if row else {},
            "started_at": row.started_at.isoformat() if row else None,
            "updated_at": row.updated_at.isoformat() if row else None,
        }


def unit_hash(salt: str, unit: str) -> float:
    """A uniform number in [0, 1) from sha256(salt + unit): same unit, same salt, same arm."""
    digest = hashlib.sha256((salt + unit).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _role_order(role: str) -> tuple[int, int, str]:
    if role == Role.CHAMPION:
        return (0, 0, role)
    tail = role.rsplit("-", 1)[-1]
    return (1, int(tail) if tail.isdigit() else 1, role)


def build_view(
    rollout: Rollout | None,
    aliases: dict[str, str],
    available: set[str],
    default_exposure: float,
) -> RoutingView | None:
    """Combine the routing row with the live aliases; None when no champion version is available."""
    champion = aliases.get(Role.CHAMPION) or (rollout.versions.get(Role.CHAMPION) if rollout else None)
    if champion is None or champion not in available:
        return None
    if rollout is None:
        return RoutingView(None, "champion-only", "", (Arm(Role.CHAMPION, champion, 1.0),), (), None, (1.0,))
    roles: dict[str, str] = {}
    for role, pinned in rollout.versions.items():
        if role == Role.CHAMPION:
            continue
        version = aliases.get(role, pinned)
        if version != champion and version in available and version not in roles.values():
            roles[role] = version
    ordered = sorted(roles, key=_role_order)
    if rollout.mode == "shadow":
        shadows = tuple(Arm(r, roles[r], 0.0) for r in ordered)
        champion_arm = (Arm(Role.CHAMPION, champion, 1.0),)
        return RoutingView(rollout.rollout_id, "shadow", rollout.salt, champion_arm, shadows, rollout, (1.0,))
    weights = rollout.weights or {}

    def given(role: str, version: str) -> float | None:
        value = weights.get(role, weights.get(version))
        return None if value is None else max(float(value), 0.0)

    default = (1.0 / (len(ordered) + 1)) if rollout.mode == "bandit" else default_exposure
    challenger_w: dict[str, float] = {}
    for r in ordered:
        w = given(r, roles[r])
        challenger_w[r] = default if w is None else w
    champion_w = given(Role.CHAMPION, champion)
    if champion_w is None:
        champion_w = max(1.0 - sum(challenger_w.values()), 0.0)
    raw: list[tuple[str, str, float]] = [(Role.CHAMPION, champion, champion_w)]
    raw += [(r, roles[r], challenger_w[r]) for r in ordered]
    total = sum(w for _, _, w in raw) or 1.0
    arms = tuple(Arm(r, v, w / total) for r, v, w in raw)
    cumulative: list[float] = []
    acc = 0.0
    for arm in arms:
        acc += arm.weight
        cumulative.append(acc)
    return RoutingView(rollout.rollout_id, rollout.mode, rollout.salt, arms, (), rollout, tuple(cumulative))

