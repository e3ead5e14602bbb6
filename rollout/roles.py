"""The roles a version plays in a rollout, which are also its registry aliases, and the rollout modes.

A role is a `str` (StrEnum), so it is its alias name in MLflow, a key of a rollout's `versions`,
and the `role` column of a logged prediction, with no conversion anywhere.
"""

from __future__ import annotations

from enum import StrEnum
from typing import get_args

from rollout.config import Mode


class Role(StrEnum):
    CHAMPION = "champion"
    CHALLENGER = "challenger"  # the first; A/B/n adds challenger-2, challenger-3, ...
    PREVIOUS = "previous-champion"


MODES: tuple[str, ...] = get_args(Mode)
# Modes that split traffic by unit (sticky hash): the sample-ratio test counts units there, not requests.
UNIT_SPLIT_MODES = ("ab", "abn")
# Stages mirrored from aliases for users of MLflow's (deprecated) stage UI.
STAGE_OF_ROLE: dict[str, str] = {Role.CHAMPION: "Production", Role.CHALLENGER: "Staging"}
ARCHIVED = "Archived"


def challenger_alias(index: int) -> str:
    """`challenger` for the first, `challenger-2`, `challenger-3`, ... for A/B/n."""
    return Role.CHALLENGER if index <= 1 else f"{Role.CHALLENGER}-{index}"


def is_challenger(alias: str) -> bool:
    return alias == Role.CHALLENGER or alias.startswith(f"{Role.CHALLENGER}-")


def stage_of(alias: str) -> str | None:
    """The stage an alias is mirrored to, if any."""
    return STAGE_OF_ROLE.get(Role.CHALLENGER if is_challenger(alias) else alias)
