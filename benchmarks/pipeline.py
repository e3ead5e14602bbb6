"""The `ci-pipeline` flow end to end vs a bare scikit-learn cross_validate of the same pipeline, same folds.

    .venv/bin/python benchmarks/pipeline.py            # 100,000 rows, 3 alternating rounds
    .venv/bin/python benchmarks/pipeline.py --quick    # 20,000 rows, 1 round

The flow runs under Prefect's test harness (a throwaway local API) against a temporary policy whose
stores (MLflow SQLite, outcome store, reports) live in a temporary folder. One untimed warm-up run
(5,000 rows) creates the stores and registers the first model as @champion, so every timed run is the steady state
of CI: a new candidate judged against, and stress-tested beside, an existing champion. Timed runs
alternate with the bare CV (order flipped every round) so machine noise falls on both alike.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# benchmarks/statistics.py would shadow the stdlib `statistics` (MLflow imports it): keep this folder
# off the front of the path, last so `_common` still imports; the repo root goes first for flows/, tasks/.
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import yaml  # noqa: E402

from _common import emit_json, example_policy, parser, print_table, verdict  # noqa: E402
TARGET_RATIO = 2.0
WARMUP_ROWS = 5000


def write_policy(directory: Path, rows: int, seed: int, name: str = "rollout.yaml") -> Path:
    """The example policy (rollout.yaml) with its data size, seed and stores moved to `directory`."""
    policy = example_policy(directory, rows, seed)
    path = directory / name
    path.write_text(yaml.safe_dump(policy))
    return path


def bare_cv(policy_path: Path, n_jobs: int | None = None, capped: bool = False) -> tuple[float, list[float]]:
    """(seconds, validation scores) of sklearn's cross_validate on the flow's training rows and folds.

    Data generation and the split are outside the timer: they are the flow's work, not CV's. With
    `capped`, under the policy's ci.fit_threads cap, as the flow's folds run.
    """
    from sklearn.model_selection import cross_validate

    from rollout.ci import training
    from rollout.config import load_policy
    from rollout.data import infer_schema, load_dataset

    policy = load_policy(policy_path)
    frame = load_dataset(policy)
    schema = infer_schema(frame, policy.data)
    data = training.split(frame, schema, policy.data.holdout_fraction, policy.data.seed)
    pipeline = training.build_pipeline(schema, policy.estimator, policy.data.seed)
    limit = training.fit_threads(policy.ci.fit_threads if capped else None)
    start = time.perf_counter()
    with limit:
        out = cross_validate(
            pipeline, data.x_train, data.y_train,
            cv=training.folds(schema.task, policy.ci.cv_folds, policy.data.seed),
            scoring=training.SCORERS[policy.ci.metric],
            return_train_score=True,  # the overfit gate needs train scores; any CI doing CV computes them
            n_jobs=n_jobs,
        )
    return time.perf_counter() - start, [float(v) for v in out["test_score"]]


def run_flow(policy_path: Path) -> tuple[float, str, float]:
    """(seconds of the flow call, flow run id, mean CV validation score); the flow's chatter goes to stderr."""
    from flows.ci_pipeline import CIParameters, ci_pipeline

    with contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        state = ci_pipeline(config=str(policy_path), params=CIParameters(), return_state=True)
        seconds = time.perf_counter() - start
    outcome = state.result()
    overfit = next(g for g in outcome.gates if g.gate == "overfit")
    return seconds, str(state.state_details.flow_run_id), float(overfit.numbers["validation_mean"])


def task_breakdown(flow_run_id: str, expected_min: int = 10, wait_s: float = 20.0) -> tuple[dict[str, float], float]:
    """Seconds per task name (summed over runs of the same task) as recorded by the Prefect API, and the
    seconds in which any task ran (tasks side by side count once).

    Task states reach the API as events, a moment after the flow returns; poll until they settle.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    runs: list = []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) >= expected_min and all(r.state and r.state.is_final() and r.end_time for r in runs):
                break
            time.sleep(0.5)
    per_task: dict[str, float] = defaultdict(float)
    spans = []
    for r in runs:
        if r.start_time and r.end_time:
            per_task[r.name.rsplit("-", 1)[0]] += (r.end_time - r.start_time).total_seconds()
            spans.append((r.start_time, r.end_time))
    busy, end = 0.0, None
    for start, stop in sorted(spans):
        if end is None or start > end:
            busy, end = busy + (stop - start).total_seconds(), stop
        elif stop > end:
            busy, end = busy + (stop - end).total_seconds(), stop
    return dict(per_task), busy


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="example rows (default 100,000; --quick 20,000)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 3; --quick 1)")
    args = p.parse_args()
    rows = args.rows or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)

    from prefect.testing.utilities import prefect_test_harness

    from flows.runners import embedded_run

    flow_s: list[float] = []
    bare_s: list[float] = []
    par_s: list[float] = []
    cap_s: list[float] = []
    tasks: list[dict[str, float]] = []
    busy_s: list[float] = []
    same_scores = True
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp, \
            contextlib.redirect_stdout(sys.stderr), prefect_test_harness(server_startup_timeout=120), \
            embedded_run(force=True):  # as `rollout ci` runs it: the harness stands in for the embedded server
        policy_path = write_policy(Path(tmp), rows, args.seed % 2**31)
        # the champion only has to exist: a small table keeps the untimed warm-up short
        warmup_path = write_policy(Path(tmp), WARMUP_ROWS, args.seed % 2**31 + 1, "warmup.yaml")
        started = time.perf_counter()
        warm, _, _ = run_flow(warmup_path)
        print(f"warm-up flow run (creates stores, registers @champion): {warm:.1f} s", file=sys.stderr)
        for i in range(rounds):
            order = ("flow", "bare", "capped", "parallel") if i % 2 == 0 else ("parallel", "capped", "bare", "flow")
            for what in order:
                if what == "flow":
                    seconds, run_id, flow_score = run_flow(policy_path)
                    flow_s.append(seconds)
                    per_task_run, busy = task_breakdown(run_id)
                    tasks.append(per_task_run)
                    busy_s.append(busy)
                elif what == "bare":
                    seconds, bare_scores = bare_cv(policy_path)
                    bare_s.append(seconds)
                elif what == "capped":  # the same threads cap as the flow's folds (ci.fit_threads)
                    seconds, _ = bare_cv(policy_path, capped=True)
                    cap_s.append(seconds)
                else:  # the flow runs folds concurrently; the fair peer is CV with every core too
                    seconds, _ = bare_cv(policy_path, n_jobs=-1)
                    par_s.append(seconds)
                print(f"round {i + 1} {what}: {seconds:.2f} s", file=sys.stderr)
            same_scores &= abs(flow_score - sum(bare_scores) / len(bare_scores)) < 1e-9
        total = time.perf_counter() - started

    ratios = [f / b for f, b in zip(flow_s, bare_s, strict=True)]
    median = sorted(ratios)[len(ratios) // 2]
    flow_med, bare_med = sorted(flow_s)[len(flow_s) // 2], sorted(bare_s)[len(bare_s) // 2]
    cap_ratios = [f / b for f, b in zip(flow_s, cap_s, strict=True)]
    cap_median = sorted(cap_ratios)[len(cap_ratios) // 2]
    par_ratios = [f / b for f, b in zip(flow_s, par_s, strict=True)]
    par_median = sorted(par_ratios)[len(par_ratios) // 2]
    names = sorted({k for t in tasks for k in t}, key=lambda k: -sum(t.get(k, 0.0) for t in tasks))
    per_task = {k: sorted(t.get(k, 0.0) for t in tasks)[len(tasks) // 2] for k in names}
    outside = sorted(f - b for f, b in zip(flow_s, busy_s, strict=True))[len(flow_s) // 2]

    print_table(f"ci-pipeline flow vs bare cross_validate, {rows:,} rows (seconds per round)",
                ["round", "flow s", "bare CV s", "ratio"],
                [[i + 1, f, b, r] for i, (f, b, r) in enumerate(zip(flow_s, bare_s, ratios, strict=True))])
    print_table("Summary (medians over rounds)", ["figure", "value", "target", "status"], [
        ["flow seconds", flow_med, "", ""],
        ["bare CV seconds", bare_med, "", ""],
        ["ratio flow / bare CV", median, f"<= {TARGET_RATIO:g}", verdict(median <= TARGET_RATIO)],
        ["ratio flow / bare CV under the flow's ci.fit_threads cap", cap_median, "(peer with the same thread cap)", ""],
        ["ratio flow / bare CV with n_jobs=-1", par_median, "(peer using every core in processes)", ""],
        ["same mean CV score as the bare CV", str(same_scores), "True", verdict(same_scores)],
    ])
    print_table("Where the flow's time goes (Prefect task runs, median over rounds; folds and the final fit run "
                "side by side, so shares add up to more than 1)",
                ["task", "seconds", "share of flow", "x bare CV"],
                [[k, v, v / flow_med, v / bare_med] for k, v in per_task.items()]
                + [["(no task running: flow body, gate artifacts, orchestration)", outside, outside / flow_med,
                    outside / bare_med]])
    emit_json({
        "rows": rows, "rounds": rounds, "seed": args.seed,
        "flow_seconds": flow_med, "bare_cv_seconds": bare_med, "ratio_vs_bare_cv": median,
        "ratio_target": TARGET_RATIO, "pass": median <= TARGET_RATIO,
        "ratio_vs_capped_bare_cv": cap_median, "capped_bare_cv_seconds_rounds": cap_s,
        "ratio_vs_parallel_bare_cv": par_median, "parallel_bare_cv_seconds_rounds": par_s,
        "flow_seconds_rounds": flow_s, "bare_cv_seconds_rounds": bare_s, "ratios": ratios,
        "warmup_flow_seconds": warm, "cv_scores_identical": same_scores,
        "tasks_seconds": per_task, "outside_tasks_seconds": outside, "wall_seconds": round(total, 1),
    })


if __name__ == "__main__":
    main()
