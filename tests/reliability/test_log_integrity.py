"""One bad row never takes other callers' prediction logs with it: it is dead-lettered, the rest written."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from rollout.outcomes import OutcomeStore, PredictionRow

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize("poison", [
    {"ts": 1e300},  # overflows the day computation
    {"request_id": "x" * 65},  # longer than the column (PostgreSQL refuses it; SQLite stores it)
    {"unit_id": "u\x00nul"},  # a NUL byte (PostgreSQL refuses text with one)
    {"segment": "VIP" * 30},  # too long for the column: cut to 64 characters, a documented normalisation
], ids=["ts", "request_id", "nul", "segment"])
def test_a_poison_row_in_a_batch_of_500_loses_nothing_else(store_url: str, poison: dict) -> None:
    store = OutcomeStore(store_url, clock=lambda: T0).create()
    rid = store.open_rollout("shadow", {"champion": "1"}, started_at=T0)
    rows = [PredictionRow(f"r{i}", "1", rollout_id=rid, ts=T0, unit_id=f"u{i}", prediction=1.0, segment="VIP")
            for i in range(500)]
    rows[317] = replace(rows[317], **poison)
    written = store.log_predictions(rows)
    refused = store.dead_letters()
    assert written + refused == 500 and refused <= 1
    assert store.count_predictions(rid) == written
    if "ts" in poison or (store.is_sqlite is False and "segment" not in poison):
        assert refused == 1  # the database (or the store's own check) refused exactly the poison row
    if "segment" in poison:
        with store.engine.connect() as conn:
            longest = conn.exec_driver_sql("SELECT max(length(segment)) FROM predictions").scalar()
        assert refused == 0 and longest == 64
    assert store.evidence(rid).traffic["1"].requests == written  # the summaries count what was written
    store.dispose()
