"""`rollout ci` as a user runs it on a laptop: its own process, no PREFECT_API_URL. The command starts
Prefect's temporary server itself (while it imports its flow), records the run there, stops it at exit, and
ends with the command's exit code."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_policy

pytestmark = pytest.mark.slow


def _rollout(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200",
               PYTHONPATH=str(ROOT))
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
def test_ci_runs_on_its_own_temporary_server_and_leaves_nothing_running(tmp_path: Path):
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
