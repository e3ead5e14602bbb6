"""The logged features of a prediction row, stored without their column names.

A served row keeps its record's features as JSON. Written as an object, every row repeats every column name:
the example's ten features took 194 bytes a row that way, 63 without the names (benchmarks/retention.py). The
names are the same in nearly every row, so a row stores `[set id, value, value, ...]` and the names are kept
once, in `feature_sets` (the column names in the record's order, under the SHA-256 of their JSON, so two writers
adding the same set agree on one id; ids are never reused). Readers turn a row back into the record's object
(`Decoder`); a row stored as an object (by a store from before, or once the store holds `MAX_SETS` sets: callers
free to send any keys cannot grow the table without bound) reads as it is.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from rollout.outcomes.engine import is_sqlite, write
from rollout.outcomes.schema import feature_sets, to_json

MAX_SETS = 1000  # sets a store makes; records with other names beyond that are stored as objects


class FeatureSets:
    """One engine's feature sets as this process knows them: column names -> id, and back."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, ...], int] = {}
        self.columns: dict[int, tuple[str, ...]] = {}
        self.lock = threading.Lock()
        self.full = False  # the store held MAX_SETS sets when this process last looked

    def encode(self, engine: Engine, features: Mapping[str, Any]) -> str:
        """The stored text of a record's features: `[set id, values...]`, or the object when no set id is to be had."""
        names = tuple(features)
        set_id = self.ids.get(names)
        if set_id is None:
            set_id = self.id_of(engine, names)
            if set_id is None:
                return to_json(features)
        return to_json([set_id, *features.values()])

    def id_of(self, engine: Engine, names: tuple[Any, ...]) -> int | None:
        """The id of this set of column names, made (committed, before the rows that use it) when new; None when
        the store holds MAX_SETS sets already, or for a name that is not text (stored as an object, as JSON has it)."""
        with self.lock:
            if names in self.ids:
                return self.ids[names]
            if self.full or not all(isinstance(n, str) for n in names):
                return None
            text = json.dumps(list(names), separators=(",", ":"))
            digest = hashlib.sha256(text.encode()).hexdigest()
            find = select(feature_sets.c.id).where(feature_sets.c.digest == digest)
            # BEGIN IMMEDIATE on SQLite: a deferred transaction that reads and then writes fails at once ("database
            # is locked", no busy wait) when another process wrote since its read: the service's log writer and
            # every shadow child (and each worker of --workers N) name their first record's set at about once.
            with write(engine) as conn:
                found = conn.execute(find).scalar_one_or_none()
                if found is None:
                    if conn.execute(select(func.count()).select_from(feature_sets)).scalar_one() >= MAX_SETS:
                        self.full = True  # from now on new names are stored as objects, without asking again
                        return None
                    stmt = (sqlite_insert if is_sqlite(engine) else pg_insert)(feature_sets)
                    conn.execute(stmt.values(digest=digest, columns=text).on_conflict_do_nothing())
                    found = conn.execute(find).scalar_one()
            set_id = int(found)
            self.ids[names] = set_id
            self.columns[set_id] = names
            return set_id


_SETS: WeakKeyDictionary[Engine, FeatureSets] = WeakKeyDictionary()
_SETS_LOCK = threading.Lock()


def sets_of(engine: Engine) -> FeatureSets:
    with _SETS_LOCK:
        sets = _SETS.get(engine)
        if sets is None:
            sets = _SETS[engine] = FeatureSets()
        return sets


def expand_known(engine: Engine, stored: str | None) -> str | None:
    """`stored` as a JSON object's text when its set is one this process knows (a refused row's dead letter keeps
    the record as it came), else as it is."""
    if stored is None or not stored.startswith("["):
        return stored
    try:
        value = json.loads(stored)
        names = sets_of(engine).columns.get(int(value[0]))
        return stored if names is None else to_json(_record(int(value[0]), names, value[1:]))
    except (ValueError, TypeError, IndexError):  # in a failed batch's error path: never raise there
        return stored


def _record(set_id: int, names: Sequence[str], values: list[Any]) -> dict[str, Any]:
    """A stored row's values under its set's names."""
    if len(names) != len(values):
        raise ValueError(f"a logged row's features have {len(values)} values for feature set {set_id}'s "
                         f"{len(names)} names")
    return dict(zip(names, values, strict=True))


class Decoder:
    """Stored features text -> the record's features (a dict); the sets are read once, again for an unknown id."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.columns: dict[int, list[str]] = {}

    def load(self) -> None:
        """Read every set (a reader of many rows can do it before it starts, on the same connection)."""
        self.columns = {int(i): json.loads(c) for i, c in self.conn.execute(select(feature_sets.c.id,
                                                                                   feature_sets.c.columns))}

    def __call__(self, stored: str | None) -> dict[str, Any] | None:
        if stored is None:
            return None
        value = json.loads(stored)
        if not isinstance(value, list):
            return value  # type: ignore[no-any-return]
        set_id, values = int(value[0]), value[1:]
        if set_id not in self.columns:
            self.load()
            if set_id not in self.columns:
                raise ValueError(f"a logged row's features name feature set {set_id}, which feature_sets does not hold")
        return _record(set_id, self.columns[set_id], values)

    def text(self, stored: str | None) -> str | None:
        """The features as a JSON object's text (what an analyst or a labeller reads)."""
        if stored is None or not stored.startswith("["):
            return stored
        return to_json(self(stored))
