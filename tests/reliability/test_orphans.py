"""Challenger child processes die with the service: a kill -9 of the service leaves none behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a service process and its child

SERVICES = {
    "shadow": textwrap.dedent("""
        import sys, time
        sys.path.insert(0, {root!r})
        from rollout.models import LoadedModel
        from serving.isolation import ChildScorer
        from tests.serving.conftest import FakeModel

        scorer = ChildScorer(LoadedModel(FakeModel(), "2"))
        scorer.ready.result(timeout=60)
        print(*[p.pid for p in scorer._pool._processes.values()], flush=True)
        time.sleep(600)
    """),
    "challenger": textwrap.dedent("""
        import asyncio, sys, time
        sys.path.insert(0, {root!r})
        from rollout.models import LoadedModel
        from serving.isolation import PipedScorer
        from tests.serving.conftest import FakeModel

        async def main():
            scorer = PipedScorer(LoadedModel(FakeModel(), "2"))
            await asyncio.wait_for(asyncio.wrap_future(scorer.ready), 60)
            print(scorer.pid, flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
    """),
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("kind", sorted(SERVICES))
def test_a_child_is_gone_within_seconds_of_a_kill_9_of_its_service(kind: str) -> None:
    root = str(Path(__file__).resolve().parents[2])
    service = subprocess.Popen([sys.executable, "-c", SERVICES[kind].format(root=root)], stdout=subprocess.PIPE,
                               text=True)
    try:
        child = int(service.stdout.readline().split()[0])
        assert _alive(child)
        os.kill(service.pid, signal.SIGKILL)
        killed = time.monotonic()
        while _alive(child) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        gone_after = time.monotonic() - killed
    finally:
        service.kill()
    assert not _alive(child)
    assert gone_after < 2.0  # it checks every 0.5 s
