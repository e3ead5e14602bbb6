"""Experiment, not a benchmark of shipped code: issue 19's paired prediction log on PostgreSQL, prototyped.

    .venv/bin/python benchmarks/experiments/paired_log.py 1000000 [lateral|union]   # prediction rows (default 1M)

Two databases get the same shadow rollout (`benchmarks/evaluation_scale.py`'s fill). One keeps today's log; in
the other the log is converted by hand: a partitioned `prediction_log` with one row per request (the champion's
columns and `shadow_version`, `shadow_prediction`, `shadow_score`, `shadow_latency_ms`, `shadow_error`,
`shadow_probabilities`), and a view named `predictions` that unpivots it, so every reader runs
unchanged (an INSTEAD OF INSERT trigger takes the hourly writes, unpaired). Reported: bytes per logged
prediction (indexes included), the first evaluation and four hourly ones on each (same hours appended), whether
the evidence is the same, and the slowest statements of the paired store's first hourly evaluation.
Findings of 2026-12-02 are in docs/architecture.md (the outcome store, bytes per logged prediction)."""
import sys, time, uuid, json
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
import psycopg
import evaluation_scale as E
from datetime import timedelta

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
# The view: 'lateral' (each paired row expanded by a LATERAL VALUES) or 'union' (UNION ALL, whose filtered second
# branch PostgreSQL cannot flatten into an append relation: request-id probes then scan every partition)
VIEW = sys.argv[2] if len(sys.argv) > 2 else "lateral"
COLS = "id, request_id, unit_id, rollout_id, ts, day, version, role, served, propensity, prediction, score, latency_ms, error, segment, features, probabilities"
SH = ("shadow_version", "shadow_prediction", "shadow_score", "shadow_latency_ms", "shadow_error", "shadow_probabilities")

def convert(url):
    dsn = url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as c:
        days = [r[0] for r in c.execute("select relname from pg_class where relname ~ '^predictions_[0-9]{8}$' and relkind='r' order by 1")]
        c.execute("CREATE TABLE prediction_log (LIKE predictions INCLUDING DEFAULTS) PARTITION BY RANGE (day)")
        c.execute("ALTER TABLE prediction_log ADD COLUMN shadow_version varchar(32), ADD COLUMN shadow_prediction float8, "
                  "ADD COLUMN shadow_score float8, ADD COLUMN shadow_latency_ms float8, ADD COLUMN shadow_error text, "
                  "ADD COLUMN shadow_probabilities text")
        days += ["predictions_20260331", "predictions_20260401"]
        for name in days:
            d = name[-8:]; day = f"{d[:4]}-{d[4:6]}-{d[6:]}"
            c.execute(f"CREATE TABLE log_{d} PARTITION OF prediction_log FOR VALUES FROM ('{day}') TO ('{day}'::date + 1)")
        c.execute(f"INSERT INTO prediction_log ({COLS}, {', '.join(SH)}) SELECT "
                  + ", ".join(f"c.{x.strip()}" for x in COLS.split(",")) +
                  ", s.version, s.prediction, s.score, s.latency_ms, s.error, s.probabilities FROM predictions c "
                  "LEFT JOIN predictions s ON s.request_id = c.request_id AND s.role <> 'champion' WHERE c.role = 'champion' ORDER BY c.ts")
        c.execute("ALTER SEQUENCE predictions_id_seq OWNED BY NONE")
        c.execute("DROP TABLE predictions")
        for d in days:  # the names ensure_days looks for
            c.execute(f"ALTER TABLE log_{d[-8:]} RENAME TO {d}")
        c.execute("CREATE INDEX ix_predictions_request ON prediction_log (request_id)")
        c.execute("CREATE INDEX ix_predictions_time ON prediction_log (rollout_id, ts)")
        c.execute("CREATE INDEX ix_predictions_features ON prediction_log (ts) WHERE served = 1 AND features IS NOT NULL")
        view = {"union": f"CREATE VIEW predictions AS SELECT {COLS} FROM prediction_log UNION ALL SELECT id, request_id, "
                "unit_id, rollout_id, ts, day, shadow_version, 'challenger'::varchar(32), 0, propensity, shadow_prediction, "
                "shadow_score, shadow_latency_ms, shadow_error, segment, NULL::text, shadow_probabilities FROM prediction_log "
                "WHERE shadow_version IS NOT NULL",
                "lateral": """CREATE VIEW predictions AS SELECT l.id, l.request_id, l.unit_id, l.rollout_id, l.ts, l.day,
                v.version, v.role, v.served, l.propensity, v.prediction, v.score, v.latency_ms, v.error, l.segment,
                v.features, v.probabilities
                FROM prediction_log l CROSS JOIN LATERAL (VALUES
                  (l.version, l.role, l.served, l.prediction, l.score, l.latency_ms, l.error, l.features, l.probabilities),
                  (l.shadow_version, 'challenger'::varchar(32), 0, l.shadow_prediction, l.shadow_score,
                   l.shadow_latency_ms, l.shadow_error, NULL::text, l.shadow_probabilities))
                  AS v(version, role, served, prediction, score, latency_ms, error, features, probabilities)
                WHERE v.version IS NOT NULL"""}[VIEW]
        c.execute(view)
        c.execute("""CREATE FUNCTION predictions_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO prediction_log (request_id, unit_id, rollout_id, ts, day, version, role, served, propensity,
              prediction, score, latency_ms, error, segment, features, probabilities)
            VALUES (NEW.request_id, NEW.unit_id, NEW.rollout_id, NEW.ts, NEW.day, NEW.version, NEW.role, NEW.served,
              NEW.propensity, NEW.prediction, NEW.score, NEW.latency_ms, NEW.error, NEW.segment, NEW.features,
              NEW.probabilities); RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER predictions_insert INSTEAD OF INSERT ON predictions FOR EACH ROW EXECUTE FUNCTION predictions_insert()")
        c.execute("VACUUM ANALYZE prediction_log")
        c.execute("CHECKPOINT")

def size(url, rel):
    dsn = url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn) as c:
        return c.execute("select sum(pg_total_relation_size(i.inhrelid)) from pg_inherits i where i.inhparent = %s::regclass", (rel,)).fetchone()[0]

def evaluate(url, rid, hour):
    from rollout.outcomes import OutcomeStore
    from rollout.cd.decision import decide
    from rollout.cd.evaluation import gather
    store = OutcomeStore(url); store._created = True
    policy = E._policy()
    from sqlalchemy import event
    timings = []
    @event.listens_for(store.engine, "before_cursor_execute")
    def _b(conn, cur, st, params, ctx, many):
        conn.info["t0"] = time.perf_counter()
    @event.listens_for(store.engine, "after_cursor_execute")
    def _a(conn, cur, st, params, ctx, many):
        timings.append((time.perf_counter() - conn.info["t0"], st, params))
    evaluate.timings = timings
    start = time.perf_counter()
    ev = gather(store, store.rollout(rid), policy, E.T0 + timedelta(days=E.DAYS, hours=hour), training=None)
    decide(policy.rollout, ev)
    s = time.perf_counter() - start
    ch = ev.challengers[0]
    key = (sum(m.n for m in ch.paired.values()), round(sum(m.total for m in ch.paired.values()), 6),
           sum(m.n for m in ev.champion_loss.values()), ch.requests, ch.errors)
    store.dispose()
    return s, key

admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True)
names = {k: f"rollout_proto_{k}_{uuid.uuid4().hex[:6]}" for k in ("table", "paired")}
urls = {}
for k, n in names.items():
    admin.execute(f'CREATE DATABASE "{n}"'); urls[k] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{n}"
try:
    rids = {}
    for k in names:
        rids[k], s = E.fill(urls[k], ROWS, 1); print(k, "filled", round(s, 1), flush=True)
    before = size(urls["paired"], "predictions")
    t = time.perf_counter(); convert(urls["paired"]); print("converted", round(time.perf_counter() - t, 1), flush=True)
    out = {"bytes_per_prediction": {"table": float(before) / ROWS, "paired": float(size(urls["paired"], "prediction_log")) / ROWS}}
    print(out, flush=True)
    res = {k: [] for k in names}
    for k in names:
        s, key = evaluate(urls[k], rids[k], 0); print(k, "cold", round(s, 3), key, flush=True); res[k].append(("cold", s, key))
    for hour in range(1, 5):
        for k in (names if hour % 2 else list(names)[::-1]):
            from rollout.outcomes import OutcomeStore
            orig = OutcomeStore.create
            OutcomeStore.create = lambda self, log_indexes=True: (setattr(self, "_created", True), self)[1]
            try:
                w = E.add_hour(urls[k], ROWS, rids[k], hour, 1)
            finally:
                OutcomeStore.create = orig
            s, key = evaluate(urls[k], rids[k], hour)
            if hour == 1 and k == "paired":
                for t, st, prm in sorted(evaluate.timings, key=lambda x: -x[0])[:3]:
                    print("   ", k, round(t, 3), " ".join(st.split())[:300])
            print(k, "hour", hour, "write", round(w, 2), "eval", round(s, 3), key, flush=True); res[k].append((hour, s, key))
    same = all(a[2] == b[2] for a, b in zip(res["table"], res["paired"]))
    print(json.dumps({"same_evidence": same, **out, "eval_s": {k: [round(x[1], 3) for x in v] for k, v in res.items()}}))
finally:
    for n in names.values():
        admin.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
