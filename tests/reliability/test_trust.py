"""No code from the registry: only skops-saved scikit-learn models load, with exact type names (issue: safety)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from rollout import registry
from rollout.ci import training
from rollout.config import ConfigError, EstimatorConfig, parse_policy
from rollout.data import example_dataset, infer_schema
from rollout.registry import TRUSTED_TYPES, UntrustedModel, check_trusted, save_local, trusted_types


class Doubler(BaseEstimator, TransformerMixin):
    """A team's own transformer: a class a model file names, from a module installed where models load."""

    def fit(self, x: Any, y: Any = None) -> Doubler:
        return self

    def transform(self, x: Any) -> Any:
        return np.asarray(x, dtype=float) * 2


@pytest.mark.parametrize("name", sorted([*training.ESTIMATORS, *training.BOOSTERS]))
def test_every_supported_estimator_needs_only_allow_listed_types(name: str) -> None:
    frame = example_dataset(rows=300, seed=1)
    cfg = parse_policy({}).data
    schema = infer_schema(frame, cfg)
    y = frame["approved"]
    if name in {"ridge", "linear_regression"} or name.endswith("_regressor"):
        schema = type(schema)(**{**schema.__dict__, "task": "regression"})
        y = frame["income"].fillna(0.0) / 1000.0
    model = training.build_pipeline(schema, EstimatorConfig.model_construct(name=name, params={})).fit(
        frame[list(schema.features)], y)
    assert set(trusted_types(model)) <= TRUSTED_TYPES


def _saved(tmp_path: Path) -> Path:
    x = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
    save_local(LogisticRegression().fit(x, [0, 0, 1, 1]), tmp_path / "model", x, "classification")
    return tmp_path / "model"


def _edit(model_dir: Path, change: Any) -> None:
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    change(meta)
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))


def test_a_file_asking_to_trust_eval_and_numpy_functions_is_refused_by_name(tmp_path: Path) -> None:
    """The exact list of the reported attack: every name sat inside the old prefix allow-list."""
    model_dir = _saved(tmp_path)
    _edit(model_dir, lambda m: m["flavors"]["sklearn"].__setitem__(
        "skops_trusted_types", ["builtins.eval", "numpy.vectorize", "numpy.full_like", "numpy.dtype"]))
    with pytest.raises(UntrustedModel, match=r"builtins\.eval, numpy\.full_like, numpy\.vectorize.*trusted_modules"):
        check_trusted(model_dir)


def test_pickle_and_code_carrying_flavours_are_refused_naming_the_flavour(tmp_path: Path) -> None:
    model_dir = _saved(tmp_path)
    _edit(model_dir, lambda m: m["flavors"]["sklearn"].__setitem__("serialization_format", "cloudpickle"))
    with pytest.raises(UntrustedModel, match="'cloudpickle'; only skops is loaded"):
        check_trusted(model_dir)
    _edit(model_dir, lambda m: m["flavors"].pop("sklearn"))
    _edit(model_dir, lambda m: m["flavors"]["python_function"].__setitem__("loader_module", "mlflow.pyfunc.model"))
    with pytest.raises(UntrustedModel, match="loader 'mlflow.pyfunc.model'.*carrying Python code"):
        check_trusted(model_dir)


def test_a_registered_pyfunc_model_never_runs_its_code_on_load(tmp_path: Path) -> None:
    import mlflow
    import mlflow.pyfunc

    marker = tmp_path / "ran"

    class Sneaky(mlflow.pyfunc.PythonModel):  # its load_context runs in whoever loads it
        def load_context(self, context: Any) -> None:
            Path(str(marker)).write_text("load_context ran")

        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            return np.zeros(len(model_input))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = registry.experiment_id(uri, "trust", (tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=Sneaky())
    mlflow.register_model(info.model_uri, "sneaky")
    marker.unlink(missing_ok=True)  # MLflow itself loads the model once while logging it
    with pytest.raises(UntrustedModel, match="python_function with loader 'mlflow.pyfunc.model'"):
        registry.MlflowRegistry(uri, "sneaky").load("1")
    assert not marker.exists()


def test_own_classes_load_only_from_modules_the_policy_trusts_by_name(tmp_path: Path) -> None:
    x = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
    model = make_pipeline(Doubler(), LogisticRegression()).fit(x, [0, 0, 1, 1])
    with pytest.raises(UntrustedModel, match=r"tests\.reliability\.test_trust\.Doubler.*registry\.trusted_modules"):
        trusted_types(model)
    loaded = save_local(model, tmp_path / "own", x, "classification", trusted_modules=["tests.reliability"])
    assert np.asarray(loaded.predict(x)).shape == (4, 2)
    with pytest.raises(UntrustedModel, match="Doubler"):
        check_trusted(tmp_path / "own")  # a loader without the policy's setting refuses the same file


@pytest.mark.parametrize("module", ["builtins", "numpy", "os.path", "not a module"])
def test_the_policy_cannot_trust_libraries_that_run_code(module: str) -> None:
    with pytest.raises(ConfigError, match="registry.trusted_modules"):
        parse_policy({"registry": {"trusted_modules": [module]}})
