"""Fixtures of the serving tests: fake models, an in-memory registry, a temporary outcome store."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from rollout.config import Policy
from rollout.registry import InMemoryRegistry
from rollout.outcomes import OutcomeStore
from serving.app import create_app

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA = {"income": "double", "tier": "string", "purpose": "string"}


class FakeModel:
    """Logistic in income: P(1) = sigmoid(income - shift); declares its input columns like a signature."""

    input_schema = SCHEMA
    nullable = ("purpose",)
    classes_ = np.array([0, 1])

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.calls: list[int] = []

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        self.calls.append(len(frame))
        p = 1.0 / (1.0 + np.exp(-(frame["income"].to_numpy(dtype=float) - self.shift)))
        return np.c_[1 - p, p]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(frame)[:, 1] >= 0.5).astype(int)


class RaisingModel(FakeModel):
    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        raise RuntimeError("challenger exploded")


class SleepingModel(FakeModel):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        time.sleep(self.seconds)
        return super().predict_proba(frame)


class GarbageModel(FakeModel):
    """Returns one row too few: a wrong-length answer must be caught, not served."""

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return super().predict_proba(frame)[:-1]


class DyingModel(FakeModel):
    """Kills its own process on a poison input (income > 100), as a segfault or an OOM kill would."""

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if (frame["income"].to_numpy(dtype=float) > 100).any():
            import os

            os._exit(3)
        return super().predict_proba(frame)


def record(i: int = 0) -> dict[str, Any]:
    return {"income": float((i % 7) - 3), "tier": ("standard", "gold", "VIP")[i % 3], "purpose": "car"}


def make_policy(**serving: Any) -> Policy:
    """A policy for in-process tests. Challengers score in threads here (a child process costs ~3 s to start
    and stop); the tests of process isolation ask for it, and carry the `slow` marker."""
    defaults = {"max_wait_ms": 2.0, "shadow_max_wait_ms": 10.0, "shadow_timeout_s": 0.5, "reload_interval_s": 60.0,
                "shadow_isolation": "thread", "challenger_isolation": "thread"}
    return Policy.model_validate({"serving": {**defaults, **serving}})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ROLLOUT_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def store(tmp_path: Any) -> OutcomeStore:
    return OutcomeStore(f"sqlite:///{tmp_path / 'outcomes.db'}").create()


@pytest.fixture
def registry() -> InMemoryRegistry:
    reg = InMemoryRegistry()
    champion = reg.add(FakeModel(0.0))
    challenger = reg.add(FakeModel(1.0))
    reg.set_alias("champion", champion)
    reg.set_alias("challenger", challenger)
    return reg


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (startup, graceful shutdown) around an in-process async client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def app_for(policy: Policy, registry: Any, store: OutcomeStore, **kwargs: Any) -> Any:
    return create_app(policy, registry=registry, store=store, **kwargs)


@contextmanager
def mlflow_globals_restored(*env: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs (and these environment variables) as they were before,
    after a module-scoped fixture pointed them at its own temporary store."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *env)
    saved_env = {k: os.environ.get(k) for k in names}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
