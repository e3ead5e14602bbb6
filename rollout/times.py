"""Time as the outcome store keeps it: epoch seconds (UTC), a `day` string and an hour number.

The store's SQL computes the hour with the same double division as `hour_of`, so Python and SQL
put a row in the same hour (a unit test checks rows a hair either side of boundaries).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

_DAYS: dict[int, str] = {}
# The times the store accepts: 1970-01-01 up to 2100-01-01 (UTC). A time outside has no day to file it under.
EARLIEST, LATEST = 0.0, 4_102_444_800.0


def to_epoch(value: datetime | float | int | str) -> float:
    """Epoch seconds from a datetime (naive = UTC), a number, or an ISO 8601 string, between 1970 and 2100."""
    if isinstance(value, bool):
        raise TypeError("a time cannot be a boolean")
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        out = _aware(datetime.fromisoformat(value.replace("Z", "+00:00"))).timestamp()
    elif isinstance(value, datetime):
        out = _aware(value).timestamp()
    else:
        raise TypeError(f"not a time: {value!r}")
    if not EARLIEST <= out < LATEST:  # NaN fails too
        raise ValueError(f"{value!r} is outside 1970-01-01..2100-01-01 (epoch seconds 0..{LATEST:.0f})")
    return out


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def from_epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def day_of(epoch: float) -> str:
    """The UTC day (YYYY-MM-DD) of a time."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d")


def day_start(day: str) -> float:
    """The epoch seconds at which a UTC day (YYYY-MM-DD) begins."""
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()


def day_span(day: str) -> tuple[float, float]:
    """The times [lo, hi) a row filed under `day` can have, with a second either side: `day_of` rounds to
    microseconds, so a row a hair before midnight is filed under the next day."""
    start = day_start(day)
    return start - 1.0, start + 86_401.0


def day_of_cached(epoch: float) -> str:
    """`day_of`, remembered per UTC day: strftime on every logged row was a tenth of its cost.

    Within a microsecond of midnight `day_of` may round to the next day, so those are computed, not cached."""
    k = math.floor(epoch / 86400.0)
    if (k + 1) * 86400.0 - epoch <= 1e-6:
        return day_of(epoch)
    day = _DAYS.get(k)
    if day is None:
        day = _DAYS[k] = day_of(epoch)
    return day


def hour_of(epoch: float) -> int:
    """The UTC hour (hours since the epoch) of a time: floor(ts / 3600.0), as the store's SQL computes it."""
    return math.floor(float(epoch) / 3600.0)


def days_between(first: float, last: float) -> list[str]:
    """Every `day` value from day_of(first) to day_of(last)."""
    out, t = [], math.floor(first / 86400.0) * 86400.0
    while t <= last:
        out.append(day_of(max(t, first)))
        t += 86400.0
    return sorted(set(out) | {day_of(last)})
