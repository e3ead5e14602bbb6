"""Prefect's local API server for commands run without PREFECT_API_URL, kept for the next command.

`rollout ci`, `adopt`, `evaluate` and the demo need a Prefect API. Without one configured, Prefect starts a
temporary server per process, ~3.5 s of start-up (2.4 s of it importing `prefect.server`) that the command
waits ~1.2 s for even when it starts the server beside its own imports (`flows.runners`). This module keeps
one such server per Prefect home for the commands that follow, like a build daemon:

- the server is Prefect's own app (`prefect.server.api.server:create_app`, its database and settings, the
  ephemeral set of services, no UI), run by `python -m flows.local_server` under uvicorn;
- every command using it holds a shared lock on `<PREFECT_HOME>/rollout-server.lease` while it runs (the
  kernel releases it when the process ends, however it ends);
- the server's watchdog takes that lock exclusively once a second: while it cannot, a command is using the
  server; once nobody has for `idle` seconds, it holds the lock (so no command can start using it), removes
  its record and stops;
- `<PREFECT_HOME>/rollout-server.json` names the live server (pid, port, and a key of what decides which
  database and settings it serves: the interpreter, Prefect's version, the PREFECT_HOME, profile, database
  and server settings in the environment); a command reuses it only when the key is its own, and starts and
  names a new one otherwise (the other stays until it is idle).

`ROLLOUT_PREFECT_IDLE_SECONDS` sets how long an idle server stays (default 600); 0 gives every command its
own server, stopped when the command ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

IDLE_ENV = "ROLLOUT_PREFECT_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 600.0
RECORD = "rollout-server.json"
LEASE = "rollout-server.lease"
SPAWN_LOCK = "rollout-server.lock"
LOG = "rollout-server.log"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here, so every command gets its own server
    fcntl = None  # type: ignore[assignment]


def idle_seconds() -> float:
    """How long a server nobody uses stays, from ROLLOUT_PREFECT_IDLE_SECONDS; 0 without file locks."""
    raw = os.environ.get(IDLE_ENV, "")
    try:
        idle = float(raw) if raw.strip() else DEFAULT_IDLE_SECONDS
    except ValueError:
        raise RuntimeError(f"{IDLE_ENV}={raw!r}: expected a number of seconds (0: stop with the command)") from None
    return max(idle, 0.0) if fcntl is not None else 0.0


def prefect_home() -> Path:
    """Prefect's home folder as Prefect resolves it from the environment (its database lives there by default)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def server_key() -> str:
    """What decides the database and settings a server serves: a server started under another key is not reused."""
    from importlib.metadata import version

    settings = sorted((k, v) for k, v in os.environ.items() if k in ("PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH")
                      or k.startswith(("PREFECT_API_DATABASE", "PREFECT_SERVER_", "PREFECT__")))
    raw = json.dumps([sys.executable, version("prefect"), settings])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def take_lease(home: Path, timeout: float = 60.0) -> IO[bytes]:
    """Hold the shared lease on `home`'s server for as long as the returned file stays open (this process's
    life): its watchdog does not stop it meanwhile. Waits while a server is stopping (it holds the lease)."""
    assert fcntl is not None
    home.mkdir(parents=True, exist_ok=True)
    lease = open(home / LEASE, "ab")  # noqa: SIM115 - held for the process's life
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lease.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            return lease
        except BlockingIOError:
            if time.monotonic() > deadline:
                lease.close()
                raise RuntimeError(f"the local Prefect server of {home} did not finish stopping within {timeout:.0f} s "
                                   f"(its lock: {home / LEASE})") from None
            time.sleep(0.02)


@contextlib.contextmanager
def spawn_lock(home: Path) -> Any:
    """One command at a time decides whether to reuse or start `home`'s server (no two started at once)."""
    assert fcntl is not None
    with open(home / SPAWN_LOCK, "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def read_record(home: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((home / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"pid", "port", "key"} <= record.keys() else None


def write_record(home: Path, pid: int, port: int, key: str) -> None:
    path = home / RECORD
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps({"pid": pid, "port": port, "key": key, "started_at": time.time()}))
    os.replace(scratch, path)  # readers see the old record or the new one, never half of one


def _watch(server: Any, lease_path: Path, idle: float, home: Path | None) -> None:
    """Stop `server` once no command has held the lease for `idle` seconds; keep the lease while stopping."""
    assert fcntl is not None
    lease = open(lease_path, "ab")  # noqa: SIM115 - held until the process exits
    last_used = time.monotonic()
    while not server.should_exit:
        try:
            fcntl.flock(lease.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            last_used = time.monotonic()
        else:
            if time.monotonic() - last_used >= idle:
                if home is not None:  # no command can take the lease now: forget this server, then stop it
                    record = read_record(home)
                    if record is not None and record["pid"] == os.getpid():
                        with contextlib.suppress(OSError):
                            (home / RECORD).unlink()
                server.should_exit = True
                return  # the lease stays held until the process exits
            fcntl.flock(lease.fileno(), fcntl.LOCK_UN)
        time.sleep(min(1.0, max(idle / 4, 0.1)))


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.local_server PORT LEASE IDLE [HOME]`: Prefect's API on 127.0.0.1:PORT until no command
    has held LEASE for IDLE seconds; with HOME, it is the server recorded there. Exit code 3: port taken."""
    import uvicorn

    port, lease, idle = (argv or sys.argv[1:])[:3]
    home = (argv or sys.argv[1:])[3:4]
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", int(port)))
    except OSError:
        sys.exit(3)  # flows.runners.ADDRESS_IN_USE: the command picks another port
    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, log_level="error", lifespan="on")
    server = uvicorn.Server(config)
    if fcntl is not None:
        threading.Thread(target=_watch, args=(server, Path(lease), float(idle), Path(home[0]) if home else None),
                         daemon=True, name="idle-watchdog").start()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
