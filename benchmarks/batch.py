"""Batch rollouts at scale: a file scored by `rollout score` in shadow mode against a bare loop, its peak memory
against the input's size, and a run killed half-way and restarted logging every row exactly once.

    .venv/bin/python benchmarks/batch.py            # 1,000,000 rows (memory compared with 200,000)
    .venv/bin/python benchmarks/batch.py --quick    # 100,000 rows (memory compared with 20,000)

Setup: the example's logistic-regression pipeline registered twice in a local MLflow registry (champion and
challenger, different seeds), a shadow rollout open in a SQLite outcome store, and the example generator's
rows as a Parquet file with an application id. Each contender runs in its own process, so its peak resident
memory (and its children's: the challenger's child process) is its own:

- `rollout score`: `serving.batch.score_file` as the CLI runs it (chunks of `CHUNK_ROWS`, 10,000 rows, the
  challenger in a child process, every prediction logged, the answers written to Parquet);
- bare loop: the same chunks read from the same file, each model's `LoadedModel.predict` on the chunk's frame
  (predict_proba and the label), the two rows of every request built and logged with `log_predictions` into
  an outcome store of its own, the served row with its inputs as JSON (pandas' `to_json`, one call a chunk):
  the least any tool must do for the same result, without the checks against the input contract, routing,
  isolation, redaction and the output file. Both are timed from before they load their models.

Memory: the target (< 500 MB) is the scoring process's peak resident memory. Its child (the challenger,
isolated so a crash or hang costs only its own rows) is a second interpreter with scikit-learn and pandas:
~240 MB resident, about half of it the same library files the parent maps. Both are reported, and the two
counted as the machine counts them: the peak of the sum of their proportional set sizes (PSS: a page shared by
the two counts half in each). `serving.shadow_isolation: thread` runs without the child.

Then a run on its own store is killed (SIGKILL, with its child) once 40% of its rows are logged, and run again
with the same batch id: every request must be logged exactly once per version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _common import emit_json, example_policy, parser, print_table, shadow_pair, verdict  # noqa: E402

from serving.batch import CHUNK_ROWS as CHUNK  # noqa: E402  (rollout score's default, for both contenders)

TARGET_RATIO = 0.8  # rollout score's throughput over the bare loop's, at least
TARGET_MB = 500.0  # peak memory of the scoring process, at most
TARGET_FLAT = 1.25  # peak memory at the full size over at a fifth of it, at most


def _proc_mb(pid: int | str, file: str, field: str) -> float:
    """A figure in kB of /proc/<pid>/<file>, in MB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _hwm_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM): its own, reset by exec (getrusage's maxrss is not: a worker
    would report its parent's peak)."""
    return _proc_mb(pid, "status", "VmHWM")


def _pss_mb(pid: int | str) -> float:
    """A process's proportional set size now (shared pages split among the processes sharing them)."""
    return _proc_mb(pid, "smaps_rollup", "Pss")


class _ChildPeaks:
    """Samples the peak memory of this process's children (the challenger's child) every 0.2 s, and the peak
    of this process's and its children's PSS summed."""

    def __init__(self) -> None:
        import threading

        self.peaks: dict[int, float] = {}
        self.tree_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.2):
            children = self._children(me)
            for child in children:
                self.peaks[int(child)] = max(self.peaks.get(int(child), 0.0), _hwm_mb(child))
            self.tree_pss = max(self.tree_pss, _pss_mb(me) + sum(_pss_mb(c) for c in children))

    @staticmethod
    def _children(me: str) -> list[str]:
        out: list[str] = []
        for task in Path(f"/proc/{me}/task").iterdir():
            try:
                out += (task / "children").read_text().split()
            except OSError:
                continue
        return out

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0.0)


def _peak_mb(children: _ChildPeaks) -> tuple[float, float, float]:
    child = children.stop()
    return _hwm_mb(), child, children.tree_pss


def worker_score(policy_path: str, input_path: str, output_path: str, batch_id: str) -> None:
    from rollout.config import load_policy
    from serving.batch import score_file

    policy = load_policy(policy_path)
    watch = _ChildPeaks()
    started = time.perf_counter()
    summary = score_file(policy, Path(input_path), Path(output_path), batch_id=batch_id,
                         key_column="application_id", chunk_rows=CHUNK)
    wall = time.perf_counter() - started
    mine, children, tree = _peak_mb(watch)
    print(json.dumps({"wall_s": wall, "rows": summary.rows, "logged": summary.logged,
                      "already_logged": summary.already_logged, "peak_mb": mine, "child_peak_mb": children,
                      "tree_pss_mb": tree}))


def worker_bare(policy_path: str, input_path: str) -> None:
    from rollout.config import load_policy
    from rollout.models import LoadedModel
    from rollout.outcomes import OutcomeStore, PredictionRow
    from rollout.registry import MlflowRegistry
    from serving.batch import read_chunks

    policy = load_policy(policy_path)
    watch = _ChildPeaks()
    started = time.perf_counter()  # loading its models counts, as rollout score's does
    registry = MlflowRegistry.for_policy(policy)
    aliases = registry.aliases()
    champion, challenger = (LoadedModel(registry.load(aliases[a]), aliases[a]) for a in ("champion", "challenger"))
    store = OutcomeStore(policy.outcome_url).create()
    rid = store.open_rollout("shadow", {"champion": champion.version, "challenger": challenger.version}, {}, "s")
    rows = 0
    for chunk in read_chunks(Path(input_path), CHUNK):
        ids = [f"bare:{k}" for k in chunk["application_id"]]
        now = store.now()
        # the served row keeps the inputs as JSON, as rollout score logs them (pandas writes them in one call)
        features = chunk.drop(columns=["application_id"]).to_json(orient="records", lines=True,
                                                                    date_format="iso").splitlines()
        logged: list[PredictionRow] = []
        for model, role, served in ((champion, "champion", True), (challenger, "challenger", False)):
            out = model.predict(model.own(chunk))
            scores = out.scores or [None] * len(ids)
            logged += [PredictionRow(i, model.version, role, now, None, rid, served, None, p, s,
                                     features=f if served else None)
                       for i, p, s, f in zip(ids, out.predictions, scores, features, strict=True)]
        store.log_predictions(logged)
        rows += len(chunk)
    wall = time.perf_counter() - started
    mine, children, tree = _peak_mb(watch)
    print(json.dumps({"wall_s": wall, "rows": rows, "peak_mb": mine, "child_peak_mb": children,
                      "tree_pss_mb": tree}))


def _run(args: list[str], timeout: float = 7200.0) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _input(directory: Path, rows: int, seed: int) -> Path:
    """The example generator's rows without the label, with an application id, as Parquet (in pieces)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rollout.data import example_dataset

    path = directory / f"applications-{rows}.parquet"
    writer = None
    piece = 200_000
    for start in range(0, rows, piece):
        frame = example_dataset(rows=min(piece, rows - start), seed=seed + start).drop(columns=["approved"])
        frame.insert(0, "application_id", [f"a{start + i}" for i in range(len(frame))])
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path


def _policy(directory: Path, name: str, outcomes: str, seed: int) -> Path:
    import yaml

    policy = example_policy(directory, 6000, seed, outcomes)
    path = directory / name
    path.write_text(yaml.safe_dump(policy))
    return path


def _logged(url: str) -> tuple[int, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM predictions")).scalar_one()
        distinct = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT request_id, version FROM predictions) d")
                                ).scalar_one()
    engine.dispose()
    return int(total), int(distinct)


def _kill_and_restart(directory: Path, policy: Path, url: str, data: Path, rows: int) -> dict:
    """Kill a run once 40% of its rows are logged, run it again: (rows logged, distinct (request, version))."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = directory / "killed.parquet"
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "score", str(policy), str(data), str(out), "kill"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 3600
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            seen = _logged(url)[0]
        except Exception:  # noqa: BLE001 - the tables appear with the first write
            continue
        if seen >= 0.4 * 2 * rows:
            break
    killed_at = seen
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = _run(["--worker", "score", str(policy), str(data), str(out), "kill"])
    total, distinct = _logged(url)
    return {"rows": rows, "logged_when_killed": killed_at, "logged_by_rerun": again["logged"],
            "already_logged": again["already_logged"], "rows_logged": total, "distinct": distinct,
            "exactly_once": total == distinct == 2 * rows}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        worker_score(*rest) if kind == "score" else worker_bare(*rest)
        return
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="rows of the full file (default 1,000,000; --quick 100,000)")
    args = p.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    small = max(rows // 5, CHUNK)
    kill_rows = min(rows, 200_000)
    seed = args.seed % 2**31
    started = time.perf_counter()
    out: dict = {"rows": rows, "small_rows": small, "chunk_rows": CHUNK, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        champion_policy = _policy(directory, "rollout.yaml", "outcomes.db", seed)
        challenger_policy = _policy(directory, "challenger.yaml", "outcomes.db", seed + 1)
        stores = {name: _policy(directory, f"{name}.yaml", f"{name}.db", seed) for name in ("full", "small", "kill")}
        champion, challenger, _ = shadow_pair(champion_policy, challenger_policy, list(stores.values()))
        from rollout.config import load_policy

        bare_policy = _policy(directory, "bare.yaml", "bare.db", seed)
        full_input, small_input = _input(directory, rows, seed), _input(directory, small, seed)
        kill_input = full_input if kill_rows == rows else _input(directory, kill_rows, seed)
        print(f"{rows:,} rows in {full_input.stat().st_size / 1e6:.0f} MB of Parquet; champion v{champion}, "
              f"challenger v{challenger} (shadow)", flush=True)

        bare = _run(["--worker", "bare", str(bare_policy), str(full_input)])
        score = _run(["--worker", "score", str(stores["full"]), str(full_input), str(directory / "o.parquet"), "b"])
        small_run = _run(["--worker", "score", str(stores["small"]), str(small_input),
                          str(directory / "s.parquet"), "b"])
        kill = _kill_and_restart(directory, stores["kill"], load_policy(stores["kill"]).outcome_url, kill_input,
                                 kill_rows)

    ratio = (rows / score["wall_s"]) / (rows / bare["wall_s"])
    peak, tree, small_tree = score["peak_mb"], score["tree_pss_mb"], small_run["tree_pss_mb"]
    out.update({
        "score_rows_per_s": rows / score["wall_s"], "bare_rows_per_s": rows / bare["wall_s"],
        "throughput_ratio": ratio, "score_peak_mb": peak, "score_child_peak_mb": score["child_peak_mb"],
        "score_tree_pss_mb": tree, "bare_peak_mb": bare["peak_mb"], "small_tree_pss_mb": small_tree,
        "peak_mb": peak, "memory_growth": tree / small_tree, "kill": kill,
        "seconds": round(time.perf_counter() - started, 1),
    })
    table = [
        ["rollout score, shadow: rows/s", rows / score["wall_s"], "", ""],
        ["bare loop (two models' predict + logging): rows/s", rows / bare["wall_s"], "", ""],
        ["throughput, rollout score / bare loop", ratio, f">= {TARGET_RATIO}", verdict(ratio >= TARGET_RATIO)],
        [f"peak memory at {rows:,} rows, scoring process (MB)", peak, f"< {TARGET_MB:g}", verdict(peak < TARGET_MB)],
        ["  its child's peak; the bare loop's peak (MB)", f"{score['child_peak_mb']:.0f}; {bare['peak_mb']:.0f}", "",
         ""],
        ["  process + child, peak of their PSS summed (MB)", tree, "", ""],
        [f"process + child PSS at {rows:,} over at {small:,} rows", tree / small_tree, f"<= {TARGET_FLAT}",
         verdict(tree / small_tree <= TARGET_FLAT)],
        [f"killed at {kill['logged_when_killed']:,} of {2 * kill_rows:,} rows, rerun: logged exactly once",
         kill["exactly_once"], "True", verdict(bool(kill["exactly_once"]))],
    ]
    print_table("Batch scoring (one run; each contender in its own process)", ["figure", "value", "target", "status"],
                table)
    out["misses"] = [r[0] for r in table if r[-1] == "MISS"]
    emit_json(out)


if __name__ == "__main__":
    main()
