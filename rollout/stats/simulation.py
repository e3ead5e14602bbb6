"""Vectorised Monte Carlo checks of the promotion engine, shared by the unit tests and the benchmark.

The default scenario is a shadow rollout on 0/1 loss: per matured request the effect
e = loss(champion) - loss(challenger) is +1, -1 or 0; the two models disagree on `disagreement`
of requests. Cumulative sums at every look are drawn for all runs at once (multinomial counts per
look), so 2,000 runs of 336 hourly looks take well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from rollout.stats import bandit, sequential

Design = Literal["mixture", "naive", "obf"]


@dataclass(frozen=True)
class Paths:
    """Cumulative n, sum and sum of squares of the effect at each look; arrays of shape (runs, looks)."""

    n: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    def mean_se(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        mean = self.total / n
        var = np.maximum(self.total_sq - self.total**2 / n, 0.0) / np.maximum(n - 1, 1)
        return mean, np.sqrt(var / n)


def paired_paths(
    rng: np.random.Generator, n_runs: int, looks: np.ndarray, effect: float, disagreement: float
) -> Paths:
    """Cumulative sums of e in {-1, 0, +1} with mean `effect` at the given cumulative sample sizes."""
    p_plus, p_minus = (disagreement + effect) / 2, (disagreement - effect) / 2
    if min(p_plus, p_minus) < 0:
        raise ValueError("|effect| cannot exceed the disagreement rate")
    looks = np.asarray(looks, dtype=np.int64)
    steps = np.diff(np.concatenate([[0], looks]))
    counts = rng.multinomial(steps[None, :].repeat(n_runs, 0), [p_plus, p_minus, 1 - p_plus - p_minus])
    plus = np.cumsum(counts[..., 0], axis=1)
    minus = np.cumsum(counts[..., 1], axis=1)
    n = np.broadcast_to(looks.astype(float), plus.shape)
    return Paths(n, (plus - minus).astype(float), (plus + minus).astype(float))


def _sigma(effect: float, disagreement: float) -> float:
    return math.sqrt(disagreement - effect * effect)


@dataclass(frozen=True)
class SequentialRun:
    """What a design did over the looks: promotion rate (with its Monte Carlo SE) and stopping sizes."""

    design: str
    rate: float
    mc_se: float
    mean_stop_n: float
    n_fixed: float
    cap: float
    runs: int


def lower_bounds(paths: Paths, design: Design, margin: float, alpha: float, n_star: float, max_samples: float) -> np.ndarray:
    """Lower bounds of the effect at every look under a design (shape runs x looks)."""
    mean, se = paths.mean_se()
    looks = paths.n[0]
    if design == "mixture":
        width = sequential.mixture_width(looks, n_star, alpha)
    elif design == "naive":
        width = np.full(looks.shape, stats.norm.ppf(1 - alpha))
    elif design == "obf":
        inside = looks <= max_samples
        boundary = sequential.obf_boundary(list(looks[inside] / max_samples), alpha)
        width = np.full(looks.shape, np.inf)
        width[inside] = np.asarray(boundary.z)
    else:
        raise ValueError(f"unknown design {design!r}")
    return np.asarray(mean - width[None, :] * se, dtype=float)


def _run(
    rng: np.random.Generator,
    design: Design,
    n_runs: int,
    looks: np.ndarray,
    effect: float,
    margin: float,
    alpha: float,
    power: float,
    mde: float,
    disagreement: float,
    max_samples: float | None = None,
) -> SequentialRun:
    sigma = _sigma(mde, disagreement)
    plan = sequential.plan_mixture(sigma, mde, margin, alpha, power)
    max_n = max_samples if max_samples is not None else float(looks[-1])
    paths = paired_paths(rng, n_runs, looks, effect, disagreement)
    crossed = lower_bounds(paths, design, margin, alpha, plan.n_star, max_n) > -margin
    ever = crossed.any(axis=1)
    first = np.where(ever, crossed.argmax(axis=1), looks.size - 1)
    rate = float(ever.mean())
    return SequentialRun(
        design, rate, math.sqrt(rate * (1 - rate) / n_runs), float(looks[first].mean()), plan.n_fixed, plan.cap, n_runs
    )


def simulate_false_promotion(
    rng: np.random.Generator,
    design: Design = "mixture",
    n_runs: int = 2000,
    n_looks: int = 336,
    per_look: int = 100,
    margin: float = 0.01,
    alpha: float = 0.05,
    power: float = 0.8,
    mde: float = 0.0,
    disagreement: float = 0.2,
    max_samples: float | None = None,
) -> SequentialRun:
    """Promotion rate when the true effect is exactly -margin, looking every `per_look` samples (hourly)."""
    looks = per_look * np.arange(1, n_looks + 1)
    return _run(rng, design, n_runs, looks, -margin, margin, alpha, power, mde, disagreement, max_samples)


def simulate_power(
    rng: np.random.Generator,
    design: Design = "mixture",
    n_runs: int = 2000,
    n_looks: int = 336,
    margin: float = 0.01,
    alpha: float = 0.05,
    power: float = 0.8,
    mde: float = 0.0,
    disagreement: float = 0.2,
) -> SequentialRun:
    """Promotion rate by the planned maximum (mixture: the cap; obf: its inflated max) at the planned effect.

    Looks are equally spaced up to that maximum; mean_stop_n counts a run that never stops as the maximum.
    """
    sigma = _sigma(mde, disagreement)
    if design == "obf":
        max_n = sequential.plan_group_sequential(sigma, mde, margin, alpha, power, looks=n_looks).max_samples
    else:
        max_n = sequential.plan_mixture(sigma, mde, margin, alpha, power).cap
    looks = np.unique(np.ceil(max_n * np.arange(1, n_looks + 1) / n_looks).astype(np.int64))
    return _run(rng, design, n_runs, looks, mde, margin, alpha, power, mde, disagreement, float(looks[-1]))


@dataclass(frozen=True)
class Coverage:
    """Share of runs whose bounds held at every look: lower only, upper only, both."""

    lower: float
    upper: float
    both: float
    runs: int


def simulate_coverage(
    rng: np.random.Generator,
    n_runs: int = 2000,
    n_looks: int = 336,
    per_look: int = 100,
    effect: float = 0.02,
    alpha: float = 0.05,
    n_star: float = 10_000,
    disagreement: float = 0.2,
) -> Coverage:
    """Uniform-over-time coverage of the true mean by the mixture bounds (each one-sided at alpha)."""
    looks = per_look * np.arange(1, n_looks + 1)
    paths = paired_paths(rng, n_runs, looks, effect, disagreement)
    mean, se = paths.mean_se()
    half = sequential.mixture_width(looks, n_star, alpha)[None, :] * se
    low_ok = (mean - half <= effect).all(axis=1)
    up_ok = (mean + half >= effect).all(axis=1)
    return Coverage(float(low_ok.mean()), float(up_ok.mean()), float((low_ok & up_ok).mean()), n_runs)


@dataclass(frozen=True)
class BanditRun:
    """Per-run estimates of each arm's mean after Thompson allocation (arrays of shape runs x arms)."""

    true_means: np.ndarray
    naive: np.ndarray
    horvitz_thompson: np.ndarray
    hajek: np.ndarray
    counts: np.ndarray
    naive_false_positive: float
    ipw_false_positive: float

    def bias(self, estimates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean bias per arm, its Monte Carlo SE)."""
        err = estimates - self.true_means[None, :]
        ok = np.isfinite(err).all(axis=1)
        return err[ok].mean(axis=0), err[ok].std(axis=0, ddof=1) / math.sqrt(ok.sum())


def simulate_thompson(
    rng: np.random.Generator,
    n_runs: int = 2000,
    p_arms: tuple[float, ...] = (0.5, 0.5),
    n_batches: int = 48,
    batch_size: int = 100,
    floor: float = 0.01,
    burn_in: int = 100,
    draws: int = 200,
    alpha: float = 0.05,
) -> BanditRun:
    """Bernoulli arms allocated by Thompson weights recomputed every batch (hour); naive vs IPW estimates.

    The false-positive rates are of one-sided tests "arm 1 beats arm 0" at alpha when the arms are equal:
    a naive two-proportion z test, and a z test on the Hajek IPW difference.
    """
    p = np.asarray(p_arms, dtype=float)
    k = p.size
    succ = np.zeros((n_runs, k))
    cnt = np.zeros((n_runs, k))
    w_sum = np.zeros((n_runs, k))
    wr_sum = np.zeros((n_runs, k))
    w2 = np.zeros((n_runs, k))
    w2r = np.zeros((n_runs, k))
    for _ in range(n_batches):
        weights = bandit.thompson_beta(succ, cnt, rng, draws=draws, floor=floor, burn_in=burn_in)
        n_arm = rng.multinomial(batch_size, weights)
        wins = rng.binomial(n_arm, p[None, :])
        inv = 1.0 / weights
        succ += wins
        cnt += n_arm
        w_sum += n_arm * inv
        wr_sum += wins * inv
        w2 += n_arm * inv**2
        w2r += wins * inv**2
    total = n_batches * batch_size
    with np.errstate(invalid="ignore", divide="ignore"):
        naive = succ / cnt
        ht = wr_sum / total
        hj = wr_sum / w_sum
        # 0/1 rewards: sum w^2 r^2 = sum w^2 r
        hj_var = np.maximum(w2r - 2 * hj * w2r + hj**2 * w2, 0.0) / w_sum**2
        pooled = succ.sum(axis=1) / cnt.sum(axis=1)
        se_naive = np.sqrt(pooled * (1 - pooled) * (1 / cnt[:, 0] + 1 / cnt[:, 1]))
        z_naive = (naive[:, 1] - naive[:, 0]) / se_naive
        z_ipw = (hj[:, 1] - hj[:, 0]) / np.sqrt(hj_var[:, 0] + hj_var[:, 1])
    q = stats.norm.ppf(1 - alpha)
    return BanditRun(
        p, naive, ht, hj, cnt, float(np.nanmean(z_naive > q)), float(np.nanmean(z_ipw > q))
    )


def simulate_family_wise_error(
    rng: np.random.Generator,
    n_runs: int = 20_000,
    challengers: int = 2,
    n_per_arm: int = 1000,
    alpha: float = 0.05,
    correction: Literal["none", "bonferroni", "holm"] = "none",
) -> float:
    """Share of runs where some equal-to-control challenger is declared better (one-sided z tests, shared control)."""
    means = rng.standard_normal((n_runs, challengers + 1)) / math.sqrt(n_per_arm)
    z = (means[:, 1:] - means[:, :1]) / math.sqrt(2.0 / n_per_arm)
    p = stats.norm.sf(z)
    if correction == "none":
        reject = p <= alpha
    elif correction == "bonferroni":
        reject = p <= alpha / challengers
    elif correction == "holm":
        # any Holm rejection happens exactly when the smallest p passes alpha / k
        reject = p.min(axis=1, keepdims=True) <= alpha / challengers
    else:
        raise ValueError(f"unknown correction {correction!r}")
    return float(reject.any(axis=1).mean())


def simulate_unit_false_promotion(rng: np.random.Generator, n_runs: int, clustered: bool, units: int = 1500,
                                  visits: float = 10.0, rho: float = 0.2, base: float = 0.30, margin: float = 0.02,
                                  alpha: float = 0.05, n_star: float = 4000.0, days: float = 14.0,
                                  step_hours: float = 1.0) -> float:
    """An A/B rollout randomised by unit: each arm has `units` units with Poisson(`visits`) visits spread over
    `days`, 0/1 losses with within-unit correlation `rho` (a beta-distributed rate per unit), the challenger's
    error rate exactly `margin` above the champion's. The share of runs whose mixture lower bound ever clears
    -margin at looks every `step_hours`, with the standard error from unit sums (the larger of that and the
    row-level one, as the decision takes it) or from rows alone."""
    looks = int(days * 24 / step_hours)
    a_shape = (1 - rho) / rho
    promoted = 0
    for _ in range(n_runs):
        sums = []
        for p in (base, base + margin):  # champion, challenger
            counts = np.maximum(rng.poisson(visits, units), 1)
            unit = np.repeat(np.arange(units), counts)
            rates = rng.beta(p * a_shape, (1 - p) * a_shape, units)
            loss = (rng.random(unit.size) < rates[unit]).astype(float)
            look = np.minimum((rng.random(unit.size) * looks).astype(int), looks - 1)
            n_u = np.zeros((units, looks))
            y_u = np.zeros((units, looks))
            np.add.at(n_u, (unit, look), 1.0)
            np.add.at(y_u, (unit, look), loss)
            n_u, y_u = n_u.cumsum(axis=1), y_u.cumsum(axis=1)  # each unit's visits and losses up to each look
            n, s = n_u.sum(axis=0), y_u.sum(axis=0)
            g = (n_u > 0).sum(axis=0)
            mean = s / np.maximum(n, 1)
            spread = (y_u**2).sum(axis=0) - 2 * mean * (y_u * n_u).sum(axis=0) + mean**2 * (n_u**2).sum(axis=0)
            var_cluster = np.maximum(spread, 0) / np.maximum(n, 1) ** 2 * g / np.maximum(g - 1, 1)
            var_rows = mean * (1 - mean) / np.maximum(n - 1, 1)  # a 0/1 loss: its own square
            sums.append((n, mean, np.maximum(var_rows, var_cluster) if clustered else var_rows))
        (n_c, m_c, v_c), (n_x, m_x, v_x) = sums
        estimate = m_c - m_x  # better-is-positive: champion loss minus challenger loss
        se = np.sqrt(v_c + v_x)
        ok = (n_c >= 2) & (n_x >= 2)
        width = sequential.mixture_width(np.maximum(n_x, 2), n_star, alpha)
        promoted += bool(np.any(ok & (estimate - width * se > -margin)))
    return promoted / n_runs


def _hajek(sw: np.ndarray, swr: np.ndarray, sw2: np.ndarray, sw2r: np.ndarray,
           sw2r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `bandit.hajek`: the weighted mean and its linearised variance from the sums of w, w r, w^2,
    w^2 r and w^2 r^2 (arrays of any one shape)."""
    mean = swr / np.maximum(sw, 1e-12)
    var = np.maximum(sw2r2 - 2 * mean * sw2r + mean * mean * sw2, 0.0) / np.maximum(sw, 1e-12) ** 2
    return mean, var


def simulate_exposure_change(rng: np.random.Generator, n_runs: int, stratified: bool, per_hour: int = 200,
                             exposures: tuple[float, float] = (0.1, 0.5), change_hour: int = 168,
                             base: tuple[float, float] = (0.40, 0.30), margin: float = 0.01, alpha: float = 0.05,
                             n_star: float = 10_000.0, hours: int = 336, min_samples: int = 100) -> float:
    """An A/B rollout by request whose exposure is raised from `exposures[0]` to `exposures[1]` at
    `change_hour`, while every model's 0/1 loss drifts linearly from `base[0]` to `base[1]`; the challenger's
    loss is exactly `margin` above the champion's. The share of runs whose mixture lower bound ever clears
    -margin at hourly looks: with each arm's mean pooled over its rows (Welch), or propensity-weighted (Hajek:
    each row weighs 1 / its logged propensity, which stratifies by exposure period), as the decision takes it
    when the logged propensities vary."""
    h = np.arange(hours)
    p_ch = np.where(h < change_hour, exposures[0], exposures[1])  # the challenger's propensity in each hour
    mu = base[0] + (base[1] - base[0]) * (h + 0.5) / hours
    n_ch = rng.binomial(per_hour, p_ch, size=(n_runs, hours))
    arms = []
    for n_h, p_h, loss in ((per_hour - n_ch, 1.0 - p_ch, mu), (n_ch, p_ch, mu + margin)):  # champion, challenger
        s_h = rng.binomial(n_h, loss)
        n, s = n_h.cumsum(axis=1), s_h.cumsum(axis=1)
        if stratified:
            w = 1.0 / p_h
            sw, swr = (n_h * w).cumsum(axis=1), (s_h * w).cumsum(axis=1)
            sw2, sw2r = (n_h * w * w).cumsum(axis=1), (s_h * w * w).cumsum(axis=1)  # r in {0,1}: sw2r2 = sw2r
            mean, var = _hajek(sw, swr, sw2, sw2r, sw2r)
        else:
            mean = s / np.maximum(n, 1)
            var = mean * (1 - mean) / np.maximum(n - 1, 1)
        arms.append((n, mean, var))
    (n_c, m_c, v_c), (n_x, m_x, v_x) = arms
    estimate = m_c - m_x  # better-is-positive: champion loss minus challenger loss
    se = np.sqrt(v_c + v_x)
    ok = np.minimum(n_c, n_x) >= min_samples
    width = sequential.mixture_width(np.maximum(n_x, 2), n_star, alpha)
    return float(np.any(ok & (estimate - width * se > -margin), axis=1).mean())


def simulate_bandit_promotion(rng: np.random.Generator, n_runs: int, effect: float = 0.01, per_hour: int = 100,
                              base: float = 0.30, margin: float = 0.01, alpha: float = 0.05, floor: float = 0.01,
                              burn_in: int = 100, hours: int = 336, n_star: float = 10_000.0,
                              min_samples: int = 500, draws: int = 256) -> tuple[float, float]:
    """A bandit rollout on 0/1 loss as the service and the hourly evaluation run it: each hour the arms
    get `per_hour` matured requests split by the Thompson weights of the evaluation before (floor, burn-in),
    each row logged with its propensity; every hour the Hajek difference is tested with the mixture bounds
    (as `decision._effect` takes it in bandit mode) and the sample ratio with `ipw_balance_test` against
    the logged propensities (a union bound over the looks, as `decision._srm`). The champion's loss is
    `base`, the challenger's `base - effect` (better-is-positive). Returns (share of runs promoted, share
    of runs ever blocked by the sample-ratio test) by the last look; a run stops at its first promotion
    or rejection."""
    p_loss = np.array([base, base - effect])
    wins = np.zeros((n_runs, 2))
    trials = np.zeros((n_runs, 2))
    sums = np.zeros((5, n_runs, 2))  # sum_w, sum_wr, sum_w2, sum_w2r, n per arm (r in {0,1}: sum_w2r2 = sum_w2r)
    weights = np.full((n_runs, 2), 0.5)
    decided = np.zeros(n_runs, dtype=bool)
    promoted = np.zeros(n_runs, dtype=bool)
    blocked = np.zeros(n_runs, dtype=bool)
    for _hour in range(hours):
        n_ch = rng.binomial(per_hour, weights[:, 1])
        n_arm = np.stack([per_hour - n_ch, n_ch], axis=1)
        losses = rng.binomial(n_arm, p_loss)
        w = 1.0 / weights
        sums[0] += n_arm * w
        sums[1] += losses * w
        sums[2] += n_arm * w * w
        sums[3] += losses * w * w
        sums[4] += n_arm
        wins += n_arm - losses
        trials += n_arm
        sw, swr, sw2, sw2r, n = sums
        mean, var = _hajek(sw, swr, sw2, sw2r, sw2r)  # r in {0,1}: sw2r2 = sw2r
        estimate = mean[:, 0] - mean[:, 1]
        se = np.sqrt(var.sum(axis=1))
        width = sequential.mixture_width(np.maximum(n[:, 1], 2), n_star, alpha)
        n_total = n.sum(axis=1)
        z = (sw[:, 1] - n_total) / np.sqrt(np.maximum(sw2[:, 1] - n_total, 1e-9))
        srm = 2 * stats.norm.sf(np.abs(z)) * hours < 0.001
        ok = (n.min(axis=1) >= min_samples) & ~srm & ~decided
        blocked |= srm & ~decided
        win = ok & (estimate - width * se > -margin)
        lose = ok & (estimate + width * se < -margin)
        promoted |= win
        decided |= win | lose
        weights = bandit.thompson_beta(wins, trials, rng, draws=draws, floor=floor, burn_in=burn_in)
    return float(promoted.mean()), float(blocked.mean())


def simulate_planned_obf(rng: np.random.Generator, n_runs: int, effect: float, n_looks: int = 336,
                         per_look: int = 100, margin: float = 0.01, alpha: float = 0.05, power: float = 0.8,
                         mde: float = 0.0, disagreement: float = 0.2, min_samples: int = 500
                         ) -> tuple[float, float, float]:
    """The group-sequential design as the default runs it, with no max_samples given: at the first look with
    `min_samples` outcomes the maximum is planned from the observed standard deviation
    (`plan_group_sequential`) and kept; every look is then judged at its information fraction n / max
    (O'Brien-Fleming spending), the first look past the maximum at fraction 1, none after. Decisions as
    `decide` takes them (promote: lower > -M, reject: upper < -M). Returns (promotion rate, mean samples to a
    decision over the fixed-horizon n at the true sigma, share of runs undecided), undecided runs counted at
    the last look they could decide at."""
    looks = per_look * np.arange(1, n_looks + 1)
    paths = paired_paths(rng, n_runs, looks, effect, disagreement)
    mean, se = paths.mean_se()
    k0 = int(np.searchsorted(looks, min_samples))
    sigma_hat = se[:, k0] * np.sqrt(looks[k0])
    plan = sequential.plan_group_sequential(1.0, mde, margin, alpha, power)  # max_samples scales with sigma^2
    planned = plan.max_samples * sigma_hat**2
    grid = np.exp(np.round(np.log(np.maximum(planned, looks[k0])) / 0.002) * 0.002)  # 0.2% bins: shared boundaries
    width = np.full(mean.shape, np.inf)
    last = np.zeros(n_runs, dtype=int)
    for value in np.unique(grid):
        runs = grid == value
        upto = int(np.searchsorted(looks, value))  # looks with n < max, then the first at or past it
        count = min(upto + 1, n_looks)
        fractions = np.minimum(looks[:count] / value, 1.0)
        width[np.ix_(runs, np.arange(count))] = np.asarray(sequential.obf_boundary(list(fractions), alpha).z)
        last[runs] = count - 1
    width[:, :k0] = np.inf  # before min_samples: no decision
    with np.errstate(invalid="ignore"):
        promote = mean - width * se > -margin
        reject = mean + width * se < -margin
    decided = promote | reject
    ever = decided.any(axis=1)
    first = np.where(ever, decided.argmax(axis=1), last)
    n_fixed = sequential.fixed_horizon_n(_sigma(mde, disagreement), mde, margin, alpha, power)
    promoted = ever & promote[np.arange(n_runs), first]
    return float(promoted.mean()), float((looks[first] / n_fixed).mean()), float((~ever).mean())


@dataclass(frozen=True)
class LabelRequestRun:
    """What hourly label requests did over the runs: share promoted, and labels used until each run stopped
    (at its decision, or the horizon's total when undecided), on average and among promoted runs."""

    promoted: float
    labels: float
    labels_promoted: float


def simulate_label_requests(rng: np.random.Generator, n_runs: int, effect: float, active: bool,
                            disagreement: float = 0.15, budget: float = 0.2, per_hour: int = 200, hours: int = 336,
                            margin: float = 0.01, mde: float = 0.01, alpha: float = 0.05, power: float = 0.8,
                            min_samples: int = 200, min_hours: int = 24, floor: float = 0.1) -> LabelRequestRun:
    """A shadow rollout on 0/1 loss whose labels are bought: each hour a batch considers the hour's `per_hour`
    requests and draws `budget` of them, actively (`sampling.inclusion_probabilities` on the disagreement, the
    informativeness `rollout.cd.label_requests` gives the 0/1 loss, with its floor) or uniformly at random; the
    drawn rows' labels come within the hour. Every hour the Hajek mean of the paired difference, weighted by
    1/probability, is tested with the mixture bounds, N* re-planned from the current standard deviation, as
    `decide` does (promote: lower > -M after `min_hours`, reject: upper < -M; `min_samples` labels first).
    `effect` is better-is-positive: loss(champion) - loss(challenger)."""
    from rollout.stats.sampling import inclusion_probabilities

    k = budget * per_hour
    cache: dict[int, tuple[float, float]] = {}

    def probabilities(d: int) -> tuple[float, float]:  # (pi of a disagreement row, pi of an agreement row)
        if d not in cache:
            pi = inclusion_probabilities(np.r_[np.ones(d), np.zeros(per_hour - d)], k, floor)
            cache[d] = (float(pi[0]) if d else 1.0, float(pi[-1]) if d < per_hour else 1.0)
        return cache[d]

    worse = (1 - effect / disagreement) / 2  # P(the challenger is the one wrong | the models disagree)
    sums = np.zeros((6, n_runs))  # sum_w, sum_wd, sum_w2, sum_w2d, sum_w2d2, labels
    ratio = sequential.plan_mixture(1.0, mde, margin, alpha, power).n_star  # N* scales with sigma^2
    decided = np.zeros(n_runs, dtype=bool)
    promoted = np.zeros(n_runs, dtype=bool)
    used = np.zeros(n_runs)
    for hour in range(1, hours + 1):
        d = rng.binomial(per_hour, disagreement, n_runs)
        if active:
            pis = np.array([probabilities(int(x)) for x in d])
            pi_d, pi_a = pis[:, 0], pis[:, 1]
        else:
            pi_d = pi_a = np.full(n_runs, budget)
        k_d = rng.binomial(d, pi_d)
        k_a = rng.binomial(per_hour - d, pi_a)
        plus = rng.binomial(k_d, worse)
        diff = 2 * plus - k_d  # sum of d over the labelled disagreement rows (+1 challenger wrong, -1 right)
        w_d, w_a = 1 / pi_d, 1 / pi_a
        sums += np.stack([k_d * w_d + k_a * w_a, diff * w_d, k_d * w_d**2 + k_a * w_a**2, diff * w_d**2,
                          k_d * w_d**2, k_d + k_a])
        sw, swd, sw2, sw2d, sw2d2, n = sums
        mean, var = _hajek(sw, swd, sw2, sw2d, sw2d2)
        estimate, se = -mean, np.sqrt(var)
        sigma2 = var * n
        n_star = np.where(sigma2 > 0, ratio * sigma2, float(max(min_samples, 1000)))
        width = sequential.mixture_width(np.maximum(n, 2) * 1000.0 / n_star, 1000.0, alpha)
        ok = (n >= min_samples) & (se > 0) & ~decided
        win = ok & (hour >= min_hours) & (estimate - width * se > -margin)
        lose = ok & (estimate + width * se < -margin)
        used = np.where(~decided, n, used)
        promoted |= win
        decided |= win | lose
    return LabelRequestRun(float(promoted.mean()), float(used.mean()),
                           float(used[promoted].mean()) if promoted.any() else math.nan)
