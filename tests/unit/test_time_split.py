"""Data with a time axis: a date column is never silently a category, and `ci.split: time` holds out the latest
rows and validates every fold on rows later than all it trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rollout.ci import training
from rollout.config import ConfigError, parse_policy
from rollout.data import infer_schema


def daily(days: int = 730, seed: int = 0) -> pd.DataFrame:
    """A generated daily series: temperature with a season and a warming trend, humidity, a weekday, and whether
    it rains the next day (more likely when humid and cooler)."""
    rng = np.random.default_rng(seed)
    date = pd.date_range("2024-01-01", periods=days, freq="D")
    t = np.arange(days)
    temperature = 12 + 9 * np.sin(2 * np.pi * t / 365.25) + 0.004 * t + rng.normal(0, 2.5, days)
    humidity = np.clip(rng.normal(65, 12, days), 10, 100)
    logit = -0.5 + 0.08 * (humidity - 65) - 0.06 * (temperature - 12)
    return pd.DataFrame({"date": date.strftime("%Y-%m-%d"), "temperature": temperature.round(1),
                         "humidity": humidity.round(1), "weekday": date.day_name(),
                         "rain_tomorrow": (rng.random(days) < 1 / (1 + np.exp(-logit))).astype(int)})


def _policy(**data):
    return parse_policy({"data": {"source": "weather.csv", "target": "rain_tomorrow", "timestamp_column": None,
                                  "unit_column": None, "segment_column": None, **data}})


@pytest.mark.parametrize("as_datetime", [False, True])
def test_a_date_column_is_refused_as_a_category_saying_what_to_set(as_datetime):
    frame = daily()
    if as_datetime:  # as Parquet would give it
        frame["date"] = pd.to_datetime(frame["date"])
    with pytest.raises(ConfigError, match=r"column 'date' holds dates .* 730 levels: set data.timestamp_column: date"):
        infer_schema(frame, _policy().data)
    schema = infer_schema(frame, _policy(timestamp_column="date").data)
    assert "date" not in schema.features and "weekday" in schema.categorical  # a day name is a fine category


def test_the_time_split_needs_a_timestamp_column():
    with pytest.raises(ConfigError, match="ci.split 'time' orders rows by data.timestamp_column, which is not set"):
        parse_policy({"data": {"timestamp_column": None}, "ci": {"split": "time"}})


def test_time_split_holds_out_the_latest_rows_and_folds_chain_forward():
    frame = daily().sample(frac=1.0, random_state=1)  # rows in no particular order, as files often are
    policy = _policy(timestamp_column="date")
    schema = infer_schema(frame, policy.data)
    data = training.split(frame, schema, 0.2, 0, time_column="date")
    when = pd.to_datetime(frame["date"])
    assert data.time_ordered and len(data.x_holdout) == 146
    assert when.loc[data.x_train.index].max() < when.loc[data.x_holdout.index].min()
    assert when.loc[data.x_train.index].is_monotonic_increasing
    for train_idx, val_idx in training.folds("classification", 4, 0, True).split(data.x_train, data.y_train):
        train_times, val_times = when.loc[data.x_train.index[train_idx]], when.loc[data.x_train.index[val_idx]]
        assert train_times.max() < val_times.min()
    x_fit, x_val, *_ = training.inner_split(data.x_train, data.y_train, 0.1, "classification", 0, True)
    assert when.loc[x_fit.index].max() < when.loc[x_val.index].min()  # early stopping validates on later rows too
    # and the rest of CI runs on it: CV scores per forward fold
    cv = training.cross_validate_pipeline(training.build_pipeline(schema, policy.estimator), data, "classification",
                                          "roc_auc", 4, 0)
    assert len(cv.val_scores) == 4 and cv.val_mean > 0.6


def test_a_time_split_with_unreadable_times_names_the_column():
    frame = daily()
    frame.loc[3, "date"] = "not a date"
    schema = infer_schema(frame.drop(columns=["date"]), _policy().data)
    with pytest.raises(ConfigError, match=r"data.timestamp_column 'date': 1 of 730 rows have no readable time"):
        training.split(frame, schema, 0.2, 0, time_column="date")


def test_a_database_source_reads_the_query_and_names_the_field_that_fails(tmp_path, monkeypatch):
    """data.source as a SQLAlchemy URL (here SQLite, ${VAR} from the environment), data.query the SQL."""
    import sqlalchemy as sa

    from rollout.data import load_dataset

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    daily().to_sql("weather", engine, index=False)
    engine.dispose()
    monkeypatch.setenv("WAREHOUSE", str(tmp_path / "warehouse.db"))

    def policy(**data):
        return parse_policy({"data": {"target": "rain_tomorrow", "timestamp_column": "date", "unit_column": None,
                                      "segment_column": None, **data}}, tmp_path)

    frame = load_dataset(policy(source="sqlite:///${WAREHOUSE}", query="SELECT * FROM weather WHERE humidity > 70"))
    assert len(frame) == int((daily()["humidity"] > 70).sum()) and (frame["humidity"] > 70).all()
    assert pd.api.types.is_datetime64_any_dtype(frame["date"])  # the timestamp column, as for a CSV
    with pytest.raises(ConfigError, match="data.query: failed on sqlite:///.*no such table: wether"):
        load_dataset(policy(source="sqlite:///${WAREHOUSE}", query="SELECT * FROM wether"))
    with pytest.raises(ConfigError, match="data.query: data.source is a database URL; give the SQL"):
        load_dataset(policy(source="sqlite:///${WAREHOUSE}"))
    with pytest.raises(ConfigError, match=r"data.source: cannot connect to postgresql\+psycopg://reader:\*\*\*@"):
        load_dataset(policy(source="postgresql+psycopg://reader:hunter2@127.0.0.1:1/x?connect_timeout=2",
                            query="SELECT 1"))
