"""Label requests in the store: the pool a batch draws from, the batches and their drawn rows, and the requested
rows with their labels for the evaluation (`rollout.cd.label_requests` decides what to draw)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import and_, func, insert, select
from sqlalchemy.engine import Engine

from rollout.outcomes.engine import chunks
from rollout.outcomes.features import Decoder
from rollout.outcomes.schema import label_request_batches, label_requests, labels, predictions
from rollout.times import day_of

POOL_COLUMNS = ["request_id", "unit_id", "ts", "version", "prediction", "score"]
REQUESTED_COLUMNS = ["request_id", "probability", "unit_id", "ts", "version", "prediction", "score", "label",
                     "label_ts", "segment"]


def pool(engine: Engine, rollout_id: int) -> tuple[float, pd.DataFrame]:
    """Where the last batch of the rollout ended (-inf before the first), and the rollout's error-free rows
    logged after it: every row a new batch may draw, each request once over the rollout's batches."""
    b, p = label_request_batches, predictions
    with engine.connect() as conn:
        after = conn.execute(select(func.max(b.c.ts_to)).where(b.c.rollout_id == rollout_id)).scalar()
        start = -math.inf if after is None else float(after)
        where = [p.c.rollout_id == rollout_id, p.c.error.is_(None)]
        if math.isfinite(start):
            where += [p.c.day >= day_of(start), p.c.ts > start]
        rows = conn.execute(select(*(p.c[c] for c in POOL_COLUMNS)).where(*where)).all()
    return start, pd.DataFrame.from_records(rows, columns=POOL_COLUMNS)


def save(engine: Engine, rollout_id: int, created_at: float, ts_from: float, ts_to: float, pool_size: int,
         budget: int, chosen: Sequence[tuple[str, float]]) -> int:
    """One batch and its drawn rows (request id, inclusion probability), in one transaction; returns its id."""
    with engine.begin() as conn:
        key = conn.execute(insert(label_request_batches).values(
            rollout_id=rollout_id, created_at=created_at, ts_from=ts_from if math.isfinite(ts_from) else -1e18,
            ts_to=ts_to, pool=pool_size, budget=budget, requested=len(chosen))).inserted_primary_key
        assert key is not None
        batch = key[0]
        if chosen:
            conn.execute(insert(label_requests), [
                {"rollout_id": rollout_id, "request_id": rid, "batch_id": int(batch), "probability": float(pi)}
                for rid, pi in chosen])
    return int(batch)


def details(engine: Engine, rollout_id: int, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What a person labelling a request sees: its unit, time, segment and logged features (the served row's)."""
    p = predictions
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        decode = Decoder(conn)
        for chunk in chunks(list(request_ids), 500):
            query = (select(p.c.request_id, p.c.unit_id, p.c.ts, p.c.segment, p.c.features)
                     .where(p.c.rollout_id == rollout_id, p.c.request_id.in_(chunk), p.c.served == 1))
            for rid, unit, ts, segment, features in conn.execute(query):
                out[str(rid)] = {"unit_id": unit, "ts": float(ts), "segment": segment,
                                 "features": decode.text(features)}
    return out


def requested(engine: Engine, rollout_id: int) -> pd.DataFrame:
    """Every requested row of the rollout: each version's error-free prediction of the request, its inclusion
    probability, and its current label (NaN while none has come)."""
    r, p, lab = label_requests, predictions, labels
    join = (r.join(p, and_(p.c.rollout_id == r.c.rollout_id, p.c.request_id == r.c.request_id, p.c.error.is_(None)))
            .outerjoin(lab, and_(lab.c.request_id == r.c.request_id, lab.c.current == 1)))
    query = (select(r.c.request_id, r.c.probability, p.c.unit_id, p.c.ts, p.c.version, p.c.prediction, p.c.score,
                    lab.c.label, lab.c.ts, p.c.segment).select_from(join).where(r.c.rollout_id == rollout_id))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    frame = pd.DataFrame.from_records(rows, columns=REQUESTED_COLUMNS)
    return frame.astype({"label": float, "label_ts": float, "prediction": float, "score": float})
