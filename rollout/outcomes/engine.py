"""Connections and the evaluation lock: SQLite in WAL mode by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import and_, create_engine, event, func, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from rollout.outcomes.schema import locks
from rollout.times import from_epoch

T = TypeVar("T")


class StoreUnreachable(ConnectionError):
    """The outcome store cannot be opened: the message names its URL (no password) and the settings to check."""


def check_reachable(engine: Engine) -> None:
    """One round trip to the store's database; a StoreUnreachable saying what to check when there is none."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        cause = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
        where = engine.url.render_as_string(hide_password=True)
        hint = "" if is_sqlite(engine) else " (a PostgreSQL database must exist first: createdb NAME)"
        raise StoreUnreachable(f"outcome store {where} cannot be opened: {cause}. Check stores.outcome_store_url "
                               f"or ROLLOUT_OUTCOME_STORE_URL{hint}") from exc


class LockHeld(RuntimeError):
    """Another process holds the named lock (e.g. a concurrent evaluation run)."""


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _ln(x: float | None) -> float | None:
    return math.log(x) if x is not None and x > 0 else None


SQLITE_NEEDED = (3, 31, 0)


BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for the file's lock before its statement fails


def make_engine(url: str) -> Engine:
    """An engine with WAL, a busy timeout and ln() for SQLite; plain pooling for PostgreSQL."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    if sqlite3.sqlite_version_info < SQLITE_NEEDED:  # the log's computed day (schema.SQLITE_DAY)
        raise RuntimeError(f"the outcome store needs SQLite {'.'.join(map(str, SQLITE_NEEDED))} or later (generated "
                           f"columns); this Python's sqlite3 module has {sqlite3.sqlite_version}: use a newer Python "
                           "build, or PostgreSQL (stores.outcome_store_url)")
    in_memory = url in ("sqlite://", "sqlite:///:memory:")
    if not in_memory:
        path = url.split("sqlite:///", 1)[-1]
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}}
    if in_memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Transactions are begun explicitly below, so BEGIN IMMEDIATE is possible for the lock.
        dbapi_conn.isolation_level = None
        try:  # SQLite >= 3.35 built with math functions has a native (much faster) ln()
            dbapi_conn.execute("SELECT ln(2.0)").fetchone()
        except Exception:  # noqa: BLE001 - sqlite3.OperationalError: no such function
            dbapi_conn.create_function("ln", 1, _ln, deterministic=True)
        cur = dbapi_conn.cursor()
        # Space that retention frees goes back to the file system (rollout.outcomes.retention). Takes effect on a
        # new, empty file only; an older store keeps reusing its free pages until `rollout retention --vacuum`.
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        # A checkpoint (WAL pages copied back, two fsyncs) runs in the commit that crosses this many WAL
        # pages. At SQLite's 1,000 it was most of a logged batch's cost once the table outgrew the cache;
        # 10,000 pages (a WAL of up to 40 MB) write each hot index page back once for many batches.
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    event.listen(engine, "before_cursor_execute", _apply_hints, retval=True)
    return engine


# SQLite's index hints (INDEXED BY, a CROSS JOIN fixing the join order), which SQLAlchemy does not render: a
# statement executed with execution_options(sqlite_hints=((clause, hinted), ...)) has each clause found exactly once
# in its SQL rewritten to the hinted text just before it reaches the driver. Binds and results go through their
# types as for any statement (a RequestId packs and unpacks). A clause not found once is left as it is.
SQLITE_HINTS = "sqlite_hints"


def _apply_hints(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                 executemany: bool) -> tuple[str, Any]:
    hints = context.execution_options.get(SQLITE_HINTS) if context is not None else None
    for clause, hinted in hints or ():
        if statement.count(clause) == 1:
            statement = statement.replace(clause, hinted)
    return statement, parameters


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A write transaction; BEGIN IMMEDIATE on SQLite (the write lock up front, no upgrade failure)."""
    if is_sqlite(engine):
        with engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


@contextlib.contextmanager
def driver(engine: Engine) -> Iterator[Any]:
    """The driver's own connection (sqlite3's, psycopg's) for what SQLAlchemy has no statement for (PRAGMAs, COPY,
    VACUUM); back to the pool after."""
    raw = engine.raw_connection()
    try:
        yield raw.driver_connection
    finally:
        raw.close()


@contextlib.contextmanager
def autocommit(engine: Engine) -> Iterator[Any]:
    """PostgreSQL: the driver's connection outside any transaction, for statements that cannot run in one (CREATE
    INDEX CONCURRENTLY, DETACH PARTITION ... CONCURRENTLY, VACUUM); back in transaction mode and to the pool after."""
    with driver(engine) as dbapi:
        dbapi.autocommit = True
        try:
            yield dbapi
        finally:
            dbapi.autocommit = False


@contextlib.contextmanager
def lock(engine: Engine, name: str, ttl_s: float = 3600.0) -> Iterator[None]:
    """Hold a named lock for acting (promotion, rollback); raises LockHeld if another holder has it.

    PostgreSQL: a session advisory lock on a dedicated connection. SQLite: a row in `locks` taken with
    compare-and-set under BEGIN IMMEDIATE; it expires after `ttl_s` so a crashed holder does not block forever.
    """
    with _sqlite_lock(engine, name, ttl_s) if is_sqlite(engine) else _pg_lock(engine, name):
        yield


@contextlib.contextmanager
def _pg_lock(engine: Engine, name: str) -> Iterator[None]:
    key = int.from_bytes(hashlib.sha256(f"rollout:{name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        got = conn.execute(select(func.pg_try_advisory_lock(key))).scalar_one()
        conn.commit()
        if not got:
            raise LockHeld(f"lock {name!r} is held by another process (PostgreSQL advisory lock {key})")
        try:
            yield
        finally:
            conn.execute(select(func.pg_advisory_unlock(key)))
            conn.commit()


@contextlib.contextmanager
def _sqlite_lock(engine: Engine, name: str, ttl_s: float) -> Iterator[None]:
    holder = f"{default_actor()}:{uuid.uuid4().hex[:8]}"
    now = wall_clock()
    with write(engine) as conn:
        row = conn.execute(select(locks).where(locks.c.name == name)).mappings().first()
        if row is not None and row["expires_at"] > now:
            raise LockHeld(f"lock {name!r} is held by {row['holder']} since {from_epoch(row['acquired_at'])}")
        if row is not None:
            conn.execute(locks.delete().where(locks.c.name == name))
        conn.execute(insert(locks).values(name=name, holder=holder, acquired_at=now, expires_at=now + ttl_s))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(locks.delete().where(and_(locks.c.name == name, locks.c.holder == holder)))


# SQLite: the processes writing one store's log (a service, its shadow children, other workers) take turns by an
# flock on a file beside it, looked at every millisecond. Left to SQLite's busy timeout, a writer finding the file
# locked sleeps 1, 2, 5, 10... up to 100 ms before it looks again, and two writers spent a third of their time asleep
# while the other had finished (`py-spy --idle` under benchmarks/log_load.py). The file is opened for each turn (a few
# µs beside a batch's milliseconds; no descriptor is kept), and the threads of a process take turns by a lock of their
# own first: an flock is held by an open file, not by a thread. A turn not had within TURN_WAIT_S (a holder hung or
# stopped) is not waited for longer: the write goes ahead, and SQLite's own lock and busy timeout decide, as without.
TURN_WAIT_S = float(BUSY_TIMEOUT_S)
TURN_POLL_S = 0.001
_TURNS: dict[str, threading.Lock] = {}
_TURNS_LOCK = threading.Lock()


@contextlib.contextmanager
def log_turn(engine: Engine) -> Iterator[None]:
    """SQLite file: this process's turn at writing the log, among every process taking turns so, waited for at most
    TURN_WAIT_S. PostgreSQL or an in-memory SQLite database need none; when the lock file cannot be opened none is
    taken. SQLite's own lock and busy timeout keep writes apart either way: the turn only lets a writer in sooner."""
    database = engine.url.database if is_sqlite(engine) else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    path = os.path.abspath(database) + ".write-lock"
    with _TURNS_LOCK:
        thread_lock = _TURNS.setdefault(path, threading.Lock())
    deadline = time.monotonic() + TURN_WAIT_S
    ours = thread_lock.acquire(timeout=TURN_WAIT_S)
    fd = _flocked(path, deadline) if ours else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # lets go of the flock
        if ours:
            thread_lock.release()


def _flocked(path: str, deadline: float) -> int | None:
    """`path` opened and flock'ed by this process, or None: it cannot be opened, or another held it past `deadline`."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(TURN_POLL_S)


def wall_clock() -> float:
    """Lock expiry and build times use the wall clock, never the (possibly simulated) business clock."""
    return datetime.now(tz=UTC).timestamp()


def default_actor() -> str:
    return f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}"


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), read as they come: a generator is never held whole."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
