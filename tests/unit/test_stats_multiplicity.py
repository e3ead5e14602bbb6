"""Error control across several challengers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from rollout.stats import multiplicity, simulation


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03], [0.001, 0.2, 0.0125, 0.04], [0.5, 0.6]])
def test_holm_and_bonferroni_match_statsmodels(p: list[float]) -> None:
    for ours, method in ((multiplicity.holm, "holm"), (multiplicity.bonferroni, "bonferroni")):
        rejected, adjusted = ours(p, 0.05)
        sm_rejected, sm_adjusted, _, _ = multipletests(p, alpha=0.05, method=method)
        assert rejected == list(sm_rejected)
        assert adjusted == pytest.approx(list(sm_adjusted))


def test_holm_levels_follow_the_step_down() -> None:
    levels = multiplicity.holm_levels([0.01, 0.04, 0.03], 0.05)
    assert levels == pytest.approx([0.05 / 3, 0.05 / 3, 0.05 / 3])  # stops at 0.03 > 0.025
    levels = multiplicity.holm_levels([0.001, 0.02, 0.04], 0.05)
    assert levels == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])
    assert multiplicity.bonferroni_alpha(0.05, 2) == 0.025


def test_uncorrected_abc_test_inflates_family_wise_error_and_corrections_fix_it() -> None:
    rng = np.random.default_rng(5)
    runs = 20_000
    raw = simulation.simulate_family_wise_error(rng, n_runs=runs, correction="none")
    assert raw > 0.075  # about 8.8% with two challengers sharing a control
    mc = 3 * math.sqrt(0.05 * 0.95 / runs)
    for correction in ("bonferroni", "holm"):
        assert simulation.simulate_family_wise_error(rng, n_runs=runs, correction=correction) <= 0.05 + mc
