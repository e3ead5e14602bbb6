"""A thin adapter over MlflowClient: aliases (the source of truth), mirrored stages, tags, loading.

Aliases: `champion`, `challenger` (`challenger-2`, ... for A/B/n), `previous-champion`.
Stages are deprecated in MLflow and only mirrored for users of the stage UI (one switch).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from rollout.config import CLASSIFICATION_TASKS, Policy
from rollout.roles import stage_of

log = logging.getLogger(__name__)

# The types outside skops' own defaults that a model of a supported estimator needs, by exact name (a unit
# test saves every estimator in rollout.ci.training.ESTIMATORS and BOOSTERS and checks it needs no other). Nothing from
# builtins, no numpy function: a name in a file's trusted list is what skops will construct or call.
TRUSTED_TYPES = frozenset({
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    # XGBoost and LightGBM: their scikit-learn wrappers around a booster restored from its own model format
    # (XGBoost's UBJSON bytes, LightGBM's model text), not from code.
    "xgboost.core.Booster", "xgboost.sklearn.XGBClassifier", "xgboost.sklearn.XGBRegressor",
    "lightgbm.basic.Booster", "lightgbm.sklearn.LGBMClassifier", "lightgbm.sklearn.LGBMRegressor",
    "collections.OrderedDict",
    "numpy.ravel",  # flattens a text column for TF-IDF (training.text_pipeline)
})
# The ways a model is loaded, none of which runs code from the file: scikit-learn's flavour serialised with
# skops, or XGBoost's own flavour, whose scikit-learn wrapper is restored from the booster's model format.
_LOADER = "mlflow.sklearn"
_XGBOOST_LOADER = "mlflow.xgboost"
# MLflow's xgboost flavour constructs the class its file names: only these, by exact name. A bare Booster is
# left out: it predicts from a DMatrix, not from the rows the service receives.
XGBOOST_CLASSES = frozenset({"xgboost.sklearn.XGBClassifier", "xgboost.sklearn.XGBRegressor"})
XGBOOST_FORMATS = frozenset({"xgb", "json", "ubj"})  # the booster's own formats (not pickle)


class AliasConflict(RuntimeError):
    """Compare-and-set failed: the alias moved since it was read."""


class UntrustedModel(RuntimeError):
    """The model would run code rollout does not trust: a flavour other than skops-saved scikit-learn, or a
    type outside the allow-list and the policy's `registry.trusted_modules`."""


class ModelRegistry(Protocol):
    """The registry operations the flows and the service use (fake in tests, MLflow in production)."""

    def version_for_alias(self, alias: str) -> str | None: ...
    def aliases(self) -> dict[str, str]: ...
    def set_alias(self, alias: str, version: str, expected: str | None = ...) -> None: ...
    def remove_alias(self, alias: str) -> None: ...
    def mirror_stage(self, version: str, stage: str) -> None: ...
    def set_tags(self, version: str, tags: dict[str, str]) -> None: ...
    def get_tags(self, version: str) -> dict[str, str]: ...
    def has_version(self, version: str) -> bool: ...


_ANY = object()


class MlflowRegistry:
    """The MLflow model registry for one registered model name."""

    def __init__(self, tracking_uri: str, model_name: str, mirror_stages: bool = True,
                 trusted_modules: tuple[str, ...] = (), cache: ModelCache | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.mirror_stages = mirror_stages
        self.trusted_modules = tuple(trusted_modules)
        self.cache = cache
        self._client: Any = None

    @classmethod
    def for_policy(cls, policy: Policy, cached: bool = False) -> MlflowRegistry:
        """The policy's registered model, with its trust settings (and, for the service, its local model cache)."""
        cache = ModelCache(policy.path(policy.serving.model_cache_dir), policy.registry.model_name) if cached else None
        if policy.artifact_location is not None:
            follow_move(policy.tracking_uri, policy.artifact_location)
        return cls(policy.tracking_uri, policy.registry.model_name, policy.registry.mirror_stages,
                   tuple(policy.registry.trusted_modules), cache)

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.model_name)
            except MlflowException:  # created concurrently
                pass

    def version_for_alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                return None
            raise

    def aliases(self) -> dict[str, str]:
        """Every alias of the model ({} before its first version); raises when the registry cannot answer."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")):
                return {}
            raise
        aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
        if self.cache is not None:
            self.cache.save_aliases(aliases)
        return aliases

    def cached_aliases(self) -> dict[str, str]:
        """The aliases the registry last answered, from the local cache ({} without one)."""
        return {} if self.cache is None else self.cache.aliases()

    def set_alias(self, alias: str, version: str, expected: str | None | object = _ANY) -> None:
        """Point `alias` at `version`; with `expected`, only if it still points where it was read."""
        if expected is not _ANY:
            current = self.version_for_alias(alias)
            if current != expected:
                raise AliasConflict(f"@{alias} is at {current}, expected {expected}")
        self.client.set_registered_model_alias(self.model_name, alias, str(version))
        stage = stage_of(alias)
        if stage:
            self.mirror_stage(version, stage)

    def remove_alias(self, alias: str) -> None:
        if self.version_for_alias(alias) is not None:
            self.client.delete_registered_model_alias(self.model_name, alias)

    def mirror_stage(self, version: str, stage: str) -> None:
        """Mirror the alias to the deprecated stage field, for users of the stage UI."""
        if not self.mirror_stages:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client.transition_model_version_stage(self.model_name, str(version), stage)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, str(value))

    def get_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, str(version)).tags or {})

    def has_version(self, version: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
                return False
            raise
        return True

    def run_id(self, version: str) -> str | None:
        run_id = self.client.get_model_version(self.model_name, str(version)).run_id
        return None if run_id is None else str(run_id)

    def model_uri(self, version: str) -> str:
        return f"models:/{self.model_name}/{version}"

    def load(self, version: str) -> Any:
        """Load a version as an MLflow pyfunc, refusing files that ask to trust unexpected types."""
        import mlflow.pyfunc
        from mlflow.artifacts import download_artifacts

        try:
            # Resolve through this client (not the global registry URI) to where the files really are.
            source = self.client.get_model_version_download_uri(self.model_name, str(version))
            local = Path(download_artifacts(artifact_uri=source, tracking_uri=self.tracking_uri))
        except Exception:
            cached = None if self.cache is None else self.cache.get(str(version))
            if cached is None:
                raise
            log.warning("registry unreachable: version %s loads from the local cache %s", version, cached)
            local = cached
        check_trusted(local, self.trusted_modules)
        if self.cache is not None and local != self.cache.get(str(version)):
            local = self.cache.put(str(version), local)
        return mlflow.pyfunc.load_model(str(local))


    def load_uri(self, model_uri: str) -> Any:
        """Load a model from any MLflow URI (models:/name/7, models:/name@alias, runs:/id/model, a logged
        model's models:/m-...) through the same trust check as a version; a ValueError when it is not there."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            local = Path(download_artifacts(artifact_uri=model_uri, tracking_uri=self.tracking_uri))
        except MlflowException as exc:
            raise ValueError(f"model URI {model_uri!r}: not found in {self.tracking_uri} ({exc.message})") from exc
        if not (local / "MLmodel").exists():
            raise ValueError(f"model URI {model_uri!r} holds no MLmodel file: is it the model's folder?")
        check_trusted(local, self.trusted_modules, name=model_uri)
        return mlflow.pyfunc.load_model(str(local))

    def describe(self, version: str, text: str) -> None:
        """The version's description in the registry UI: what it is and how it did."""
        self.client.update_model_version(self.model_name, version, description=text)

    def rename_run(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    @property
    def server_url(self) -> str | None:
        """The tracking server's address, which a browser can open (None for a local store)."""
        return self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://")) else None

    def run_url(self, run_id: str) -> str | None:
        """The run's page when MLflow runs behind a tracking server (None for a local store: no UI address)."""
        if self.server_url is None:
            return None
        run = self.client.get_run(run_id)
        # MLflow 3.17's UI picks GenAI or model-training pages from the URL (else the browser's last choice)
        return f"{self.server_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"

    def artifact_url(self, run_id: str, path: str) -> str | None:
        """A run's artifact file as the MLflow server hands it to a browser (its UI's own download route), for
        a Prefect image artifact to show; None for a local store (no server to fetch it from)."""
        from urllib.parse import urlencode

        if self.server_url is None:
            return None
        return f"{self.server_url}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"

    def adopt(self, model_uri: str, tags: dict[str, str]) -> str:
        """Make a model from elsewhere a version of this registered model, carrying `tags`: a version of this
        model already (models:/<this name>/<n>) is kept as it is; anything else is registered anew."""
        import re

        import mlflow

        same = re.fullmatch(rf"models:/{re.escape(self.model_name)}/(\d+)", model_uri)
        if same is not None:
            version = same.group(1)
        else:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            version = str(mlflow.register_model(model_uri, self.model_name).version)
        self.set_tags(version, tags)
        return version


def untrusted(types: Iterable[str], trusted_modules: Sequence[str] = ()) -> list[str]:
    """The type names outside the allow-list and outside every module the policy trusts by name."""
    return sorted(t for t in types if t not in TRUSTED_TYPES
                  and not any(t.startswith(f"{m}.") for m in trusted_modules))


def check_trusted(model_dir: Path, trusted_modules: Sequence[str] = (), name: str | None = None) -> None:
    """Refuse, before anything is loaded, a model that is not skops-saved scikit-learn or whose file asks
    skops to trust a type outside the allow-list (MLflow itself would trust whatever list the file carries).
    `name` is how messages call the model (its URI); the folder by default."""
    import yaml

    name = name or f"model at {model_dir}"

    meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    flavors = meta.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    loader = pyfunc.get("loader_module")
    if any((f or {}).get("code") for f in flavors.values() if isinstance(f, dict)):
        raise UntrustedModel(f"{name} carries code paths (MLflow's code_paths would put its Python files on the "
                             "import path); rollout loads no code from a model")
    if loader == _XGBOOST_LOADER and "xgboost" in flavors:
        _check_xgboost(flavors["xgboost"], name)
        return
    if loader != _LOADER or "sklearn" not in flavors:
        what = f"python_function with loader {loader!r}" if pyfunc else f"flavours {sorted(flavors)}"
        raise UntrustedModel(
            f"{name} has {what}; rollout loads scikit-learn models saved with skops and XGBoost's scikit-learn "
            "models in MLflow's xgboost flavour (a model carrying Python code, such as a pyfunc python_model or a "
            "cloudpickle file, is refused; a LightGBM model: log it with mlflow.sklearn.log_model(..., "
            "serialization_format='skops'))")
    sklearn = flavors["sklearn"]
    if sklearn.get("serialization_format") != "skops":
        raise UntrustedModel(f"{name} is saved as {sklearn.get('serialization_format')!r}; "
                             "only skops is loaded (pickle and cloudpickle can run any code)")
    bad = untrusted(sklearn.get("skops_trusted_types") or [], trusted_modules)
    if bad:
        raise UntrustedModel(f"{name} asks to trust {', '.join(bad)}: not on the allow-list "
                             "(add your own package to registry.trusted_modules to trust its classes by name)")


def _check_xgboost(conf: dict[str, Any], name: str) -> None:
    """MLflow's xgboost flavour: an allow-listed scikit-learn class, restored from a booster format."""
    model_class = conf.get("model_class", "xgboost.core.Booster")
    if model_class not in XGBOOST_CLASSES:
        raise UntrustedModel(f"{name} is an xgboost model of class {model_class!r}; rollout loads "
                             f"{', '.join(sorted(XGBOOST_CLASSES))} (log the scikit-learn API's model)")
    model_format = conf.get("model_format", "xgb")
    data = str(conf.get("data", ""))
    if model_format not in XGBOOST_FORMATS or not data.endswith(tuple(f".{f}" for f in XGBOOST_FORMATS)):
        raise UntrustedModel(f"{name} is an xgboost model saved as {model_format!r} ({data}); rollout loads the "
                             f"booster's own formats ({', '.join(sorted(XGBOOST_FORMATS))})")


@dataclass
class InMemoryRegistry:
    """A fake registry for unit tests: aliases and tags in dicts, models as Python objects."""

    models: dict[str, Any] = field(default_factory=dict)
    alias_map: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    unreachable: bool = False

    def _check(self) -> None:
        if self.unreachable:
            raise ConnectionError("registry unreachable")

    def add(self, model: Any) -> str:
        version = str(len(self.models) + 1)
        self.models[version] = model
        return version

    def version_for_alias(self, alias: str) -> str | None:
        self._check()
        return self.alias_map.get(alias)

    def aliases(self) -> dict[str, str]:
        self._check()
        return dict(self.alias_map)

    def set_alias(self, alias: str, version: str, expected: str | None | object = _ANY) -> None:
        self._check()
        if expected is not _ANY and self.alias_map.get(alias) != expected:
            raise AliasConflict(f"@{alias} is at {self.alias_map.get(alias)}, expected {expected}")
        self.alias_map[alias] = str(version)
        stage = stage_of(alias)
        if stage:
            self.stages[str(version)] = stage

    def remove_alias(self, alias: str) -> None:
        self._check()
        self.alias_map.pop(alias, None)

    def mirror_stage(self, version: str, stage: str) -> None:
        self.stages[str(version)] = stage

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(str(version), {}).update({k: str(v) for k, v in tags.items()})

    def get_tags(self, version: str) -> dict[str, str]:
        return dict(self.tags.get(str(version), {}))

    def has_version(self, version: str) -> bool:
        self._check()
        return str(version) in self.models

    def cached_aliases(self) -> dict[str, str]:
        """What a service would have cached: the aliases as they stand, even while `unreachable`."""
        return dict(self.alias_map)

    def load(self, version: str) -> Any:
        self._check()
        return self.models[str(version)]


def trusted_types(model: Any, trusted_modules: Sequence[str] = ()) -> list[str]:
    """The types skops must be told to trust for this model, all on the allow-list (else refuse, naming them)."""
    import skops.io as sio

    needed = sorted(sio.get_untrusted_types(data=sio.dumps(model)))
    bad = untrusted(needed, trusted_modules)
    if bad:
        raise UntrustedModel(f"the model contains {', '.join(bad)}: not on the allow-list (add your own package "
                             "to registry.trusted_modules to trust its classes by name)")
    return needed


def _flavor_kwargs(model: Any, x_example: Any, task: str, trusted_modules: Sequence[str]) -> dict[str, Any]:
    from mlflow.models import infer_signature

    from rollout.models import LoadedModel

    prediction, _ = LoadedModel(model).predict(x_example).checked()
    output = model.predict_proba(x_example) if task in CLASSIFICATION_TASKS else prediction
    return {
        # Explicit requirements: MLflow would otherwise infer them by re-loading the model in a
        # subprocess, which costs seconds per save.
        "pip_requirements": _requirements(),
        "signature": infer_signature(x_example, output),
        "input_example": x_example.head(3),
        "serialization_format": "skops",
        "skops_trusted_types": trusted_types(model, trusted_modules),
        # Classifiers serve probabilities: labels alone cannot be scored by log loss or Brier.
        "pyfunc_predict_fn": "predict_proba" if task in CLASSIFICATION_TASKS else "predict",
    }


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "scikit-learn", "skops", "numpy", "pandas", "scipy")]


def save_local(model: Any, path: Path, x_example: Any, task: str, trusted_modules: Sequence[str] = ()) -> Any:
    """Save a fitted pipeline as MLflow would log it, and load it back the way serving does."""
    import mlflow.pyfunc
    import mlflow.sklearn

    mlflow.sklearn.save_model(model, str(path), **_flavor_kwargs(model, x_example, task, trusted_modules))
    check_trusted(path, trusted_modules)
    return mlflow.pyfunc.load_model(str(path))


def log_model(model: Any, x_example: Any, task: str, registered_model_name: str | None,
              tags: dict[str, str] | None = None, trusted_modules: Sequence[str] = ()) -> Any:
    """Log the fitted pipeline in the active run; with a name, register a new version with `tags` too
    (one registry call, not one per tag). Returns MLflow's ModelInfo."""
    import mlflow
    import mlflow.sklearn

    info = mlflow.sklearn.log_model(model, name="model", **_flavor_kwargs(model, x_example, task, trusted_modules))
    if registered_model_name:
        version = mlflow.register_model(info.model_uri, registered_model_name,
                                        tags={k: str(v) for k, v in (tags or {}).items()})
        info.registered_model_version = int(version.version)
    return info


@dataclass(frozen=True)
class RunRecord:
    """What an MLflow run records: params, metrics, tags, and artifacts (text, JSON, figures, files) by path."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    dicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # artifact folder -> local file


# Where MLflow 3 keeps absolute artifact locations in its database: a local store moved with its folder points
# at the old folder from these until they are rewritten (MLflow records no relative locations: mlflow/mlflow#3144).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))
_FOLLOWED: set[tuple[str, str]] = set()


def follow_move(tracking_uri: str, root_uri: str) -> str | None:
    """Make an embedded MLflow store (SQLite) that was moved or copied with its folder resolve its artifacts in
    its own folder again.

    Applies when the artifact root lies in the database's folder (the demo's `.rollout/mlflow.db` and
    `.rollout/mlartifacts`): an experiment whose artifact location is that same relative path under another
    folder was made where the store used to be, so it is pointed at `root_uri`, with every run, logged model
    and model version under the old root, in one transaction. Nothing to do once done (checked once per
    process). Returns the old root when it rewrote one."""
    from urllib.request import url2pathname

    if (not tracking_uri.startswith("sqlite:///") or not root_uri.startswith("file:")
            or (tracking_uri, root_uri) in _FOLLOWED):
        return None
    database = Path(url2pathname(tracking_uri.removeprefix("sqlite:///"))).resolve()
    root = Path(url2pathname(root_uri.split("://", 1)[-1])).resolve()
    if not database.exists() or not root.is_relative_to(database.parent):
        return None
    relative = root.relative_to(database.parent).as_posix()
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(tracking_uri)
    moved: str | None = None
    try:
        with engine.begin() as conn:
            tables = set(inspect(conn).get_table_names())
            if "experiments" not in tables:
                return None
            for (location,) in conn.execute(text("SELECT artifact_location FROM experiments "
                                                 "WHERE artifact_location LIKE 'file:%'")):
                old = str(location).rstrip("/")
                if old != root_uri.rstrip("/") and old.endswith("/" + relative):
                    moved = old
                    break
            if moved is not None:
                for table, column in _ARTIFACT_COLUMNS:
                    if table in tables:
                        conn.execute(text(
                            f"UPDATE {table} SET {column} = :new || substr({column}, :cut) "
                            f"WHERE {column} = :old OR substr({column}, 1, :n) = :old || '/'"),
                            {"new": root_uri.rstrip("/"), "cut": len(moved) + 1, "old": moved, "n": len(moved) + 1})
                log.warning("the MLflow store %s was moved or copied: its artifacts now resolve under %s (were %s)",
                            database, root_uri, moved)
    finally:
        engine.dispose()
    _FOLLOWED.add((tracking_uri, root_uri))
    return moved


def experiment_id(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Point MLflow at `tracking_uri` and return the id of experiment `name`, created if needed."""
    import mlflow

    if artifact_location is not None:
        follow_move(tracking_uri, artifact_location)

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if (experiment.tags or {}).get(EXPERIMENT_KIND) is None:  # an experiment made before the tag
            mlflow.tracking.MlflowClient(tracking_uri, tracking_uri).set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return str(experiment.experiment_id)
    try:
        # MLflow 3's UI reads this tag for an experiment's kind (3.17 chooses its pages by URL: see run_url)
        return str(mlflow.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND: MODEL_TRAINING}))
    except mlflow.exceptions.MlflowException:  # created by a concurrent run
        created = mlflow.get_experiment_by_name(name)
        if created is None:
            raise
        return str(created.experiment_id)


# The experiment tag MLflow 3's UI reads to choose its view: model training (runs, metrics, models) here.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


@dataclass(frozen=True)
class Logged:
    """Where a run landed: its id and, when a model was registered, the new version."""

    run_id: str
    version: str | None = None


class ParentRun:
    """A run whose child runs are written one at a time as their work ends (a search's trials), through the
    client API rather than MLflow's fluent, thread-bound active run (tasks run in worker threads)."""

    def __init__(self, tracking_uri: str, experiment: str, name: str, params: dict[str, Any],
                 tags: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_id: str = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
        self._log(self.run_id, params, {})

    def _log(self, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                              metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])

    def child(self, name: str, params: dict[str, Any], metrics: dict[str, float], tags: dict[str, str],
              failed: bool = False) -> str:
        """Write one finished child run under this one; its id."""
        run_id: str = self.client.create_run(self.experiment, run_name=name,
                                             tags={"mlflow.parentRunId": self.run_id, **tags}).info.run_id
        self._log(run_id, params, metrics)
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        return run_id

    def finish(self, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
               failed: bool = False) -> None:
        self._log(self.run_id, params or {}, metrics or {})
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def log_run(experiment: str, record: RunRecord, model: Any = None, x_example: Any = None, task: str = "",
            register_as: str | None = None, version_tags: dict[str, str] | None = None,
            trusted_modules: Sequence[str] = (), failed: bool = False) -> Logged:
    """Write one run (after `experiment_id` pointed MLflow at the store); with `model`, log it as the run's
    model and, with `register_as`, register it as a new version carrying `version_tags`; `failed` ends the run
    FAILED (a CI run that stopped)."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment, run_name=record.name) as run:
        if record.tags:
            mlflow.set_tags(record.tags)
        if record.params:
            mlflow.log_params(record.params)
        if record.metrics:
            mlflow.log_metrics(record.metrics)
        for path, text in record.texts.items():
            mlflow.log_text(text, path)
        for path, value in record.dicts.items():
            mlflow.log_dict(value, path)
        for path, figure in record.figures.items():
            mlflow.log_figure(figure, path)
        for folder, local in record.files.items():
            mlflow.log_artifact(str(local), folder)
        version = None
        if model is not None:
            info = log_model(model, x_example, task, register_as, version_tags, trusted_modules)
            version = None if register_as is None else str(info.registered_model_version)
    if failed:
        mlflow.MlflowClient().set_terminated(run.info.run_id, "FAILED")
    return Logged(run.info.run_id, version)


class ModelCache:
    """The service's local copy of the versions it loaded and of the last aliases, so a restart while the
    registry is down serves the cached champion. A version's folder is keyed by a digest of its files and
    checked against it before use."""

    def __init__(self, root: Path, model_name: str) -> None:
        self.root = root / model_name

    def put(self, version: str, source: Path) -> Path:
        """Copy a downloaded model folder in (atomically: a rename), and return the cached copy."""
        import shutil
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        digest = _digest(source)
        target = self.root / f"{version}-{digest[:16]}"
        if not target.exists():
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".incoming-"))
            shutil.copytree(source, staging / "model")
            (staging / "model" / ".digest").write_text(digest)
            try:
                (staging / "model").rename(target)
            except OSError:  # another process cached it meanwhile
                pass
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def get(self, version: str) -> Path | None:
        """The cached folder of a version whose files still match their digest, or None."""
        for folder in sorted(self.root.glob(f"{version}-*")) if self.root.exists() else []:
            stored = folder / ".digest"
            if stored.exists() and stored.read_text() == _digest(folder):
                return folder
        return None

    def save_aliases(self, aliases: dict[str, str]) -> None:
        import json
        import os

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".aliases.json.tmp"
        tmp.write_text(json.dumps(aliases))
        os.replace(tmp, self.root / "aliases.json")

    def aliases(self) -> dict[str, str]:
        import json

        path = self.root / "aliases.json"
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def _digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (the digest file itself excluded)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".digest"):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
