"""Promotion tests: anytime-valid mixture confidence sequences, fixed-horizon tests, group-sequential
O'Brien-Fleming boundaries, power and time to decision.

Conventions: every test here is about an *effect* where larger is better; H0 is ``effect <= null``
(for non-inferiority ``null = -margin``), the alternative ``effect > null``. Bounds are one-sided at
level ``alpha`` each (lower bound for promotion, upper bound for rejection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from rollout.stats.moments import Moments

ArrayLike = float | np.ndarray


@dataclass(frozen=True)
class Bounds:
    """A point estimate with its one-sided lower and upper confidence bounds."""

    estimate: float
    se: float
    lower: float
    upper: float
    n: float


# --------------------------------------------------------------------------------------------
# Normal-mixture confidence sequence (one-sided, half-normal mixing)
# --------------------------------------------------------------------------------------------


def _tuning_constant(alpha: float) -> float:
    """Howard et al.'s c = -2 log a + log(1 - 2 log a); rho^2 = c / N* makes the bound tightest at N*."""
    return -2.0 * math.log(alpha) + math.log(1.0 - 2.0 * math.log(alpha))


def mixture_rho2(n_star: float, alpha: float) -> float:
    """Mixing variance rho^2 (per unit of sigma^2) tuned to a planned sample size N*.

    Uses the two-sided formula at level 2*alpha, the two-sided mixture the one-sided one approximates.
    """
    return _tuning_constant(min(2.0 * alpha, 0.5)) / n_star


def _one_sided_x(log_level: np.ndarray) -> np.ndarray:
    """Solve x^2/2 + log Phi(x) = L for x (increasing in x) by a few Newton steps."""
    x = np.sqrt(2.0 * log_level)
    for _ in range(30):
        g = 0.5 * x * x + log_ndtr(x) - log_level
        mills = np.exp(stats.norm.logpdf(x) - log_ndtr(x))
        step = g / (x + mills)
        x = x - step
        if np.all(np.abs(step) < 1e-12):
            break
    return x


def mixture_width(n: ArrayLike, n_star: float, alpha: float, tune_alpha: float | None = None) -> np.ndarray:
    """Half-width of the one-sided mixture bound in standard errors at n (vectorised over n).

    The boundary is where the half-normal mixture martingale 2/sqrt(1+u) exp(x^2/2) Phi(x) reaches 1/alpha
    (u = n rho^2), so by Ville's inequality it is crossed, ever, with probability <= alpha on its side.
    rho is tuned at `tune_alpha` (default alpha); tuning changes the shape, never the validity.
    """
    n_arr = np.maximum(np.asarray(n, dtype=float), 1e-12)
    u = n_arr * mixture_rho2(n_star, alpha if tune_alpha is None else tune_alpha)
    log_level = math.log(1.0 / (2.0 * alpha)) + 0.5 * np.log1p(u)
    return np.asarray(_one_sided_x(log_level) * np.sqrt((1.0 + u) / u), dtype=float)


def mixture_bounds(
    estimate: float, se: float, n: float, n_star: float, alpha: float, tune_alpha: float | None = None
) -> Bounds:
    """Anytime-valid one-sided lower and upper bounds (each at alpha) for an effect with standard error se.

    This is the asymptotic confidence sequence of Waudby-Smith et al. (2021) with a one-sided
    (half-normal) mixture instead of the two-sided normal one; n is the sample count se refers to.
    """
    if n < 2 or not math.isfinite(se):
        return Bounds(estimate, se, -math.inf, math.inf, n)
    half = float(mixture_width(n, n_star, alpha, tune_alpha)) * se
    return Bounds(estimate, se, estimate - half, estimate + half, n)


def mixture_p_value(estimate: float, se: float, n: float, n_star: float, null: float, alpha: float) -> float:
    """Anytime-valid p-value of H0 effect <= null: 1 / (mixture martingale), rho tuned at alpha.

    The lower bound at level a' with tune_alpha=alpha exceeds null exactly when this p-value is below a'.
    """
    if n < 2 or not math.isfinite(se) or se <= 0:
        return 1.0
    u = n * mixture_rho2(n_star, alpha)
    z = (estimate - null) / se
    x = z * math.sqrt(u / (1.0 + u))
    log_m = math.log(2.0) - 0.5 * math.log1p(u) + 0.5 * x * x + float(log_ndtr(x))
    return float(min(1.0, math.exp(-log_m)))


def fixed_horizon_n(sigma: float, effect: float, margin: float, alpha: float, power: float) -> float:
    """Samples a single one-sided z test needs: ((z_{1-a} + z_power) sigma / (effect + margin))^2."""
    gap = effect + margin
    if gap <= 0:
        return math.inf
    return float(((stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)) * sigma / gap) ** 2)


@dataclass(frozen=True)
class MixturePlan:
    """Tuning of the mixture test: N* (where the bound is tightest) and the cap (power reached by then)."""

    n_fixed: float
    n_star: float
    cap: float
    expected_n: float
    alpha: float
    power: float


@lru_cache(maxsize=256)
def _mixture_plan_ratios(alpha: float, power: float) -> tuple[float, float]:
    """(cap / n_fixed, E[min(N, cap)] / n_fixed) for the one-sided mixture with N* = n_fixed.

    Power is the probability of crossing by n under near-continuous monitoring (a look every
    0.01 n_fixed up to 6 n_fixed), computed on the Brownian-motion limit of the standardised sum.
    """
    theta = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    taus = np.linspace(0.01, 6.0, 600)
    bounds = mixture_width(taus, 1.0, alpha) * np.sqrt(taus)
    first = _crossing(taus, bounds, theta)
    cum = np.cumsum(first)
    k = int(np.searchsorted(cum, power))
    if k >= taus.size:
        return math.inf, math.inf
    lo_t, lo_c = (taus[k - 1], cum[k - 1]) if k > 0 else (0.0, 0.0)
    cap = lo_t + (power - lo_c) / (cum[k] - lo_c) * (taus[k] - lo_t)
    survive = 1.0 - np.concatenate([[0.0], cum[:-1]])
    steps = np.diff(np.concatenate([[0.0], taus]))
    keep = taus <= cap
    expected = float(np.sum(steps[keep] * survive[keep]))
    return float(cap), expected


def plan_mixture(sigma: float, effect: float, margin: float, alpha: float, power: float) -> MixturePlan:
    """Plan the mixture test from the power calculation: N* = fixed-horizon n; cap where power is reached.

    The cap (about 1.7 x n_fixed at alpha 0.05, power 0.8) is found numerically as the first n at
    which the probability of having promoted, at the planned effect, reaches `power`.
    """
    n_fixed = fixed_horizon_n(sigma, effect, margin, alpha, power)
    if not math.isfinite(n_fixed):
        return MixturePlan(math.inf, math.inf, math.inf, math.inf, alpha, power)
    cap_ratio, expected_ratio = _mixture_plan_ratios(round(alpha, 12), round(power, 12))
    return MixturePlan(n_fixed, n_fixed, cap_ratio * n_fixed, expected_ratio * n_fixed, alpha, power)


def mixture_power(n: float, n_star: float, sigma: float, effect: float, margin: float, alpha: float) -> float:
    """Probability that the lower bound at n exceeds -margin when the true effect is `effect` (one look)."""
    if n < 2 or sigma <= 0:
        return 0.0
    se = sigma / math.sqrt(n)
    width = float(mixture_width(n, n_star, alpha))
    return float(stats.norm.cdf((effect + margin) / se - width))


def samples_to_decide(estimate: float, sigma: float, margin: float, alpha: float, n_star: float) -> float:
    """Sample size at which the bounds would settle promotion or rejection if the estimate and sigma held."""
    gap = abs(estimate + margin)
    if gap == 0 or sigma <= 0 or not math.isfinite(gap):
        return math.inf

    def excess(n: float) -> float:
        return gap - float(mixture_width(n, n_star, alpha)) * sigma / math.sqrt(n)

    hi = 2.0
    while excess(hi) <= 0:
        hi *= 2
        if hi > 1e12:
            return math.inf
    if hi == 2.0:
        return 2.0
    return float(brentq(excess, hi / 2, hi, xtol=0.5))


def hours_to_decision(samples_needed: float, rate_per_hour: float) -> float:
    """Hours until samples_needed more matured outcomes arrive at the current rate (inf if none arrive)."""
    if samples_needed <= 0:
        return 0.0
    if rate_per_hour <= 0 or not math.isfinite(samples_needed):
        return math.inf
    return samples_needed / rate_per_hour


# --------------------------------------------------------------------------------------------
# Unpaired (A/B) difference of means
# --------------------------------------------------------------------------------------------


def welch_difference(a: Moments, b: Moments) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its unequal-variance standard error, Welch-Satterthwaite df)."""
    va, vb = a.variance / a.n, b.variance / b.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1)) if va + vb > 0 else math.inf
    return a.mean - b.mean, se, df


# --------------------------------------------------------------------------------------------
# Group-sequential: Lan-DeMets O'Brien-Fleming-type spending at arbitrary information fractions
# --------------------------------------------------------------------------------------------

_GRID_STEP = 0.01  # cell width for the Brownian motion B(t) (sd 1 at t = 1)
_GRID_SPAN = 8.0  # grid covers +-8 sd of B at the last look (plus the drift)


def obf_spending(t: ArrayLike, alpha: float) -> np.ndarray:
    """One-sided Lan-DeMets O'Brien-Fleming-type spending: alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t))."""
    t_arr = np.clip(np.asarray(t, dtype=float), 1e-12, 1.0)
    return np.asarray(2.0 * (1.0 - ndtr(stats.norm.ppf(1 - alpha / 2) / np.sqrt(t_arr))), dtype=float)


class _Walker:
    """Mass of not-yet-stopped paths of B(t) = W(t) + theta t in grid cells, moved look by look.

    Cells move by a Gaussian kernel whose variance is reduced by h^2/12 to cancel the rounding
    noise of re-binning; within a cell mass is taken as uniform when a boundary cuts it.
    """

    def __init__(self, theta: float, t_max: float) -> None:
        h = _GRID_STEP
        self.theta = theta
        spread = _GRID_SPAN * math.sqrt(max(t_max, 1.0))
        self.lo = int(math.floor((min(0.0, theta * t_max) - spread) / h))
        hi = int(math.ceil((max(0.0, theta * t_max) + spread) / h))
        self.x = np.arange(self.lo, hi + 1) * h
        self.mass = np.zeros(self.x.size)
        self.mass[-self.lo] = 1.0  # point mass at B(0) = 0
        self.over = 0.0  # surviving mass carried above the grid (always beyond any bound)
        self.t = 0.0

    def move(self, t: float) -> None:
        """Let the surviving mass diffuse from the current time to t."""
        dt = t - self.t
        h = _GRID_STEP
        var = dt - h * h / 12.0
        self.over = 0.0
        if var <= 0:
            return  # too short to resolve on the grid: the time is carried into the next move
        self.t = t
        s, mu = math.sqrt(var), self.theta * dt
        d_lo = int(math.floor((mu - 9 * s) / h)) - 1
        d_hi = int(math.ceil((mu + 9 * s) / h)) + 1
        d = np.arange(d_lo, d_hi + 1) * h
        kernel = ndtr((d + h / 2 - mu) / s) - ndtr((d - h / 2 - mu) / s)
        full = np.convolve(self.mass, kernel)  # full[k] lands on grid index k + d_lo
        size = self.mass.size
        moved = np.zeros(size)
        first = max(0, d_lo)
        last = min(size, full.size + d_lo)
        moved[first:last] = full[first - d_lo : last - d_lo]
        self.over = float(full[last - d_lo :].sum())
        self.mass = moved

    def _tails(self) -> np.ndarray:
        """tails[j] = surviving mass in cells j, j+1, ... (plus what went above the grid)."""
        return np.cumsum(self.mass[::-1])[::-1] + self.over

    def tail(self, b: float) -> float:
        """Surviving mass above b (the probability of stopping at this look)."""
        h = _GRID_STEP
        if b == math.inf:
            return 0.0
        pos = (b - self.x[0]) / h + 0.5  # position of b in cell units from the grid's lower edge
        if pos <= 0:
            return float(self.mass.sum()) + self.over
        j = int(pos)
        if j >= self.mass.size:
            return self.over
        above = float(self._tails()[j + 1]) if j + 1 < self.mass.size else self.over
        return float(above + float(self.mass[j]) * (j + 1 - pos))

    def solve(self, target: float) -> float:
        """The bound b above which the surviving mass equals target."""
        h = _GRID_STEP
        tails = self._tails()
        if target >= tails[0]:
            return -math.inf
        if target <= self.over:
            return float(self.x[-1] + h / 2)
        j = int(np.searchsorted(-tails, -target, side="right")) - 1  # tails[j] > target >= tails[j+1]
        above = float(tails[j + 1]) if j + 1 < tails.size else self.over
        frac = (target - above) / float(self.mass[j])
        return float(self.x[j] + h / 2 - frac * h)

    def absorb(self, b: float) -> None:
        """Remove the mass above b (those paths stopped)."""
        h = _GRID_STEP
        self.over = 0.0
        if b == math.inf:
            return
        pos = (b - self.x[0]) / h + 0.5
        if pos <= 0:
            self.mass[:] = 0.0
            return
        j = int(min(pos, self.mass.size))
        if j < self.mass.size:
            self.mass[j] *= pos - j
            self.mass[j + 1 :] = 0.0


def _crossing(times: np.ndarray, bounds: np.ndarray, theta: float) -> np.ndarray:
    """First-crossing probability at each look of B(t) (drift theta) above the given B-scale bounds."""
    walker = _Walker(theta, float(np.max(times)))
    out = np.empty(len(times))
    for k, (t, b) in enumerate(zip(times, bounds, strict=True)):
        walker.move(float(t))
        out[k] = walker.tail(float(b))
        walker.absorb(float(b))
    return out


@dataclass(frozen=True)
class GroupSequentialBoundary:
    """Efficacy z boundaries at the looks taken so far (the last one is the current look)."""

    fractions: tuple[float, ...]
    z: tuple[float, ...]
    spent: tuple[float, ...]
    used: tuple[bool, ...]

    @property
    def current_z(self) -> float:
        return self.z[-1]


def obf_boundary(fractions: Sequence[float], alpha: float, min_gap: float = 0.0) -> GroupSequentialBoundary:
    """Boundaries for looks at information fractions n_k / max_samples: every earlier look, then the current one.

    The caller passes every fraction it looked at, so hourly re-runs recompute the same earlier boundaries."""
    # min_gap > 0 leaves a look closer than that to the previous used one out of the joint computation (its
    # z is nan); its spent alpha still comes off the next look's budget, so the error stays <= alpha at
    # some loss of power. The current look is always used.
    ts = [float(f) for f in fractions]
    if not ts:
        raise ValueError("obf_boundary needs at least the current look")
    if any(b < a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError("information fractions must be non-decreasing")
    spend = obf_spending(np.asarray(ts), alpha)
    used: list[bool] = []
    last_used = -math.inf
    for k, t in enumerate(ts):
        keep = k == len(ts) - 1 or t >= last_used + min_gap
        used.append(keep)
        if keep:
            last_used = t
    walker = _Walker(0.0, max(ts))
    zs: list[float] = []
    prev_spent = 0.0
    for k, t in enumerate(ts):
        target = float(spend[k]) - prev_spent
        prev_spent = float(spend[k])
        if not used[k]:
            zs.append(math.nan)  # left out: only its spent alpha matters for later looks
            continue
        walker.move(t)
        b = walker.solve(target) if target > 1e-15 else math.inf
        zs.append(b / math.sqrt(t) if t > 0 else math.inf)
        walker.absorb(b)
    return GroupSequentialBoundary(tuple(ts), tuple(zs), tuple(float(s) for s in spend), tuple(used))


def group_sequential_bounds(
    estimate: float, se: float, n: float, looked_at: Sequence[float], max_samples: float, alpha: float
) -> Bounds:
    """Repeated one-sided bounds estimate -/+ c_k se at the current look under OBF spending.

    looked_at: sample sizes of the earlier evaluations (ascending); the current n is appended.
    """
    if n < 2 or not math.isfinite(se):
        return Bounds(estimate, se, -math.inf, math.inf, n)
    history = sorted(float(x) for x in looked_at if 0 < x < n)
    boundary = obf_boundary([x / max_samples for x in history] + [n / max_samples], alpha)
    c = boundary.current_z
    return Bounds(estimate, se, estimate - c * se, estimate + c * se, n)


@dataclass(frozen=True)
class GroupSequentialPlan:
    """Maximum sample size of the OBF design that reaches `power`, and its expected size at the effect."""

    n_fixed: float
    max_samples: float
    inflation: float
    expected_n: float


def plan_group_sequential(
    sigma: float, effect: float, margin: float, alpha: float, power: float, looks: int = 100
) -> GroupSequentialPlan:
    """Inflate the fixed-horizon n so that OBF with `looks` equally spaced looks has the planned power."""
    n_fixed = fixed_horizon_n(sigma, effect, margin, alpha, power)
    inflation, expected_ratio = _obf_ratios(round(alpha, 12), round(power, 12), looks)
    return GroupSequentialPlan(n_fixed, inflation * n_fixed, inflation, expected_ratio * n_fixed)


@lru_cache(maxsize=64)
def _obf_ratios(alpha: float, power: float, looks: int) -> tuple[float, float]:
    ts = np.arange(1, looks + 1) / looks
    zb = np.asarray(obf_boundary(list(ts), alpha, min_gap=0.0).z)
    bounds = zb * np.sqrt(ts)
    drift0 = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)

    def shortfall(theta: float) -> float:
        return float(_crossing(ts, bounds, theta).sum()) - power

    theta = float(brentq(shortfall, drift0 * 0.9, drift0 * 1.5, xtol=1e-6))
    first = _crossing(ts, bounds, theta)
    inflation = (theta / drift0) ** 2
    stop_at = np.sum(first * ts) + (1 - first.sum()) * 1.0
    return inflation, float(stop_at * inflation)
