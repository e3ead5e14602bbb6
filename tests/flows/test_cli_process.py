"""`rollout ci` as a user runs it on a laptop: its own process, no PREFECT_API_URL. The command starts
Prefect's local server itself (while it imports its flow) and records the run there; the server stays for the
next command until it has been idle ROLLOUT_PREFECT_IDLE_SECONDS, or stops with the command when that is 0.
The command ends with its own exit code."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_policy

pytestmark = pytest.mark.slow


def _rollout(tmp_path: Path, *args: str, idle: str = "0") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200",
               PYTHONPATH=str(ROOT), ROLLOUT_PREFECT_IDLE_SECONDS=idle)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def _servers_of(home: Path) -> list[int]:
    """Live processes whose environment names this PREFECT_HOME (the temporary server would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find a leftover server")
def test_ci_with_no_idle_time_runs_on_its_own_server_and_leaves_nothing_running(tmp_path: Path):
    config = write_policy(tmp_path)
    done = _rollout(tmp_path, "ci", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert "registered version 1 as @champion" in said, said
    assert "View at" not in done.stdout + done.stderr  # no link to a UI that is gone once the command ends
    assert _servers_of(tmp_path / "prefect") == []

    # The run is in Prefect's database under PREFECT_HOME, its logs to the very last line: the log worker
    # drained into the server before the server was stopped.
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        runs = db.execute("SELECT name, state_type FROM flow_run").fetchall()
        tasks = db.execute("SELECT count(*) FROM task_run WHERE state_type = 'COMPLETED'").fetchone()[0]
        last = db.execute("SELECT count(*) FROM log WHERE message LIKE 'Finished in state Completed%'").fetchone()[0]
    assert [state for _, state in runs] == ["COMPLETED"] and tasks >= 15 and last >= 1, (runs, tasks, last)

    # A failed gate still exits 1 (the quick exit keeps the command's code), and nothing was registered.
    strict = write_policy(tmp_path, ci={"floor": 0.99})
    done = _rollout(tmp_path, "ci", "--config", str(strict))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Nothing was registered" in done.stdout, done.stdout
    assert _servers_of(tmp_path / "prefect") == []


def _wait_gone(home: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _servers_of(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the server")
def test_the_next_command_reuses_the_kept_server_which_stops_once_idle(tmp_path: Path):
    home = tmp_path / "prefect"
    config = write_policy(tmp_path)
    done = _rollout(tmp_path, "ci", "--config", str(config), idle="6")
    assert done.returncode == 0, done.stdout + done.stderr
    servers = _servers_of(home)
    record = json.loads((home / "rollout-server.json").read_text())
    assert servers == [record["pid"]], (servers, record)  # one server, named for the next command

    # The next command (a failed gate: exit 1, nothing registered) runs on the same server, so its run sits in
    # the same database beside the first.
    strict = write_policy(tmp_path, ci={"floor": 0.99})
    done = _rollout(tmp_path, "ci", "--config", str(strict), idle="6")
    assert done.returncode == 1 and "Nothing was registered" in done.stdout, done.stdout + done.stderr
    assert _servers_of(home) == [record["pid"]]
    with sqlite3.connect(home / "prefect.db") as db:
        states = sorted(state for (state,) in db.execute("SELECT state_type FROM flow_run"))
    assert states == ["COMPLETED", "FAILED"], states

    # Idle for 6 s, it stops by itself and forgets its record.
    assert _wait_gone(home, 6 + 10) == []
    assert not (home / "rollout-server.json").exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the server")
def test_a_killed_kept_server_is_replaced_and_a_command_keeps_its_server_while_it_runs(tmp_path: Path, monkeypatch):
    """The kept server's bookkeeping without a flow: a server killed with SIGKILL (its record left behind) is
    replaced by the next command, and a server stays up however long a command holding it runs."""
    from flows.runners import TemporaryServer

    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("ROLLOUT_PREFECT_IDLE_SECONDS", "1")
    first = TemporaryServer()
    first.wait(120)
    second = TemporaryServer()  # another command meanwhile: the same server
    assert (second.pid, second.reused) == (first.pid, True)
    second.wait(5)
    time.sleep(3)  # three times the idle time, with commands holding it
    assert _servers_of(home) == [first.pid]

    os.kill(first.pid, signal.SIGKILL)
    os.waitpid(first.pid, 0)
    third = TemporaryServer()  # the record names a dead server: a new one
    third.wait(120)
    assert third.pid != first.pid and not third.reused
    assert json.loads((home / "rollout-server.json").read_text())["pid"] == third.pid

    for command in (first, second, third):  # the commands end
        command._lease.close()
    assert _wait_gone(home, 1 + 10) == []


def test_an_idle_time_that_is_not_a_number_is_refused_by_name(tmp_path: Path):
    done = _rollout(tmp_path, "ci", "--config", str(write_policy(tmp_path)), idle="ten minutes")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ROLLOUT_PREFECT_IDLE_SECONDS='ten minutes'" in " ".join(done.stdout.split())
    assert _servers_of(tmp_path / "prefect") == []


def test_an_outcome_store_that_cannot_be_opened_is_one_line_naming_the_setting(tmp_path: Path, monkeypatch):
    """A command and the service against a PostgreSQL store nobody listens for (a wrong port, a database not made
    yet): exit 2 with the URL (no password) and the settings to check, not a page of traceback."""
    write_policy(tmp_path)
    monkeypatch.setenv("ROLLOUT_OUTCOME_STORE_URL", "postgresql+psycopg://team:s3cret@127.0.0.1:9/outcomes")
    for args in (["history", "--config", "rollout.yaml"], ["serve", "--config", "rollout.yaml", "--port", "0"]):
        done = _rollout(tmp_path, *args)
        said = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 2, said
        assert "outcome store postgresql+psycopg://team:***@127.0.0.1:9/outcomes cannot be opened" in said, said
        assert "stores.outcome_store_url or ROLLOUT_OUTCOME_STORE_URL" in said and "createdb" in said
        assert "Traceback" not in said and "s3cret" not in said
