"""Production's served and labelled rows as the policy's training table (ci.training_data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from rollout.ci.production_data import training_frame
from rollout.config import ConfigError, Policy
from rollout.data import example_dataset, records_of
from rollout.outcomes import OutcomeStore, PredictionRow

T0 = pd.Timestamp("2026-05-01", tz="UTC").timestamp()


def _policy(source: str, **data: Any) -> Policy:
    return Policy.model_validate({"data": {"example": {"rows": 400, "seed": 3}, **data},
                                  "ci": {"training_data": {"source": source, "min_rows": 50, "days": 5}}})


def _store(tmp_path: Path, rows: int = 300, labelled: float = 1.0, challenger_rows: int = 0) -> OutcomeStore:
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    frame = example_dataset(rows=rows, seed=9, drift=0.8)
    inputs = frame.drop(columns=["approved", "applied_at", "customer_id"])
    logged = []
    for i, record in enumerate(records_of(inputs)):
        role = "challenger" if i < challenger_rows else "champion"
        logged.append(PredictionRow(f"r{i}", "2" if role == "challenger" else "1", role, T0 + i * 600,
                                    str(frame["customer_id"].iloc[i]), None, True, 1.0, 1.0, 0.7, features=record))
    logged.append(PredictionRow("shadow", "2", "challenger", T0, "c", None, False, None, 1.0, 0.7,
                                features={"income": 1.0}))  # shadow rows never train
    store.log_predictions(logged)
    store.add_labels((f"r{i}", int(y)) for i, y in enumerate(frame["approved"]) if i < labelled * rows)
    return store


def test_production_rows_become_the_policys_table_newest_last(tmp_path: Path) -> None:
    policy = _policy("production")
    template = example_dataset(rows=400, seed=3)
    data = training_frame(policy, template, _store(tmp_path))
    frame = data.frame
    assert list(frame.columns) == list(template.columns) and len(frame) == 300
    assert (frame.dtypes == template.dtypes).all(), pd.concat([frame.dtypes, template.dtypes], axis=1)
    assert frame["applied_at"].is_monotonic_increasing  # served time, oldest first: the time split holds out the latest
    assert frame["applied_at"].iloc[0] == pd.Timestamp(T0, unit="s")
    assert set(frame["approved"].unique()) <= {0, 1}
    assert data.params()["training_data.production_rows"] == 300 and data.source == "production"
    assert "latest rows by served time" in data.sentence()


def test_both_puts_the_policys_rows_before_production(tmp_path: Path) -> None:
    template = example_dataset(rows=400, seed=3)
    data = training_frame(_policy("both"), template, _store(tmp_path))
    assert len(data.frame) == 700 and (data.policy_rows, data.production_rows) == (400, 300)
    first_served = pd.Timestamp(T0, unit="s")
    assert (data.frame["applied_at"].iloc[:400] < first_served).all()  # older than every production row


def test_only_the_window_and_only_the_champions_rows(tmp_path: Path) -> None:
    policy = _policy("production")
    store = _store(tmp_path, rows=1200, challenger_rows=100)  # rows every 10 min: 1,200 span 8.3 days
    frame = training_frame(policy, example_dataset(rows=400, seed=3), store).frame
    assert len(frame) == 5 * 144 + 1  # the last 5 days before the latest labelled row, the champion's only
    with_challengers = Policy.model_validate({**policy.model_dump(mode="json", exclude={"base_dir"}), "ci": {
        "training_data": {"source": "production", "min_rows": 50, "days": 9, "challenger_rows": True}}})
    assert len(training_frame(with_challengers, example_dataset(rows=400, seed=3), store).frame) == 1200


def test_too_few_labelled_rows_say_how_many(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only 30 labelled production rows"):
        training_frame(_policy("production"), example_dataset(rows=400, seed=3), _store(tmp_path, labelled=0.1))


def test_an_input_not_logged_in_clear_cannot_train(tmp_path: Path) -> None:
    policy = Policy.model_validate({"data": {"example": {"rows": 400}}, "serving": {"log_features": ["income"]},
                                    "ci": {"training_data": {"source": "production", "min_rows": 50}}})
    store = OutcomeStore(f"sqlite:///{tmp_path / 'o.db'}").create()
    store.log_predictions([PredictionRow(f"r{i}", "1", features={"income": 1.0}, ts=T0 + i) for i in range(60)])
    store.add_labels((f"r{i}", 1) for i in range(60))
    with pytest.raises(ConfigError, match="not logged in clear"):
        training_frame(policy, example_dataset(rows=400, seed=3), store)


@pytest.mark.parametrize(("raw", "field"), [
    ({"data": {"source": "x.csv", "target": "y"}, "ci": {"training_data": {"source": "production"}}},
     "data.timestamp_column"),
    ({"serving": {"log_features": "none"}, "ci": {"training_data": {"source": "both"}}}, "log_features is none"),
])
def test_settings_that_cannot_work_are_refused(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Policy.model_validate(raw)
