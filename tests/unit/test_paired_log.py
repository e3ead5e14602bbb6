"""PostgreSQL's paired prediction log (issue 19): a shadow request's champion row and shadow row logged together are
stored as one row of `prediction_log`, and every reader sees both through the `predictions` view, exactly as SQLite's
two rows; a log from before pairing converts in place, and a refused pair loses neither of its predictions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from rollout.outcomes import OutcomeStore, PredictionRow, partitions
from rollout.outcomes.schema import SHADOW_COLUMNS
from tests.conftest import fresh_pg_database

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 3, 1, 9, tzinfo=UTC)


@pytest.fixture
def pg() -> Iterator[str]:
    with fresh_pg_database("rollout_paired") as url:
        yield url


def _traffic(rollout_id: int) -> list[PredictionRow]:
    """Shadow requests (the champion with features, the shadow scored, failed or multiclass), a shadow row whose
    champion row is not in the call, a champion-only row, an A/B challenger's served row, a request with a second
    shadow (only one pairs), and traffic outside any rollout."""
    rows: list[PredictionRow] = []
    for i in range(40):
        ts = T0 + timedelta(minutes=7 * i)
        unit, seg = f"u{i % 9}", ("vip" if i % 3 == 0 else None)
        rows.append(PredictionRow(f"s{i}", "1", "champion", ts, unit, rollout_id, True, 1.0, float(i % 2), 0.3 + i / 100,
                                  2.0, None, seg, {"income": 1000.0 + i, "tier": "a"}))
        error = "timeout" if i % 10 == 4 else None
        rows.append(PredictionRow(f"s{i}", "2", "challenger", ts, unit, rollout_id, False, 1.0,
                                  None if error else float(i % 3 == 0), None if error else 0.6, 5.5, error, seg))
    rows.append(PredictionRow("lonely", "2", "challenger", T0, "u1", rollout_id, False, 1.0, 1.0, 0.9, 3.0))
    rows.append(PredictionRow("only", "1", "champion", T0, "u2", rollout_id, True, 1.0, 0.0, 0.2, 1.0))
    rows.append(PredictionRow("ab", "2", "challenger", T0, "u3", rollout_id, True, 0.1, 1.0, 0.8, 1.5))
    rows.append(PredictionRow("s0", "3", "challenger-2", T0, "u0", rollout_id, False, 1.0, 1.0, 0.7, 9.0, None, "vip"))
    rows.append(PredictionRow("outside", "1", "champion", T0, None, None, True, None, 1.0, 0.5, 1.0))
    rows.append(PredictionRow("multi", "1", "champion", T0, "u4", rollout_id, True, 1.0, 2.0, [0.1, 0.2, 0.7], 1.0))
    rows.append(PredictionRow("multi", "2", "challenger", T0, "u4", rollout_id, False, 1.0, 1.0, [0.2, 0.5, 0.3], 2.0))
    return rows


def _read(store: OutcomeStore, rollout_id: int, folder: Path) -> dict[str, object]:
    """What the readers give: the evidence's sums, the export (every column), the counts and times."""
    evidence = store.evidence(rollout_id)
    other = store.evidence(rollout_id, champion="2")  # paired with a version that was a shadow: its halves
    frame = pd.concat(pd.read_parquet(d.path) for d in store.export("2026-02-28", None, folder))
    frame = frame.sort_values(["request_id", "version"]).reset_index(drop=True)
    return {"loss": {m: {k: (v.n, round(v.total, 9)) for k, v in d.items()} for m, d in evidence.loss.items()},
            "paired": {m: {k: (v.n, round(v.total, 9)) for k, v in d.items()} for m, d in evidence.paired.items()},
            "paired_with_2": {m: {k: (v.n, round(v.total, 9)) for k, v in d.items()} for m, d in other.paired.items()},
            "count": store.count_predictions(rollout_id), "all": store.count_predictions(),
            "seen": (store.first_seen(rollout_id), store.last_seen(rollout_id)),
            "features": store.recent_features().to_dict("records"),
            "export": frame}


def test_a_shadow_request_is_one_row_and_every_reader_sees_what_sqlite_keeps(pg: str, tmp_path: Path) -> None:
    stores = {"sqlite": OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create(), "postgres": OutcomeStore(pg).create()}
    seen = {}
    for name, store in stores.items():
        rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
        rows = _traffic(rid)
        assert store.log_predictions(rows) == len(rows)  # predictions written, a pair counting two
        store.log_predictions([PredictionRow("late", "2", "challenger", T0, "u5", rid, False, 1.0, 0.0, 0.1, 1.0)])
        store.log_predictions([PredictionRow("late", "1", "champion", T0, "u5", rid, True, 1.0, 0.0, 0.1, 1.0)])
        store.add_labels([(f"s{i}", float(i % 2 == 0), T0 + timedelta(hours=12)) for i in range(40)]
                         + [("lonely", 1.0, T0), ("multi", 2.0, T0), ("late", 0.0, T0)])
        seen[name] = _read(store, rid, tmp_path / name)
    with stores["postgres"].engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*), count(shadow_version) FROM prediction_log")).one()
    # 40 shadow requests and the multiclass one paired; lonely, the second shadow and the late pair's halves alone
    assert tuple(stored) == (40 + 1 + 1 + 1 + 1 + 1 + 1 + 2, 41)
    pd.testing.assert_frame_equal(seen["postgres"].pop("export"), seen["sqlite"].pop("export"))
    assert seen["postgres"] == seen["sqlite"]
    assert seen["postgres"]["count"] == 2 * 40 + 7 + 2 - 1  # every logical row (the one outside the rollout apart)
    for store in stores.values():
        store.dispose()


def test_a_log_from_before_pairing_converts_in_place_and_an_old_writer_still_inserts(pg: str) -> None:
    store = OutcomeStore(pg).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    store.log_predictions(_traffic(rid)[:20])
    with store.engine.begin() as conn:  # back to the layout of before: the partitioned table itself `predictions`
        conn.execute(text("DROP VIEW predictions"))
        shadows = conn.execute(text(
            "SELECT request_id, unit_id, rollout_id, ts, day, shadow_version, shadow_role, shadow_prediction, "
            "shadow_score, shadow_latency_ms, shadow_error, segment FROM prediction_log "
            "WHERE shadow_version IS NOT NULL")).all()
        conn.execute(text("ALTER TABLE prediction_log " + ", ".join(f"DROP COLUMN {c}" for c in SHADOW_COLUMNS)))
        conn.execute(text("ALTER TABLE prediction_log RENAME TO predictions"))
        for r in shadows:
            conn.execute(text("INSERT INTO predictions (request_id, unit_id, rollout_id, ts, day, version, role, served, "
                              "propensity, prediction, score, latency_ms, error, segment) VALUES (:a, :b, :c, :d, :e, "
                              ":f, :g, 0, 1.0, :h, :i, :j, :k, :l)"),
                         dict(zip("abcdefghijkl", r, strict=True)))
    partitions._PARTITIONED.pop(pg, None)  # this process's note of the layout it made
    before = store.evidence(rid)
    store.dispose()

    again = OutcomeStore(pg).create()  # the next process to open it converts it
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT relkind FROM pg_class WHERE relname = 'predictions'")).scalar() == "v"
        assert conn.execute(text("SELECT count(*), count(shadow_version) FROM prediction_log")).one() == (20, 0)
        conn.execute(text("INSERT INTO predictions (request_id, ts, day, version, role) VALUES "  # an old writer
                          "('old-writer', :ts, '2026-03-01', '1', 'champion')"), {"ts": T0.timestamp()})
        conn.commit()
    after = again.evidence(rid)
    assert {m: {k: v.n for k, v in d.items()} for m, d in after.paired.items()} == \
        {m: {k: v.n for k, v in d.items()} for m, d in before.paired.items()}
    again.log_predictions(_traffic(rid)[20:40])  # new traffic is paired
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(shadow_version) FROM prediction_log")).one() == (31, 10)
        assert conn.execute(text("SELECT served FROM predictions WHERE request_id = 'old-writer'")).scalar() == 1
    assert again.count_predictions() == 20 + 20 + 1
    again.dispose()


def test_a_refused_pair_leaves_both_predictions_in_the_dead_letters(pg: str) -> None:
    store = OutcomeStore(pg).create()
    rid = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    rows = _traffic(rid)[:6]
    rows[2] = PredictionRow("s1", "1", "champion", T0, "u1", rid, True, 1.0, 1.0, 0.5, 2.0, None, "bad\x00segment")
    rows[3] = PredictionRow("s1", "2", "challenger", T0, "u1", rid, False, 1.0, 0.0, 0.4, 3.0, None, "bad\x00segment")
    assert store.log_predictions(rows) == 4  # the other two requests' pairs
    assert store.dead_letters() == 2
    with store.engine.connect() as conn:
        kept = conn.execute(text("SELECT payload FROM dead_letters ORDER BY id")).scalars().all()
    assert ['"version": "1"' in p and '"served": 1' in p for p in kept] == [True, False]
    assert ['"version": "2"' in p and '"served": 0' in p and '"latency_ms": 3.0' in p for p in kept] == [False, True]
    store.dispose()


def test_retention_counts_both_predictions_of_a_paired_row(pg: str) -> None:
    """A closed rollout's shadow traffic on two days: one day's partition is dropped whole, the other (shared with
    the open rollout) is cleaned row by row; either way a paired row is reported as its two predictions."""
    store = OutcomeStore(pg).create()
    old = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0)
    for day in (0, 1):  # 20 shadow requests a day, their two rows in one call
        store.log_predictions(replace(r, request_id=f"d{day}-{r.request_id}", ts=T0 + timedelta(days=day, minutes=i // 2))
                              for i, r in enumerate(_traffic(old)[:40]))
    current = store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt", T0 + timedelta(days=1))
    store.log_predictions(_traffic(current)[:4])  # the open rollout's rows share the first day
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(shadow_version) FROM prediction_log")).one() == (42, 42)
    expired = store.expire(T0 + timedelta(days=3))
    assert expired.predictions == 2 * 40  # 40 rows of each day, each a pair: 20 dropped with day one, 20 deleted
    assert expired.kept_open == 4 and "1 day partition(s) dropped" in expired.note
    assert store.count_predictions() == 4
    store.dispose()
