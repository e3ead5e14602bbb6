"""Several replicas share the routing table: they agree on every assignment and on routing changes."""

from __future__ import annotations

import pytest

from rollout.outcomes import OutcomeStore
from tests.serving.conftest import AUTH, app_for, make_policy, record, serve


@pytest.mark.anyio
async def test_two_replicas_assign_every_unit_alike_and_see_routing_changes(registry, store: OutcomeStore) -> None:
    store.open_rollout("ab", {"champion": "1", "challenger": "2"}, {"champion": 0.5, "challenger": 0.5}, salt="s1")
    policy = make_policy()
    a = app_for(policy, registry, OutcomeStore(store.url))
    b = app_for(policy, registry, OutcomeStore(store.url))
    async with serve(a) as ca, serve(b) as cb:
        units = [f"customer-{i}" for i in range(60)]
        seen_a = [(await ca.post("/predict", json={"record": record(i), "unit_id": u})).json()["version"]
                  for i, u in enumerate(units)]
        seen_b = [(await cb.post("/predict", json={"record": record(i), "unit_id": u})).json()["version"]
                  for i, u in enumerate(units)]
        assert seen_a == seen_b and set(seen_a) == {"1", "2"}

        # An admin changes the weights through replica A; replica B follows on its next refresh.
        answer = await ca.put("/routing", json={"weights": {"champion": 1.0, "challenger": 0.0}}, headers=AUTH)
        assert answer.status_code == 200
        await b.state.service.refresh()
        after = [(await cb.post("/predict", json={"record": record(i), "unit_id": u})).json()["version"]
                 for i, u in enumerate(units)]
        assert set(after) == {"1"}
