"""The committed GX suite accepts good loan data and names what is wrong with bad data; drift
flags real shifts and stays quiet on samples of the same distribution."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rollout.config import DataConfig, DriftConfig
from rollout.data import example_dataset, infer_schema
from rollout.ci.validation import (
    KSResult,
    build_suite,
    drift_report,
    example_suite,
    ks,
    load_suite,
    psi,
    validate,
    write_suite,
)

SUITE = Path(__file__).resolve().parents[2] / "expectations" / "loan_training.json"


def failed_pairs(report) -> set[tuple[str, str | None]]:
    return {(f.expectation_type, f.column) for f in report.failed}


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return example_dataset(rows=3000, seed=7)


@pytest.fixture(scope="module")
def schema(train):
    return infer_schema(train, DataConfig())


@pytest.fixture
def good() -> pd.DataFrame:
    return example_dataset(rows=600, seed=11)


# ----------------------------------------------------------------------------- the suite


def expectation_set(suite) -> list[str]:
    return sorted(json.dumps(e.configuration.to_json_dict(), sort_keys=True) for e in suite.expectations)


def test_committed_suite_loads_and_matches_what_build_suite_derives():
    committed = load_suite(SUITE)
    assert committed.name == "loan_training"
    assert expectation_set(committed) == expectation_set(example_suite())


def test_committed_suite_encodes_the_loan_domain():
    by_key = {
        (e["type"], e["kwargs"].get("column")): e["kwargs"] for e in json.loads(SUITE.read_text())["expectations"]
    }
    assert by_key[("expect_column_values_to_be_between", "credit_score")] == {
        "column": "credit_score",
        "min_value": 300.0,
        "max_value": 850.0,
    }
    assert by_key[("expect_column_values_to_be_between", "debt_to_income")]["max_value"] == 1.5
    assert by_key[("expect_column_values_to_be_between", "income")]["strict_min"] is True
    assert "VIP" in by_key[("expect_column_values_to_be_in_set", "tier")]["value_set"]
    assert by_key[("expect_column_values_to_be_in_set", "approved")]["value_set"] == [0, 1]
    mean = by_key[("expect_column_mean_to_be_between", "approved")]
    assert (mean["min_value"], mean["max_value"]) == (0.2, 0.8)
    for nullable in ("credit_score", "employment_years", "debt_to_income", "home_ownership"):
        assert 0.5 < by_key[("expect_column_values_to_not_be_null", nullable)]["mostly"] < 1
    for strict in ("income", "tier", "approved", "purpose", "region"):
        assert "mostly" not in by_key[("expect_column_values_to_not_be_null", strict)]
    assert ("expect_table_columns_to_match_set", None) in by_key
    assert by_key[("expect_table_row_count_to_be_between", None)]["min_value"] >= 100


def test_build_suite_round_trips_through_json(tmp_path, train, schema):
    suite = build_suite(train, schema, "starter")
    path = write_suite(suite, tmp_path / "starter.json")
    assert expectation_set(load_suite(path)) == expectation_set(suite)
    assert validate(train, path).success


def test_a_misspelled_expectation_is_an_error_not_silently_dropped(tmp_path):
    raw = json.loads(SUITE.read_text())
    raw["expectations"][3]["type"] = "expect_column_values_to_be_betwen"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"#3 \(expect_column_values_to_be_betwen\)"):
        load_suite(path)


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "knobs",
    [
        {"seed": 1},
        {"seed": 2},
        {"seed": 3, "rows": 150},
        {"seed": 4, "drift": 1.0},
        {"seed": 5, "drift": 3.0, "label_noise": 0.2},
    ],
)
def test_suite_passes_on_example_data(knobs):
    frame = example_dataset(**{"rows": 800, **knobs})
    report = validate(frame, SUITE)
    assert report.success, report.to_markdown()
    assert report.failed == ()
    assert report.statistics["evaluated_expectations"] == 40


def test_a_column_of_nulls_fails_on_that_column(good):
    good["income"] = np.nan
    report = validate(good, SUITE)
    assert not report.success
    assert failed_pairs(report) == {("expect_column_values_to_not_be_null", "income")}
    assert "600 of 600 rows (100.0%) null" in report.failed[0].observed


def test_a_nullable_column_may_have_gaps_but_not_too_many(good):
    good.loc[good.index[:300], "employment_years"] = np.nan
    report = validate(good, SUITE)
    assert failed_pairs(report) == {("expect_column_values_to_not_be_null", "employment_years")}
    assert "at least 81% of rows" in report.failed[0].expected


def test_strings_in_income_fail_the_type_check(good):
    good["income"] = good["income"].astype(str)
    report = validate(good, SUITE)
    assert ("expect_column_values_to_be_in_type_list", "income") in failed_pairs(report)
    assert {c for _, c in failed_pairs(report)} == {"income"}


def test_out_of_range_values_are_counted_with_examples(good):
    good.loc[good.index[:3], "credit_score"] = 900.0
    good.loc[good.index[:5], "debt_to_income"] = 2.5
    good.loc[good.index[0], "income"] = -10.0
    report = validate(good, SUITE)
    assert failed_pairs(report) == {
        ("expect_column_values_to_be_between", "credit_score"),
        ("expect_column_values_to_be_between", "debt_to_income"),
        ("expect_column_values_to_be_between", "income"),
    }
    credit = next(f for f in report.failed if f.column == "credit_score")
    assert credit.expected == "values >= 300 and <= 850"
    assert credit.observed.startswith("3 of 600 rows") and "900" in credit.observed
    income = next(f for f in report.failed if f.column == "income")
    assert "> 0" in income.expected


def test_unexpected_and_missing_columns_are_named(good):
    frame = good.drop(columns=["region"]).assign(nickname="x")
    report = validate(frame, SUITE)
    table = next(f for f in report.failed if f.expectation_type == "expect_table_columns_to_match_set")
    assert table.column is None
    assert "missing region" in table.observed and "unexpected nickname" in table.observed
    region = [f for f in report.failed if f.column == "region"]
    assert region and all(f.observed == "the column is missing" for f in region)


def test_unseen_levels_and_a_bad_target_fail():
    frame = example_dataset(rows=600, seed=12, new_levels=True)
    frame.loc[frame.index[:4], "approved"] = 2
    report = validate(frame, SUITE)
    assert {
        ("expect_column_values_to_be_in_set", "purpose"),
        ("expect_column_values_to_be_in_set", "region"),
        ("expect_column_values_to_be_in_set", "approved"),
    } <= failed_pairs(report)
    purpose = next(f for f in report.failed if f.column == "purpose")
    assert "crypto" in purpose.observed or "wedding" in purpose.observed


def test_too_few_rows_and_unbalanced_target_fail():
    frame = example_dataset(rows=60, seed=3).assign(approved=1)
    report = validate(frame, SUITE)
    assert {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_mean_to_be_between", "approved"),
    } <= failed_pairs(report)


def test_report_renders_every_failure_in_words(good):
    good["income"] = np.nan
    good.loc[good.index[:2], "credit_score"] = 100.0
    report = validate(good, SUITE)
    md = report.to_markdown()
    assert "FAILED" in md and "38 of 40 expectations met on 600 rows" in md
    assert "`income`: expected no nulls" in md
    assert "`credit_score`: expected values >= 300 and <= 850; 2 of 600 rows" in md
    data = json.loads(json.dumps(report.to_dict()))
    assert data["success"] is False
    assert {(f["expectation_type"], f["column"]) for f in data["failed"]} == failed_pairs(report)


def test_validate_is_offline_and_leaves_the_current_gx_context_alone(good, monkeypatch):
    import great_expectations as gx
    from great_expectations.data_context.data_context.context_factory import project_manager

    mine = gx.get_context(mode="ephemeral")

    def refuse(*args, **kwargs):
        raise AssertionError("validate tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert validate(good, SUITE).success
    assert project_manager.get_current_project() is mine


# ----------------------------------------------------------------------------- drift


def test_income_and_debt_drift_is_flagged_with_its_numbers(train, schema):
    report = drift_report(train, example_dataset(rows=2000, seed=8, drift=1.0), schema, DriftConfig())
    assert {"income", "debt_to_income"} <= set(report.drifted)
    assert not set(report.drifted) & set(schema.categorical)
    income = report["income"]
    assert income.effect == "psi" and income.effect_size > 0.2 and income.p_value < 1e-6
    md = report.to_markdown()
    assert "`income` drifted: PSI" in md and "`debt_to_income` drifted" in md
    # drift=1 moves credit scores by 0.4 sd: significant, but PSI ~0.18 stays under 0.2;
    # a stronger shift crosses it.
    assert report["credit_score"].p_value < 1e-6 and not report["credit_score"].drifted
    stronger = drift_report(train, example_dataset(rows=2000, seed=8, drift=2.0), schema)
    assert "credit_score" in stronger.drifted


def test_new_levels_flag_purpose_and_region(train, schema):
    report = drift_report(train, example_dataset(rows=2000, seed=9, new_levels=True), schema)
    assert set(report.drifted) == {"purpose", "region"}
    assert report["purpose"].unseen_levels == ("crypto", "wedding")
    assert report["region"].unseen_levels == ("overseas",)
    assert "unseen levels: overseas" in report.to_markdown()


def test_same_distribution_rarely_flags_anything(schema):
    # 50 independent training/production pairs at production-window size: false alarms <= 4%.
    alarms = 0
    for seed in range(50):
        report = drift_report(
            example_dataset(rows=3000, seed=seed), example_dataset(rows=2000, seed=10_000 + seed), schema
        )
        alarms += bool(report.drifted)
    assert alarms <= 2


def test_small_samples_do_not_flag_noise(train, schema):
    report = drift_report(train, example_dataset(rows=30, seed=4), schema)
    assert report.drifted == []
    # Noise alone pushes some PSI past the limit at n=30; the significance test holds it back.
    assert max(f.effect_size for f in report.features if f.effect == "psi") > 0.2


def test_large_samples_do_not_flag_trivial_shifts(train, schema):
    report = drift_report(train, example_dataset(rows=30_000, seed=3, drift=0.15), schema)
    assert report.drifted == []
    assert report["income"].p_value < 0.001  # detectable, but not material


def test_a_feature_gone_missing_in_production_drifts(train, schema):
    production = example_dataset(rows=2000, seed=3).assign(credit_score=np.nan)
    report = drift_report(train, production, schema)
    assert report.drifted == ["credit_score"]
    assert report["credit_score"].test == "ks+missing"


def test_drift_report_needs_every_feature(train, schema):
    with pytest.raises(ValueError, match="region"):
        drift_report(train, example_dataset(rows=100, seed=1).drop(columns=["region"]), schema)


def test_drift_report_serialises(train, schema):
    report = drift_report(train, example_dataset(rows=500, seed=2), schema)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True and data["drifted"] == []
    assert {f["feature"] for f in data["features"]} == set(schema.features)
    assert data["limits"]["psi_max"] == 0.2


def test_psi_and_ks_helpers():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 5000)
    assert psi(base, rng.normal(0, 1, 5000), bins=10) < 0.01
    shifted = psi(base, rng.normal(1, 1, 5000), bins=10)
    assert 0.6 < shifted < 1.3  # about d^2 for a mean shift of d sd
    with_gaps = np.where(rng.random(5000) < 0.5, np.nan, base)
    assert psi(base, with_gaps) > 0.2  # missing values form their own bin
    levels = np.array(["a", "b", "c"])
    assert psi(levels[rng.integers(0, 3, 3000)], levels[rng.integers(0, 2, 3000)]) > 0.2
    same = ks(base, base)
    assert isinstance(same, KSResult) and same.statistic == 0 and same.p_value == 1
    far = ks(base, base + 1)
    assert far.p_value < 1e-10 and far.statistic > 0.3
    assert np.isnan(ks(base, []).p_value)
