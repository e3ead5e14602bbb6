"""A schema-driven fuzz run from the service's own OpenAPI document: no request gets a 5xx, on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout.outcomes import OutcomeStore
from rollout.registry import InMemoryRegistry
from tests.serving.conftest import AUTH, FakeModel, app_for, make_policy

pytestmark = pytest.mark.slow  # a few hundred requests per endpoint


@pytest.fixture
def client(store_url: str) -> Iterator[TestClient]:
    registry = InMemoryRegistry()
    registry.set_alias("champion", registry.add(FakeModel(0.0)))
    registry.set_alias("challenger", registry.add(FakeModel(1.0)))
    store = OutcomeStore(store_url).create()
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"challenger": 0.5}, "salt")
    with TestClient(app_for(make_policy(), registry, store)) as c:
        yield c
    store.dispose()


@pytest.mark.parametrize("operation", ["POST /predict", "POST /labels", "PUT /routing", "GET /routing", "POST /invocations",
                                       "POST /v2/models/{name}/infer"])
def test_no_fuzzed_request_gets_a_server_error(client: TestClient, operation: str) -> None:
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    method, path = operation.split()
    strategy = schema[path][method.upper()].as_strategy()
    seen: list[int] = []

    @given(case=strategy, authorised=st.booleans())
    @settings(max_examples=200, deadline=None, database=None, derandomize=True,  # the same cases every run
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case, authorised: bool) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != "authorization"}
        if authorised:  # past the token check, so the body's own checks are what is fuzzed
            headers.update(AUTH)
        url = kwargs.pop("url")
        if "/v2/models/" in url:  # the served model's name, so the body is what is fuzzed rather than the 404
            url = "http://testserver/v2/models/loan-approval/infer"
        response = client.request(kwargs.pop("method"), url, headers=headers, **kwargs)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)

    fuzz()
    assert len(seen) >= (1 if method == "GET" else 50)  # a GET has no body to vary
