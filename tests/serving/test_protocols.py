"""Drop-in for existing clients: MLflow's scoring protocol and the Open Inference Protocol, driven by those
ecosystems' own clients against a real `rollout serve` (uvicorn over HTTP) with a real MLflow registry.

The champion and a shadow challenger are scikit-learn pipelines logged by rollout's own `log_model` (as CI
logs them: skops, a signature, an input example, `pyfunc_predict_fn=predict_proba`). Every answer is checked
against the champion's direct prediction through MLflow's pyfunc, which is what `mlflow models serve` answers.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import uvicorn
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cli.demo import free_port
from rollout.data import example_dataset
from rollout.outcomes import OutcomeStore
from rollout.registry import MlflowRegistry, log_model
from tests.serving.conftest import AUTH, TOKEN, app_for, make_policy, mlflow_globals_restored

pytestmark = pytest.mark.slow

NAME = "loan-approval"
NUMERIC = ["income", "loan_amount", "credit_score", "debt_to_income", "employment_years", "open_accounts"]
CATEGORICAL = ["tier", "purpose", "home_ownership", "region"]
FEATURES = NUMERIC + CATEGORICAL


def _pipeline(c: float) -> Any:
    return make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(), StandardScaler()), NUMERIC),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
             CATEGORICAL),
        ),
        LogisticRegression(C=c, max_iter=300),
    )


class Served:
    """The running service, its stores, and the champion (v1) and challenger (v2) as MLflow pyfuncs."""

    def __init__(self, base: str, port: int, tracking: str, store: OutcomeStore, frame: pd.DataFrame,
                 pyfuncs: dict[str, Any], artifacts: Path) -> None:
        self.base, self.port, self.tracking, self.store = base, port, tracking, store
        self.frame, self.pyfuncs, self.artifacts = frame, pyfuncs, artifacts

    def expected(self, rows: pd.DataFrame, version: str = "1") -> np.ndarray:
        """What `mlflow models serve` answers for these rows: the pyfunc's predict (predict_proba here)."""
        return np.asarray(self.pyfuncs[version].predict(rows[FEATURES]))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import mlflow
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("protocols")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_globals_restored("ROLLOUT_TOKEN"):
        os.environ["ROLLOUT_TOKEN"] = TOKEN
        frame = example_dataset(rows=800, seed=3)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment = mlflow.create_experiment("protocols", artifact_location=(root / "artifacts").as_uri())
        for c in (1.0, 0.01):  # v1 the champion, v2 a challenger that answers differently
            with mlflow.start_run(experiment_id=experiment):
                model = _pipeline(c).fit(frame[FEATURES], frame["approved"])
                log_model(model, frame[FEATURES], "classification", NAME)
        registry = MlflowRegistry(uri, NAME, mirror_stages=False)
        registry.set_alias("champion", "1")
        registry.set_alias("challenger", "2")
        pyfuncs = {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}") for v in ("1", "2")}
        artifacts = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
        store = OutcomeStore(f"sqlite:///{root / 'outcomes.db'}").create()
        store.open_rollout("shadow", {"champion": "1", "challenger": "2"}, {}, "salt")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app_for(make_policy(), registry, store), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        yield Served(f"http://127.0.0.1:{port}", port, uri, store, frame, pyfuncs, artifacts)
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


def _logged(served: Served, request_ids: list[str], timeout_s: float = 10.0) -> dict[str, set[tuple[str, int]]]:
    """(version, served) of every logged row of these requests, once both versions' rows are in."""
    deadline = time.time() + timeout_s
    while True:
        with sa.create_engine(served.store.url).connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT request_id, version, served FROM predictions WHERE request_id IN "
                f"({','.join(repr(r) for r in request_ids)})")).all()
        found: dict[str, set[tuple[str, int]]] = {r: set() for r in request_ids}
        for request_id, version, was_served in rows:
            found[request_id].add((version, int(was_served)))
        if all(len(v) == 2 for v in found.values()) or time.time() > deadline:
            return found
        time.sleep(0.2)


def _label(served: Served, request_ids: list[str]) -> dict[str, Any]:
    response = httpx.post(served.base + "/labels", headers=AUTH,
                          json={"labels": [{"request_id": r, "label": 1} for r in request_ids]})
    assert response.status_code == 200, response.text
    return response.json()


def test_an_mlflow_client_works_unchanged(served: Served) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    client = ScoringServerClient("127.0.0.1", served.port)
    client.wait_server_ready(timeout=10)  # GET /ping
    assert httpx.get(served.base + "/health").status_code == 200
    assert httpx.get(served.base + "/version").text == mlflow_version()

    # The request MLflow itself wrote next to the registered champion.
    example = (served.artifacts / "serving_input_example.json").read_text()
    response = httpx.post(served.base + "/invocations", content=example, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    split = json.loads(example)["dataframe_split"]
    rows = pd.DataFrame(split["data"], columns=split["columns"])
    np.testing.assert_allclose(response.json()["predictions"], served.expected(rows), atol=1e-9)

    # MLflow's own client: a DataFrame sent as dataframe_split (with NaNs, which MLflow's server takes as null).
    rows = served.frame[FEATURES].iloc[:40]
    assert rows.isna().any().any(), "the sample should hold missing values"
    answer = client.invoke(rows)
    np.testing.assert_allclose(answer.get_predictions(predictions_format="ndarray"), served.expected(rows), atol=1e-9)

    # Every other body MLflow's server takes, one request each, all the same answer.
    bodies: list[tuple[str, bytes | str]] = [
        ("application/json", '{"dataframe_split": ' + rows.to_json(orient="split") + "}"),
        ("application/json", '{"dataframe_records": ' + rows.to_json(orient="records") + "}"),
        ("application/json", json.dumps({"instances": json.loads(rows.to_json(orient="records"))})),
        ("application/json", json.dumps({"inputs": {c: json.loads(rows[c].to_json(orient="values")) for c in rows},
                                         "params": {"threshold": 0.5}})),
        ("text/csv", rows.to_csv(index=False)),
        ("application/vnd.apache.parquet", rows.to_parquet(index=False)),
    ]
    ids = []
    for content_type, body in bodies:
        response = httpx.post(served.base + "/invocations", content=body, headers={"content-type": content_type})
        assert response.status_code == 200, (content_type, response.text)
        np.testing.assert_allclose(response.json()["predictions"], served.expected(rows), atol=1e-9)
        assert response.headers["x-model-version"] == "1"
        ids.append(response.headers["x-request-id"])
    # The request id comes back in a header: labels for its rows are sent without touching the body.
    row_ids = [f"{ids[0]}-{i}" for i in range(len(rows))]
    assert _label(served, row_ids)["stored"] == len(rows)
    # One row, with the caller's own id and unit in headers: the label uses that id as is.
    one = httpx.post(served.base + "/invocations", json={"dataframe_records": json.loads(rows.head(1).to_json(
        orient="records"))}, headers={"x-request-id": "order-17", "x-unit-id": "customer-9"})
    assert one.status_code == 200 and one.headers["x-request-id"] == "order-17"
    assert _label(served, ["order-17"]) == {"stored": 1, "replaced": 0, "unknown": 0, "unknown_ids": []}
    # The rollout runs behind it: the shadow challenger scored every one of those rows too.
    logged = _logged(served, [*row_ids, "order-17"])
    assert all(found == {("1", 1), ("2", 0)} for found in logged.values()), logged


def mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


@pytest.mark.parametrize(("body", "content_type", "status", "field"), [
    ({"dataframe_split": {"columns": ["income"], "data": [[1.0]]}}, "application/json", 422,
     "loan_amount: missing column"),
    ({"dataframe_records": [{"income": "a lot"}]}, "application/json", 422, "income: expected number"),
    ({"records": [{}]}, "application/json", 422, "body: expected exactly one of"),
    ("income,tier\nlots,gold\n", "text/csv", 422, "rows[0].income"),
    ({"dataframe_records": []}, "text/plain", 415, "content-type"),
    ({"dataframe_records": [{}], "params": [1]}, "application/json", 422, "params"),
])
def test_mlflow_errors_name_the_field_in_mlflow_shape(served: Served, body: Any, content_type: str, status: int,
                                                      field: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(served.base + "/invocations", content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) <= {"error_code", "message", "errors"} and answer["error_code"]
    assert answer["message"].startswith(field), answer


def _triton_inputs(rows: pd.DataFrame, binary: bool) -> list[Any]:
    import tritonclient.http as triton

    inputs = []
    for column in FEATURES:
        values = rows[[column]].to_numpy()
        if column in NUMERIC:
            tensor = triton.InferInput(column, list(values.shape), "FP64")
            tensor.set_data_from_numpy(values.astype(np.float64), binary_data=binary)
        else:
            tensor = triton.InferInput(column, list(values.shape), "BYTES")
            tensor.set_data_from_numpy(values.astype(object), binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("binary", [False, True], ids=["json tensors", "binary tensors"])
def test_an_open_inference_protocol_client_works_unchanged(served: Served, binary: bool) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=f"127.0.0.1:{served.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    metadata = client.get_model_metadata(NAME)
    assert [i["name"] for i in metadata["inputs"]] == FEATURES
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]}["tier"] == "BYTES"
    assert not client.is_model_ready("another-model")

    # Binary FP64 tensors carry NaN (a missing credit score, null to the model); JSON cannot, and a BYTES tensor
    # has no null (the client sends NaN as the text "nan"), so those rows are left out.
    window = served.frame.iloc[40:90]
    rows = window.dropna(subset=CATEGORICAL) if binary else window.dropna()
    assert not binary or rows[NUMERIC].isna().any().any()
    outputs = [triton.InferRequestedOutput("predict", binary_data=False),
               triton.InferRequestedOutput("predict_proba", binary_data=False),
               triton.InferRequestedOutput("request_id", binary_data=False)]
    result = client.infer(NAME, _triton_inputs(rows, binary), outputs=outputs, request_id=f"batch-{binary}")
    expected = served.expected(rows)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), expected, atol=1e-9)
    np.testing.assert_array_equal(result.as_numpy("predict"), expected.argmax(axis=1))
    response = result.get_response()
    assert response["model_name"] == NAME and response["model_version"] == "1" and response["id"] == f"batch-{binary}"
    row_ids = [i.decode() if isinstance(i, bytes) else i for i in result.as_numpy("request_id").tolist()]
    assert row_ids == [f"batch-{binary}-{i}" for i in range(len(rows))]
    assert _label(served, row_ids)["stored"] == len(rows)
    logged = _logged(served, row_ids)
    assert all(found == {("1", 1), ("2", 0)} for found in logged.values()), logged

    # Outputs left to the server: `predict`, as MLServer's scikit-learn runtime answers.
    plain = client.infer(NAME, _triton_inputs(rows.head(3), binary))
    np.testing.assert_array_equal(plain.as_numpy("predict"), expected[:3].argmax(axis=1))

    # A pinned version (admin token): the shadow challenger cannot be asked, the champion can, and unrouted.
    with pytest.raises(InferenceServerException, match="authorization"):
        client.infer(NAME, _triton_inputs(rows.head(2), binary), model_version="1")
    # (a copy of the headers each call: the client adds its own to the dict it is given)
    pinned = client.infer(NAME, _triton_inputs(rows.head(2), binary), model_version="1", outputs=outputs[1:2],
                          headers=dict(AUTH))
    np.testing.assert_allclose(pinned.as_numpy("predict_proba"), expected[:2], atol=1e-9)
    with pytest.raises(InferenceServerException, match="answers no caller"):
        client.infer(NAME, _triton_inputs(rows.head(2), binary), model_version="2", headers=dict(AUTH))


def test_open_inference_protocol_tensor_shapes_and_errors(served: Served) -> None:
    rows = served.frame.iloc[80:84].dropna(subset=NUMERIC)
    expected = served.expected(rows)
    url = f"{served.base}/v2/models/{NAME}/infer"
    # MLServer's pandas codec: one [n] tensor per column, the request's content type `pd`.
    columns = [{"name": c, "shape": [len(rows)], "datatype": "FP64" if c in NUMERIC else "BYTES",
                "data": rows[c].tolist()} for c in FEATURES]
    answer = httpx.post(url, json={"parameters": {"content_type": "pd"}, "inputs": columns,
                                   "outputs": [{"name": "predict_proba"}]})
    assert answer.status_code == 200, answer.text
    proba = answer.json()["outputs"][0]
    assert proba["shape"] == [len(rows), 2]
    np.testing.assert_allclose(np.reshape(proba["data"], proba["shape"]), expected, atol=1e-9)

    def error(body: Any, status: int = 422, path: str = url) -> str:
        response = httpx.post(path, json=body)
        assert response.status_code == status, response.text
        assert set(response.json()) <= {"error", "errors"}
        return str(response.json()["error"])

    assert error({"inputs": columns}, 404, f"{served.base}/v2/models/other/infer").startswith("name: model 'other'")
    assert error({"inputs": []}).startswith("inputs")
    short = [dict(c, data=c["data"][:-1]) if c["name"] == "income" else c for c in columns]
    assert error({"inputs": short}).startswith("inputs[0](income).data")
    typed = [dict(c, data=["x"] * len(rows)) if c["name"] == "income" else c for c in columns]
    assert error({"inputs": typed}).startswith("inputs[0](income).data[0]: expected a number")
    assert error({"inputs": columns[1:]}).startswith("records[0].income: missing column")
    assert error({"inputs": columns, "outputs": [{"name": "explain"}]}).startswith("outputs[0].name")


def test_predict_takes_mlflow_bodies_and_answers_in_its_own_shape(served: Served) -> None:
    rows = served.frame[FEATURES].iloc[90:93]
    body = json.loads('{"dataframe_split": ' + rows.to_json(orient="split") + "}")
    response = httpx.post(served.base + "/predict", json=body)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    np.testing.assert_allclose([a["score"] for a in answers], served.expected(rows)[:, 1], atol=1e-9)
    assert {a["version"] for a in answers} == {"1"}


def test_openapi_documents_every_protocol(served: Served) -> None:
    doc = httpx.get(served.base + "/openapi.json").json()
    for path in ("/invocations", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert "requestBody" in doc["paths"][path]["post"], path
    for path in ("/ping", "/health", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                 "/v2/models/{name}/ready"):
        assert "get" in doc["paths"][path], path


def test_binary_parquet_of_bad_bytes_is_a_400(served: Served) -> None:
    response = httpx.post(served.base + "/invocations", content=io.BytesIO(b"not parquet").getvalue(),
                          headers={"content-type": "application/vnd.apache.parquet"})
    assert response.status_code == 400 and response.json()["message"].startswith("body: not a Parquet file")
