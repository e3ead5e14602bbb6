"""Simulation study of the promotion engine: error rates, power, sample sizes, coverage, multiplicity,
bandit bias and regret, label requests, drift false alarms. Every figure is printed with its target; the last line of
stdout is one JSON object with all of them.

    .venv/bin/python benchmarks/statistics.py            # 10,000 runs per cell (drift: 1,000)
    .venv/bin/python benchmarks/statistics.py --quick    # 1,000 runs per cell (drift: 100)

Scenario (the example policy): shadow rollout on 0/1 loss, the two models disagree on 20% of requests,
non-inferiority margin 0.01, one-sided alpha 0.05, power 0.8 at a true difference of 0 (the planned
effect), 100 matured outcomes an hour, evaluated hourly for 14 days (336 looks).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

# This file is named like the stdlib module `statistics`: keep its folder off the front of the path so
# that `import statistics` in any library finds the stdlib, and put it last so `_common` still imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from _common import emit_json, parser, print_table, verdict  # noqa: E402
from rollout.config import BanditConfig, DataConfig, DriftConfig  # noqa: E402
from rollout.data import example_dataset, infer_schema  # noqa: E402
from rollout.stats import guardrails, sequential, simulation  # noqa: E402
from rollout.stats.moments import Moments  # noqa: E402
from rollout.ci.validation import drift_report  # noqa: E402

MARGIN = 0.01
ALPHA = 0.05
POWER = 0.8
MDE = 0.0  # planned true difference (non-inferiority: "no worse")
DISAGREEMENT = 0.2
LOOKS = 336  # hourly for 14 days
PER_LOOK = 100  # matured outcomes an hour
MULTIPLES = (0.0, 0.5, 1.0, 1.5, 2.0)
TRAIN_ROWS = 6000  # the example policy's training table
WINDOWS = (2000, 5000)  # production rows compared with it


def mc_se(p: float, runs: int) -> float:
    return math.sqrt(p * (1 - p) / runs)


def expected_samples(
    rng: np.random.Generator, design: simulation.Design, multiple: float, runs: int, n_fixed: float, max_n: float,
    n_star: float,
) -> tuple[float, float, float]:
    """(E[samples to decision] / n_fixed, its MC SE, promotion rate) when the true distance above the null is
    `multiple` x the planned one; decisions as the engine makes them (promote: lower > -M, reject: upper < -M),
    looks equally spaced up to the design's maximum, an undecided run counted at the maximum."""
    effect = -MARGIN + multiple * (MDE + MARGIN)
    looks = np.unique(np.ceil(max_n * np.arange(1, LOOKS + 1) / LOOKS).astype(np.int64))
    paths = simulation.paired_paths(rng, runs, looks, effect, DISAGREEMENT)
    with np.errstate(invalid="ignore"):  # inf width x zero SE at tiny n: no decision there anyway
        lower = simulation.lower_bounds(paths, design, MARGIN, ALPHA, n_star, float(looks[-1]))
        mean, _ = paths.mean_se()
        upper = 2 * mean - lower  # the bounds are symmetric about the estimate
        promote, reject = lower > -MARGIN, upper < -MARGIN
    decided = promote | reject
    ever = decided.any(axis=1)
    first = np.where(ever, decided.argmax(axis=1), looks.size - 1)
    stop = looks[first] / n_fixed
    promoted = ever & promote[np.arange(runs), first]
    return float(stop.mean()), float(stop.std(ddof=1) / math.sqrt(runs)), float(promoted.mean())


def thompson_regret(rng: np.random.Generator, runs: int, p_arms: tuple[float, ...]) -> tuple[float, float, float]:
    """(mean regret of Thompson allocation, regret of a uniform split, MC SE of the first) in lost successes."""
    res = simulation.simulate_thompson(rng, n_runs=runs, p_arms=p_arms)
    gap = max(p_arms) - np.asarray(p_arms)
    regret = res.counts @ gap
    uniform = res.counts.sum(axis=1).mean() / len(p_arms) * gap.sum()
    return float(regret.mean()), float(uniform), float(regret.std(ddof=1) / math.sqrt(runs))


def drift_alarms(seed: int, runs: int, window: int) -> dict[str, float]:
    """Share of null runs (training and production drawn from the same generator, fresh seeds each run)
    in which the drift rule flags any feature; and how often each half of the rule alone would have."""
    seeds = np.random.SeedSequence(seed).generate_state(2 * runs)
    rule = test_only = effect_only = 0
    for r in range(runs):
        train = example_dataset(rows=TRAIN_ROWS, seed=int(seeds[2 * r]))
        prod = example_dataset(rows=window, seed=int(seeds[2 * r + 1]))
        report = drift_report(train, prod, infer_schema(train, DataConfig()), DriftConfig())
        rule += not report.passed
        test_only += any(f.p_value < f.p_max for f in report.features)
        effect_only += any(f.effect_size > f.effect_max for f in report.features)
    return {"rule": rule / runs, "test_only": test_only / runs, "effect_only": effect_only / runs}


# ---- guardrails re-checked every hour (the decision-quality issue's scenarios)
GUARD_ALPHA = 0.05  # rollout.guardrail_alpha
GUARD_CHECKS = 5  # an A/B rollout: VIP floor, error rate, stability, latency, latency ratio
GUARD_MIN_TRIALS = 30


def floor_fails(rng: np.random.Generator, runs: int, per_hour: int, p: float, floor: float) -> np.ndarray:
    """Per run: did the floor guardrail reject at any of the 336 hourly looks (true proportion p)?"""
    a = GUARD_ALPHA / GUARD_CHECKS
    s = np.cumsum(rng.binomial(per_hour, p, size=(runs, LOOKS)), axis=1)
    t = per_hour * np.arange(1, LOOKS + 1)[None, :]
    log_m = guardrails.log_mixture(s, np.broadcast_to(t, s.shape), floor)
    return ((s / t < floor) & (log_m >= math.log(1 / a)) & (t >= GUARD_MIN_TRIALS)).any(axis=1)


def ceiling_fails(rng: np.random.Generator, runs: int, per_hour: int, p: float, ceiling: float) -> np.ndarray:
    a = GUARD_ALPHA / GUARD_CHECKS
    e = np.cumsum(rng.binomial(per_hour, p, size=(runs, LOOKS)), axis=1)
    t = per_hour * np.arange(1, LOOKS + 1)[None, :]
    log_m = guardrails.log_mixture(e, np.broadcast_to(t, e.shape), ceiling)
    return ((e / t > ceiling) & (log_m >= math.log(1 / a)) & (t >= GUARD_MIN_TRIALS)).any(axis=1)


def latency_fails(rng: np.random.Generator, runs: int, per_hour: int, share_within: float) -> np.ndarray:
    """The p99 latency guardrail at the limit: a call is within the limit with probability `share_within`
    (0.99: the true p99 is the limit). It rejects when the order-statistic lower bound of the p99 clears the
    limit, i.e. when fewer calls than the bound's rank are within it (distribution-free, so counts suffice)."""
    a = GUARD_ALPHA / GUARD_CHECKS / LOOKS
    within = np.cumsum(rng.binomial(per_hour, share_within, size=(runs, LOOKS)), axis=1)
    n = per_hour * np.arange(1, LOOKS + 1)
    rank = stats.binom.ppf(a, n, 0.99)  # the lower bound is the rank-th smallest call
    return (within < rank[None, :]).any(axis=1)


def stability_fails(rng: np.random.Generator, runs: int, per_day: int, exposure: float, swing: float,
                    days: int = 14) -> np.ndarray:
    """Challenger and champion with the same true day-to-day swing; the challenger gets `exposure` of the
    traffic. Checked on every complete day from the third."""
    a = GUARD_ALPHA / GUARD_CHECKS / days
    out = np.zeros(runs, dtype=bool)
    for r in range(runs):
        def day(n: int) -> Moments:
            return Moments.of((rng.random(n) < 0.2 + rng.normal(0, swing)).astype(float))
        ch = [day(int(per_day * exposure)) for _ in range(days)]
        champ = [day(int(per_day * (1 - exposure))) for _ in range(days)]
        out[r] = any(guardrails.stability_check(ch[:d], champ[:d], 2.0, a, MARGIN / 2).status == "fail"
                     for d in range(3, days + 1))
    return out


def srm_bandit_flags(rng: np.random.Generator, runs: int, per_hour: int, leak: float) -> np.ndarray:
    """Thompson-like allocation drifting over 336 hours; `leak` of the challenger's assignments are served by
    the champion (a broken router). Flagged when any look's propensity check says p < 0.001."""
    hours = np.arange(LOOKS)
    p_hour = np.clip(0.5 + 0.35 * np.sin(hours / 40.0), 0.05, 0.95)
    out = np.zeros(runs, dtype=bool)
    for r in range(runs):
        assigned = rng.random((LOOKS, per_hour)) < p_hour[:, None]
        served = assigned & (rng.random((LOOKS, per_hour)) >= leak)
        w = served / p_hour[:, None]
        sw, sw2 = np.cumsum(w.sum(1)), np.cumsum((w * w).sum(1))
        n = per_hour * (hours + 1)
        z = (sw - n) / np.sqrt(np.maximum(sw2 - n, 1e-9))
        out[r] = (np.minimum(1.0, 2 * stats.norm.sf(np.abs(z)) * LOOKS) < 0.001)[23:].any()  # from the second day
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, help="runs per cell (default 10,000; --quick 1,000)")
    p.add_argument("--drift-runs", type=int, help="runs per drift cell (default 1,000; --quick 100)")
    args = p.parse_args()
    runs = args.runs or (1000 if args.quick else 10_000)
    drift_runs = args.drift_runs or (100 if args.quick else 1000)
    cells = iter(np.random.SeedSequence(args.seed).spawn(64))  # one independent stream per cell

    def rng() -> np.random.Generator:
        return np.random.default_rng(next(cells))

    started = time.perf_counter()
    sigma = math.sqrt(DISAGREEMENT - MDE**2)
    mix = sequential.plan_mixture(sigma, MDE, MARGIN, ALPHA, POWER)
    gsd = sequential.plan_group_sequential(sigma, MDE, MARGIN, ALPHA, POWER, looks=LOOKS)
    se_alpha = mc_se(ALPHA, runs)
    alpha_limit = ALPHA + 2 * se_alpha
    rows: list[list] = []
    out: dict = {"runs": runs, "drift_runs": drift_runs, "seed": args.seed, "n_fixed": mix.n_fixed}
    print(f"runs per cell {runs:,}; n_fixed {mix.n_fixed:,.0f}; mixture cap {mix.cap:,.0f}; "
          f"OBF max_samples {gsd.max_samples:,.0f}; hourly looks of {PER_LOOK} for {LOOKS} h", flush=True)

    # ---- false promotion at a true difference of exactly -margin, hourly looks for 14 days
    common = dict(n_looks=LOOKS, per_look=PER_LOOK, margin=MARGIN, alpha=ALPHA, power=POWER, mde=MDE,
                  disagreement=DISAGREEMENT)
    with np.errstate(invalid="ignore"):
        fp = {
            "mixture": simulation.simulate_false_promotion(rng(), "mixture", n_runs=runs, **common),
            "obf": simulation.simulate_false_promotion(rng(), "obf", n_runs=runs, max_samples=gsd.max_samples, **common),
            "naive": simulation.simulate_false_promotion(rng(), "naive", n_runs=runs, **common),
        }
    for name in ("mixture", "obf"):
        r = fp[name]
        out[f"false_promotion_{name}"] = r.rate
        rows.append([f"false promotion, hourly looks, {name}", r.rate, r.mc_se, f"<= {alpha_limit:.4f} (alpha+2SE)",
                     verdict(r.rate <= alpha_limit)])
    r = fp["naive"]
    out["false_promotion_naive"] = r.rate
    rows.append(["false promotion, hourly looks, naive z", r.rate, r.mc_se, "0.38-0.46 (reference)",
                 verdict(0.38 <= r.rate <= 0.46)])

    # ---- power at the planned maximum, and what the maximum costs
    with np.errstate(invalid="ignore"):
        pw = {d: simulation.simulate_power(rng(), d, n_runs=runs, **{k: v for k, v in common.items() if k != "per_look"})
              for d in ("mixture", "obf")}
    for name, r in pw.items():
        limit = POWER - 2 * mc_se(POWER, runs)
        out[f"power_at_cap{'' if name == 'mixture' else '_obf'}"] = r.rate
        rows.append([f"power at the planned max, {name}", r.rate, r.mc_se, f">= {limit:.4f} (0.80-2SE)",
                     verdict(r.rate >= limit)])
    out["cap_over_n_fixed"] = mix.cap / mix.n_fixed
    out["obf_max_over_n_fixed"] = gsd.inflation
    # DESIGN.md guessed 1.64; the cap is calibrated so that power at it is 0.80 (the row above checks that), which
    # takes 1.77 here: the figure is reported, its target is the power row's
    rows.append(["cap / n_fixed, mixture", mix.cap / mix.n_fixed, "", "reported (~1.77 gives 80% power)", "PASS"])
    rows.append(["max_samples / n_fixed, OBF", gsd.inflation, "", "~1.07 +-5% (DESIGN)",
                 verdict(abs(gsd.inflation / 1.07 - 1) <= 0.05)])

    # ---- expected samples to decision / n_fixed at multiples of the planned distance from the null
    expected: dict[str, dict[str, float]] = {"mixture": {}, "obf": {}}
    promoted: dict[str, dict[str, float]] = {"mixture": {}, "obf": {}}
    ses: dict[str, dict[str, float]] = {"mixture": {}, "obf": {}}
    exp_rows: list[list] = []
    for design, max_n in (("mixture", mix.cap), ("obf", gsd.max_samples)):
        for k in MULTIPLES:
            ratio, se, prom = expected_samples(rng(), design, k, runs, mix.n_fixed, max_n, mix.n_star)
            expected[design][f"{k:g}x"] = ratio
            promoted[design][f"{k:g}x"] = prom
            ses[design][f"{k:g}x"] = se
            exp_rows.append([design, f"{k:g}x", -MARGIN + k * (MDE + MARGIN), ratio, se, prom])
    out["expected_n_ratio"] = expected
    out["promotion_rate_at_multiple"] = promoted
    plan_mix = mix.expected_n / mix.n_fixed
    rows.append(["E[n to decision]/n_fixed at 1x, mixture", expected["mixture"]["1x"], ses["mixture"]["1x"],
                 f"<= {plan_mix:.3f} (plan) +2SE", verdict(expected["mixture"]["1x"] <= plan_mix + 2 * ses["mixture"]["1x"])])
    rows.append(["E[n to decision]/n_fixed at 1x, OBF", expected["obf"]["1x"], ses["obf"]["1x"], "~0.78 +-0.05 (DESIGN)",
                 verdict(abs(expected["obf"]["1x"] - 0.78) <= 0.05)])

    # ---- group-sequential as decide() runs it without max_samples: its maximum planned at the first look with
    # min_samples outcomes from their standard deviation, hourly looks
    planned: dict[str, float] = {}
    for name, effect in (("null", -MARGIN), ("1x", MDE)):
        rate, stop, undecided = simulation.simulate_planned_obf(rng(), runs, effect, n_looks=LOOKS, per_look=PER_LOOK,
                                                                margin=MARGIN, alpha=ALPHA, power=POWER, mde=MDE,
                                                                disagreement=DISAGREEMENT, min_samples=500)
        planned.update({f"promoted_{name}": rate, f"expected_n_ratio_{name}": stop, f"undecided_{name}": undecided})
    out["planned_obf"] = planned
    rows.append(["false promotion, OBF with its max planned at the first look", planned["promoted_null"],
                 mc_se(planned["promoted_null"], runs), f"<= {alpha_limit:.4f} (alpha+2SE)",
                 verdict(planned["promoted_null"] <= alpha_limit)])
    rows.append(["E[n to decision]/n_fixed at 1x, OBF max planned at first look", planned["expected_n_ratio_1x"], "", "<= 0.85",
                 verdict(planned["expected_n_ratio_1x"] <= 0.85)])
    limit = POWER - 2 * mc_se(POWER, runs)
    rows.append(["power, OBF with its max planned at the first look", planned["promoted_1x"], mc_se(planned["promoted_1x"], runs),
                 f">= {limit:.4f} (0.80-2SE)", verdict(planned["promoted_1x"] >= limit)])

    # ---- time-uniform coverage of the mixture confidence sequence over the 336 looks
    cov = simulation.simulate_coverage(rng(), n_runs=runs, n_looks=LOOKS, per_look=PER_LOOK, effect=MDE,
                                       alpha=ALPHA / 2, n_star=mix.n_star, disagreement=DISAGREEMENT)
    cov_one = simulation.simulate_coverage(rng(), n_runs=runs, n_looks=LOOKS, per_look=PER_LOOK, effect=MDE,
                                           alpha=ALPHA, n_star=mix.n_star, disagreement=DISAGREEMENT)
    out["coverage"] = cov.both
    out["coverage_lower_one_sided"] = cov_one.lower
    limit = 0.95 - 2 * mc_se(0.95, runs)
    rows.append(["coverage at every look, two-sided 95% CS", cov.both, mc_se(cov.both, runs),
                 f">= {limit:.4f} (0.95-2SE)", verdict(cov.both >= limit)])
    rows.append(["coverage at every look, lower bound (alpha .05)", cov_one.lower, mc_se(cov_one.lower, runs),
                 f">= {limit:.4f} (0.95-2SE)", verdict(cov_one.lower >= limit)])

    # ---- A/B randomised by unit: 750 units per arm, ~20 visits each, within-unit correlation 0.2, the challenger
    # exactly the margin worse, hourly looks for 14 days; standard errors from unit sums vs from rows
    unit_runs = min(runs, 2000)
    unit_scenario = dict(units=750, visits=20, rho=0.2, margin=MARGIN, alpha=ALPHA, step_hours=1)
    for clustered in (True, False):
        rate = simulation.simulate_unit_false_promotion(rng(), unit_runs, clustered, **unit_scenario)
        key = "false_promotion_units_" + ("clustered" if clustered else "rows")
        out[key] = rate
        limit = ALPHA + 2 * mc_se(ALPHA, unit_runs)
        rows.append([f"false promotion, A/B by unit (corr 0.2, ~20 visits), {'unit' if clustered else 'row'} SE",
                     rate, mc_se(rate, unit_runs), f"<= {limit:.4f} (alpha+2SE)" if clustered else "> alpha (reference)",
                     verdict(rate <= limit) if clustered else verdict(rate > ALPHA)])

    # ---- A/B whose exposure is raised from 10% to 50% after 7 days while every model's loss drifts from 0.40 to
    # 0.30; the challenger exactly the margin worse: pooled means vs propensity-weighted (Hajek) ones
    for stratified in (True, False):
        rate = simulation.simulate_exposure_change(rng(), unit_runs, stratified, margin=MARGIN, alpha=ALPHA)
        key = "false_promotion_exposure_change_" + ("weighted" if stratified else "pooled")
        out[key] = rate
        limit = ALPHA + 2 * mc_se(ALPHA, unit_runs)
        rows.append([f"false promotion, A/B exposure 0.1 -> 0.5 mid-way, base drifting, "
                     f"{'weighted by propensity' if stratified else 'pooled means'}", rate, mc_se(max(rate, 0.01), unit_runs),
                     f"<= {limit:.4f} (alpha+2SE)" if stratified else "> alpha (reference)",
                     verdict(rate <= limit) if stratified else verdict(rate > ALPHA)])

    # ---- A/B/C: two challengers equal to the champion, shared control, fixed-horizon one-sided z tests
    rho = 0.5  # correlation of the two z statistics through the shared control
    exact = 1 - stats.multivariate_normal(cov=[[1, rho], [rho, 1]]).cdf([stats.norm.ppf(1 - ALPHA)] * 2)
    for corr in ("none", "bonferroni", "holm"):
        rate = simulation.simulate_family_wise_error(rng(), n_runs=runs, challengers=2, alpha=ALPHA, correction=corr)
        key = "fwer_uncorrected" if corr == "none" else f"fwer_{corr}"
        out[key] = rate
        if corr == "none":
            rows.append(["FWER A/B/C, uncorrected", rate, mc_se(rate, runs), f"{exact:.4f} +-2SE (exact; DESIGN ~0.088)",
                         verdict(abs(rate - exact) <= 2 * mc_se(exact, runs))])
        else:
            rows.append([f"FWER A/B/C, {corr}", rate, mc_se(rate, runs), f"<= {alpha_limit:.4f} (alpha+2SE)",
                         verdict(rate <= alpha_limit)])

    # ---- bandit: bias of naive vs IPW means after Thompson allocation (equal arms), and regret
    bandit = simulation.simulate_thompson(rng(), n_runs=runs)
    nb, nb_se = bandit.bias(bandit.naive)
    hb, hb_se = bandit.bias(bandit.horvitz_thompson)
    jb, _ = bandit.bias(bandit.hajek)
    worst = int(np.argmax(np.abs(hb) / hb_se))
    out.update(naive_bias=float(nb.mean()), ipw_bias=float(hb[worst]), hajek_bias=float(jb.mean()),
               naive_false_positive=bandit.naive_false_positive, ipw_false_positive=bandit.ipw_false_positive)
    rows.append(["bandit naive bias (mean over arms)", float(nb.mean()), float(nb_se.max()), "< -3SE (detectable)",
                 verdict(bool(np.all(nb < -3 * nb_se)))])
    rows.append(["bandit IPW (Horvitz-Thompson) bias, worst arm", float(hb[worst]), float(hb_se[worst]), "|bias| <= 3SE",
                 verdict(bool(np.all(np.abs(hb) <= 3 * hb_se)))])
    rows.append(["bandit Hajek bias (mean over arms)", float(jb.mean()), "", "|.| < |naive|/4",
                 verdict(bool(np.all(np.abs(jb) < np.abs(nb) / 4)))])
    rows.append(["bandit naive z false positives", bandit.naive_false_positive,
                 mc_se(bandit.naive_false_positive, runs), "> alpha+2SE (DESIGN ~0.13)",
                 verdict(bandit.naive_false_positive > alpha_limit)])
    rows.append(["bandit IPW z false positives", bandit.ipw_false_positive, mc_se(bandit.ipw_false_positive, runs),
                 f"<= {alpha_limit:.4f} (alpha+2SE)", verdict(bandit.ipw_false_positive <= alpha_limit)])
    arms = (0.50, 0.55)
    regret, uniform, regret_se = thompson_regret(rng(), runs, arms)
    out.update(bandit_regret=regret, uniform_regret=uniform, bandit_regret_ratio=regret / uniform)
    rows.append([f"bandit regret / uniform split, arms {arms}", regret / uniform, regret_se / uniform, "< 1",
                 verdict(regret / uniform < 1)])

    # ---- bandit mode end to end (Thompson weights every hour, Hajek difference, mixture bounds, sample ratio by
    # propensities): challenger 1 point better, at the default floor and at the old one; and at the null
    bandit_runs = max(runs // 10, 200)
    default_floor = BanditConfig().floor
    out["bandit_promotion"] = {}
    for floor, effect, name in ((default_floor, 0.01, "power"), (0.01, 0.01, "power_floor_0.01"),
                                (default_floor, -MARGIN, "false_promotion")):
        rate, blocked = simulation.simulate_bandit_promotion(rng(), bandit_runs, effect=effect, margin=MARGIN,
                                                             alpha=ALPHA, floor=floor, per_hour=PER_LOOK, hours=LOOKS)
        out["bandit_promotion"][name] = rate
        out["bandit_promotion"][f"{name}_srm_blocked"] = blocked
        if name == "power":
            target, ok = ">= 0.75", rate >= 0.75
        elif name == "false_promotion":
            limit = ALPHA + 2 * mc_se(ALPHA, bandit_runs)
            target, ok = f"<= {limit:.4f} (alpha+2SE)", rate <= limit
        else:
            target, ok = "reported (why the floor is higher)", True
        label = {"power": f"bandit, challenger 1 point better, floor {default_floor:g}: promoted (power)",
                 "power_floor_0.01": "bandit, the same at floor 0.01: promoted",
                 "false_promotion": f"bandit, challenger exactly M worse, floor {default_floor:g}: promoted"}[name]
        rows.append([label, rate, mc_se(max(rate, 0.01), bandit_runs), target, verdict(ok)])

    # ---- the group-sequential boundary is recomputed at every hourly evaluation: its cost at 50 and 336 looks
    out["obf_boundary_ms"] = {}
    for n_looks in (50, 336):
        looks = list(np.sort(rng().uniform(0.01, 1.0, size=n_looks)))
        t0 = time.perf_counter()
        sequential.obf_boundary(looks, ALPHA)
        ms = (time.perf_counter() - t0) * 1000.0
        out["obf_boundary_ms"][str(n_looks)] = round(ms, 2)
        rows.append([f"OBF boundary over {n_looks} looks (ms, one evaluation)", ms, "", "< 1,000", verdict(ms < 1000)])

    # ---- guardrails re-checked every hour for 14 days (each at its share of guardrail_alpha 0.05)
    guard_runs = max(runs // 5, 200)
    out["guardrails"] = {}
    for per_hour in (5, 20):
        rate = float(floor_fails(rng(), guard_runs, per_hour, 0.60, 0.60).mean())
        out["guardrails"][f"floor_at_limit_{per_hour}"] = rate
        rows.append([f"VIP precision at its floor 0.60, {per_hour} VIP positives/h: rejected", rate,
                     mc_se(max(rate, 0.01), guard_runs), "<= 0.05 (was 0.37)", verdict(rate <= 0.05)])
    power = float(floor_fails(rng(), guard_runs, 20, 0.55, 0.60).mean())
    out["guardrails"]["floor_power_0.05_below"] = power
    rows.append(["VIP precision 0.05 below its floor, 20/h: rejected (power)", power, mc_se(power, guard_runs),
                 "reported", "PASS"])
    rate = float(ceiling_fails(rng(), guard_runs, 200, 0.01, 0.01).mean())
    out["guardrails"]["error_at_limit"] = rate
    rows.append(["error rate at its 1% ceiling, 200 requests/h: rejected", rate, mc_se(max(rate, 0.01), guard_runs),
                 "<= 0.05 (was 0.39)", verdict(rate <= 0.05)])
    for share, name in ((0.99, "at the limit"), (0.9925, "at 0.95x the limit (lognormal sd 0.5)")):
        rate = float(latency_fails(rng(), guard_runs, 200, share).mean())
        out["guardrails"][f"latency_{share}"] = rate
        rows.append([f"latency p99 {name}: rejected", rate, mc_se(max(rate, 0.01), guard_runs),
                     "<= 0.05 (was 0.85 / 0.34)", verdict(rate <= 0.05)])
    stab_runs = max(guard_runs // 4, 50)
    for exposure, name in ((0.5, "A/A"), (0.1, "A/B at exposure 0.1")):
        rate = float(stability_fails(rng(), stab_runs, 2400, exposure, 0.01).mean())
        out["guardrails"][f"stability_{exposure}"] = rate
        rows.append([f"stability, {name}, equal swing: rejected", rate, mc_se(max(rate, 0.01), stab_runs),
                     "<= 0.05 (was 0.95-1.00)", verdict(rate <= 0.05)])
    all_limits = (floor_fails(rng(), guard_runs, 5, 0.60, 0.60) | ceiling_fails(rng(), guard_runs, 200, 0.01, 0.01)
                  | latency_fails(rng(), guard_runs, 200, 0.99))
    rate = float(all_limits.mean())
    out["guardrails"]["all_at_limits"] = rate
    rows.append(["floor, error rate and latency all at their limits: rejected by any", rate,
                 mc_se(max(rate, 0.01), guard_runs), "<= 0.05 (was 0.62+)", verdict(rate <= 0.05)])
    srm_runs = max(guard_runs // 4, 50)
    fair = float(srm_bandit_flags(rng(), srm_runs, 150, 0.0).mean())
    leaky = float(srm_bandit_flags(rng(), srm_runs, 150, 0.10).mean())
    out["guardrails"]["bandit_srm_false_alarm"], out["guardrails"]["bandit_srm_leak_flagged"] = fair, leaky
    rows.append(["bandit sample ratio by propensities, fair router: flagged at any look", fair,
                 mc_se(max(fair, 0.01), srm_runs), "<= 0.01", verdict(fair <= 0.01)])
    rows.append(["bandit router serving 10% of challenger-assigned by the champion: flagged", leaky,
                 mc_se(max(leaky, 0.01), srm_runs), ">= 0.9", verdict(leaky >= 0.9)])

    # ---- label requests (issue 18): a budget of 20% of rows an hour, shadow, 15% disagreement, labels bought
    # within the hour; active draws by disagreement (with its floor), random draws uniformly; both weighted
    # by 1/probability and tested hourly with the mixture bounds. Labels to decision, not the duration floor.
    label_runs = max(runs // 5, 200)
    null = simulation.simulate_label_requests(rng(), label_runs, -0.01, active=True, min_hours=0)
    limit = ALPHA + 2 * mc_se(ALPHA, label_runs)
    out["label_requests"] = {"false_promotion": null.promoted}
    rows.append(["label requests, challenger exactly M worse: promoted", null.promoted,
                 mc_se(max(null.promoted, 0.01), label_runs), f"<= {limit:.4f} (alpha+2SE)",
                 verdict(null.promoted <= limit)])
    for effect in (0.0, 0.01):
        active = simulation.simulate_label_requests(rng(), label_runs, effect, active=True, min_hours=0)
        uniform = simulation.simulate_label_requests(rng(), label_runs, effect, active=False, min_hours=0)
        ratio = active.labels_promoted / uniform.labels_promoted
        out["label_requests"][f"effect_{effect:g}"] = {
            "power_active": active.promoted, "power_random": uniform.promoted,
            "labels_active": active.labels_promoted, "labels_random": uniform.labels_promoted, "ratio": ratio}
        rows.append([f"label requests, effect {effect:+g}: power active / random", active.promoted,
                     mc_se(active.promoted, label_runs), f">= random's {uniform.promoted:.3f}",
                     verdict(active.promoted >= uniform.promoted - 2 * mc_se(uniform.promoted, label_runs))])
        rows.append([f"label requests, effect {effect:+g}: labels to promotion, active / random", ratio, "",
                     f"<= 0.5 ({active.labels_promoted:,.0f} vs {uniform.labels_promoted:,.0f})", verdict(ratio <= 0.5)])

    # ---- drift rule on null data
    out["drift_false_alarm"] = {}
    for i, window in enumerate(WINDOWS):
        alarms = drift_alarms(args.seed + 1000 + i, drift_runs, window)
        out["drift_false_alarm"][str(window)] = alarms
        rate = alarms["rule"]
        rows.append([f"drift false alarms, {TRAIN_ROWS:,} train vs {window:,} prod", rate, mc_se(max(rate, 0.01), drift_runs),
                     "<= 0.01", verdict(rate <= 0.01)])
    out["drift_false_alarm_rate"] = max(v["rule"] for v in out["drift_false_alarm"].values())

    print_table("Promotion engine by simulation (SE = Monte Carlo standard error)",
                ["figure", "value", "SE", "target", "status"], rows)
    print_table("Expected samples to decision / n_fixed (stop at promote or reject; undecided = the design's max)",
                ["design", "multiple", "true diff", "E[n]/n_fixed", "SE", "P(promote)"], exp_rows)
    print_table("Drift rule on null data: share of runs with any feature flagged",
                ["production rows", "rule (p AND effect)", "test p only", "effect only"],
                [[w, a["rule"], a["test_only"], a["effect_only"]] for w, a in
                 ((int(k), v) for k, v in out["drift_false_alarm"].items())])
    out["misses"] = [r[0] for r in rows if r[-1] == "MISS"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{len(rows) - len(out['misses'])}/{len(rows)} figures on target; {out['seconds']} s")
    emit_json(out)


if __name__ == "__main__":
    main()
