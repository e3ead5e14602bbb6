"""The HTTP layer: endpoints, the admin token, the body-size bound and the one error format.

Endpoints: POST /predict, POST /labels (token), GET /label-requests (token), GET/PUT /routing (PUT needs the token), GET /healthz,
GET /metrics; see serving/README.md. A client error is a `RequestError`, answered as
`{"detail": "<field>: <message>"}` with its status and counted in `rollout_http_responses_total`.

Simulated time: a /predict or /labels body may carry `ts` (ISO 8601 or epoch seconds); the store records
that time instead of the clock. Because it rewrites history, `ts` on /predict is honoured only with the
bearer token (403 otherwise); /labels needs the token anyway.
"""

from __future__ import annotations

import hmac
import json as _stdlib_json
from enum import Enum
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rollout.config import ServingConfig
from rollout.models import LoadedModel
from rollout.times import to_epoch
from serving.admin import (LABEL_ROWS_FACTOR, LabelsBody, RoutingBody, add_labels, label_requests, routing_answer,
                           set_routing)
from serving import protocols
from serving.errors import RequestError
from serving.metrics import Metrics

if TYPE_CHECKING:
    from serving.app import Service

try:  # orjson is several times faster on the hot path; the stdlib is the fallback
    import orjson

    def loads(data: bytes) -> Any:
        """JSON, and Python's JSON too: NaN as MLflow writes a missing value (its serving_input_example.json and
        its client's bodies hold them), read as null, as pandas and MLflow read it. orjson refuses NaN, so the
        stdlib reads what it refused."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if b"NaN" not in data:
                raise
            try:
                return _stdlib_json.loads(data, parse_constant=_constant)
            except (ValueError, RecursionError):
                raise exc from None

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover
    import json

    def loads(data: bytes) -> Any:
        return json.loads(data)

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


log = logging.getLogger("rollout.serving")


def _constant(name: str) -> float | None:
    return None if name == "NaN" else float(name)

ROW_BYTES = 4096  # byte budget per record for the request-size bound (max_request_rows * ROW_BYTES)
ENVELOPE_BYTES = 65536  # room beyond the records (ids, ts, framing); also all a PUT /routing body may take
JSON = "application/json"
_JSON_HEADERS = [(b"content-type", JSON.encode())]


def body_limits(cfg: ServingConfig) -> dict[str, int]:
    """The largest body each path takes, in bytes (the protocols' predict paths as /predict); a larger one is
    a 413 before anything parses it."""
    predict = cfg.max_request_rows * ROW_BYTES + ENVELOPE_BYTES
    return {"/predict": predict, "/labels": predict * LABEL_ROWS_FACTOR, "/routing": ENVELOPE_BYTES,
            "/invocations": predict, INFER: predict, PINNED_INFER: predict}


INFER, PINNED_INFER = "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"
_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def path_label(path: str) -> str:
    """The path as metrics and body limits know it: a v2 model path as its template (`/v2/models/{name}/infer`)."""
    if not path.startswith("/v2/models/"):
        return path
    parts = path.split("/")
    parts[3] = "{name}"
    if len(parts) > 5 and parts[4] == "versions":
        parts[5] = "{version}"
    return "/".join(parts)


def error_shape(path: str) -> Callable[[RequestError], dict[str, Any]]:
    """How a path's protocol writes an error: MLflow's, the Open Inference Protocol's, or /predict's own."""
    if path.startswith("/v2"):
        return protocols.oip_error
    if path in ("/invocations", "/ping", "/health", "/version"):
        return protocols.mlflow_error
    return native_error


def native_error(exc: RequestError) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": exc.message}
    if exc.errors:
        body["errors"] = exc.errors
    return body


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes | None:
    """The whole body (None when the client left), refused with a 413 past `limit`, declared or as it arrives."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body: {declared} bytes, at most {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body: more than {limit} bytes")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def refuse(metrics: Metrics, path: str, exc: RequestError) -> tuple[int, bytes]:
    """The status and JSON body of a client error in the path's protocol, counted by path and status."""
    label = path_label(path)
    metrics.http[(label, exc.status)] += 1
    return exc.status, dumps(error_shape(label)(exc))


def internal_error(exc: Exception) -> bytes:
    log.error("unhandled error", exc_info=exc)
    return dumps({"detail": f"internal error: {type(exc).__name__}"})


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: reads a bounded body before the router sees it (413 past the path's limit)."""

    def __init__(self, app: ASGIApp, limits: Mapping[str, int], metrics: Metrics) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(path_label(scope["path"])) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, header(scope, b"content-length"), limit)
        except RequestError as exc:
            await send_json(send, *refuse(self.metrics, scope["path"], exc), exc.headers)
            return
        if body is None:
            return
        first = True

        async def replay() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect

        await self.app(scope, replay, send)


def token_problem(authorization: str, env_name: str) -> RequestError | None:
    """Why an Authorization header does not carry the admin token (401 missing, 403 wrong, 503 unset), or None."""
    expected = os.environ.get(env_name)
    if not expected:
        return RequestError(503, f"admin token not configured: set the environment variable {env_name} on the server")
    if not authorization.lower().startswith("bearer "):
        return RequestError(401, "authorization: missing bearer token")
    if not hmac.compare_digest(authorization[7:].strip().encode(), expected.encode()):
        return RequestError(403, "authorization: wrong token")
    return None


def service_of(request: Request) -> Service:
    return request.app.state.service


def require_token(request: Request) -> None:
    """Dependency of the admin endpoints: the bearer token of `serving.token_env`."""
    problem = token_problem(request.headers.get("authorization", ""), service_of(request).cfg.token_env)
    if problem is not None:
        raise problem


async def predict_answer(service: Service, body: bytes, authorization: str, started: float) -> bytes:
    """The JSON answer to one POST /predict body: the routed endpoint and the direct ASGI path both call this."""
    await service.predictor.admit()
    try:
        payload = loads(body)
    except ValueError as exc:
        raise RequestError(400, f"body: invalid JSON ({exc})") from exc
    if isinstance(payload, dict) and any(k in payload for k in ("dataframe_split", "instances", "inputs")):
        # MLflow's bodies: their rows as records, the rest of the body (ids, ts) as it came
        rows = protocols.mlflow_records(payload, champion_model(service).columns)
        payload = {**{k: v for k, v in payload.items() if k not in protocols.MLFLOW_KEYS}, "records": rows}
    ts = None
    if isinstance(payload, dict) and payload.get("ts") is not None:
        if token_problem(authorization, service.cfg.token_env) is not None:
            raise RequestError(403, "ts: an explicit timestamp needs the admin bearer token")
        try:
            ts = to_epoch(payload["ts"])
        except (TypeError, ValueError) as exc:
            raise RequestError(422, f"ts: {exc}") from exc
    out, single = await service.predictor.predict(payload, ts, started)
    service.metrics.http[("/predict", 200)] += 1
    return dumps(out[0] if single else {"predictions": out})


Headers = Mapping[str, str]  # lower-case names
Handler = Callable[["Service", bytes, Headers, dict[str, str], float], Awaitable[tuple[bytes, dict[str, str]]]]


async def predict_handler(service: Service, body: bytes, headers: Headers, params: dict[str, str],
                          started: float) -> tuple[bytes, dict[str, str]]:
    return await predict_answer(service, body, headers.get("authorization", ""), started), {}


def champion_model(service: Service) -> LoadedModel:
    """The loaded champion (a 503 until there is one)."""
    lanes = service.lanes
    if lanes.view is None:
        raise RequestError(503, "no champion model loaded yet")
    return lanes.models[lanes.view.champion.version]


def context_of(service: Service, headers: Headers) -> protocols.Context:
    def token_ok() -> bool:
        return token_problem(headers.get("authorization", ""), service.cfg.token_env) is None

    return protocols.Context(headers, champion_model(service).columns, token_ok)


def answer_headers(request_id: str | None, answers: list[dict[str, Any]]) -> dict[str, str]:
    """The request's id (its rows are `<id>-<i>` when it has several) and the version(s) that answered."""
    headers = {"x-model-version": ",".join(sorted({str(a["version"]) for a in answers}))}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return headers


async def invocations_answer(service: Service, body: bytes, headers: Headers, params: dict[str, str],
                             started: float) -> tuple[bytes, dict[str, str]]:
    """POST /invocations: MLflow's scoring protocol on the predict path."""
    champion = champion_model(service)
    await service.predictor.admit()
    payload, ts, request_id = protocols.mlflow_request(body, context_of(service, headers), loads)
    out, _ = await service.predictor.predict(payload, ts, started)
    service.metrics.http[("/invocations", 200)] += 1
    return dumps(protocols.mlflow_answer(out, champion.pyfunc_predict_fn)), answer_headers(request_id, out)


def check_model_name(service: Service, name: str) -> None:
    served = service.policy.registry.model_name
    if name != served:
        raise RequestError(404, f"name: model {name!r} is not served here; this service serves {served!r}")


async def infer_answer(service: Service, body: bytes, headers: Headers, params: dict[str, str],
                       started: float) -> tuple[bytes, dict[str, str]]:
    """POST /v2/models/{name}[/versions/{version}]/infer: the Open Inference Protocol on the predict path. A
    version in the path pins it (admin token; not routed, so not logged)."""
    check_model_name(service, params["name"])
    version = params.get("version")
    if version is not None and (problem := token_problem(headers.get("authorization", ""),
                                                         service.cfg.token_env)) is not None:
        raise problem
    classification = service.predictor.classification
    if version is None:  # a pinned call is not logged
        await service.predictor.admit()
    request = protocols.infer_request(body, context_of(service, headers), loads, classification)
    if version is None:
        out, _ = await service.predictor.predict(request.payload, request.ts, started)
    else:
        out = await service.predictor.pinned(request.payload, version)
    service.metrics.http[(INFER if version is None else PINNED_INFER, 200)] += 1
    answer = protocols.infer_answer(out, params["name"], request, classification)
    return dumps(answer), answer_headers(request.request_id, out)


def direct_route(path: str) -> tuple[Handler, dict[str, str]] | None:
    """The handler of a predict path (any protocol) and its path parameters, or None."""
    if path == "/predict":
        return predict_handler, {}
    if path == "/invocations":
        return invocations_answer, {}
    match = _INFER.match(path) if path.startswith("/v2/models/") else None
    if match is None:
        return None
    name, version = match.groups()
    return infer_answer, ({"name": name} if version is None else {"name": name, "version": version})


async def _routed(handler: Handler, request: Request, params: dict[str, str]) -> Response:
    started = time.perf_counter()
    headers = {k.lower(): v for k, v in request.headers.items()}
    answer, extra = await handler(service_of(request), await request.body(), headers, params, started)
    return Response(answer, media_type=JSON, headers=extra)


async def invocations(request: Request) -> Response:
    return await _routed(invocations_answer, request, {})


async def infer(request: Request, name: str) -> Response:
    return await _routed(infer_answer, request, {"name": name})


async def pinned_infer(request: Request, name: str, version: str) -> Response:
    return await _routed(infer_answer, request, {"name": name, "version": version})


async def ping(request: Request) -> Response:
    """MLflow's health check: 200 with a newline once a champion is loaded."""
    status, _ = service_of(request).health()
    return Response("\n", status_code=status, media_type=JSON)


async def mlflow_version(request: Request) -> Response:
    return Response(protocols.mlflow_version(), media_type=JSON)


async def v2_server(request: Request) -> Response:
    return Response(dumps({"name": "rollout", "version": protocols.package_version("rollout"), "extensions": []}),
                    media_type=JSON)


async def v2_live(request: Request) -> Response:
    return Response(dumps({"live": True}), media_type=JSON)


async def v2_ready(request: Request) -> Response:
    ready = service_of(request).lanes.view is not None
    return Response(dumps({"ready": ready}), status_code=200 if ready else 503, media_type=JSON)


def _version_model(service: Service, name: str, version: str | None) -> LoadedModel:
    check_model_name(service, name)
    if version is None:
        return champion_model(service)
    model = service.lanes.models.get(version)
    if model is None:
        raise RequestError(404, f"version: {version} is not loaded (loaded: {', '.join(sorted(service.lanes.models))})")
    return model


async def v2_model(request: Request, name: str, version: str | None = None) -> Response:
    service = service_of(request)
    model = _version_model(service, name, version)
    versions = [version] if version is not None else sorted(service.lanes.models)
    body = protocols.model_metadata(name, versions, model.columns, service.predictor.classification, model.n_classes)
    return Response(dumps(body), media_type=JSON)


async def v2_model_ready(request: Request, name: str, version: str | None = None) -> Response:
    _version_model(service_of(request), name, version)
    return Response(dumps({"name": name, "ready": True}), media_type=JSON)


async def predict(request: Request) -> Response:
    started = time.perf_counter()
    answer = await predict_answer(service_of(request), await request.body(), request.headers.get("authorization", ""),
                                  started)
    return Response(answer, media_type=JSON)


async def post_labels(request: Request, body: LabelsBody) -> Response:
    service = service_of(request)
    limit = service.cfg.max_request_rows * LABEL_ROWS_FACTOR
    report = await add_labels(body, limit, service.now(), service.writer, service.store, label_classes(service))
    service.metrics.http[("/labels", 200)] += 1
    return Response(dumps(report), media_type=JSON)


async def get_label_requests(
        request: Request,
        budget: int = Query(description="How many requests to propose for labelling (their expected number: each "
                            "row is drawn with its own probability)", ge=1, le=1_000_000)) -> Response:
    service = service_of(request)
    answer = await label_requests(budget, service.policy, service.writer, service.store)
    service.metrics.http[("/label-requests", 200)] += 1
    return Response(dumps(answer), media_type=JSON)


def label_classes(service: Service) -> int | None:
    """How many classes a label may name: 2 (binary), the champion's count (multiclass; 0 = not known), None for
    a regression."""
    task = service.policy.data.task
    if task == "classification":
        return 2
    if task != "multiclass":
        return None
    view = service.lanes.view
    model = service.lanes.models.get(view.champion.version) if view is not None else None
    return (model.n_classes or 0) if model is not None else 0


async def get_routing(request: Request) -> Response:
    return Response(dumps(routing_answer(service_of(request).lanes.view)), media_type=JSON)


async def put_routing(request: Request, body: RoutingBody) -> Response:
    service = service_of(request)
    await set_routing(body, service.store, service.lanes.aliases, service.policy.rollout.mode, service.now(),
                      service.loader.registry.has_version, service.policy.rollout.bandit.floor)
    await service.refresh()
    return Response(dumps(routing_answer(service.lanes.view)), media_type=JSON)


async def healthz(request: Request) -> Response:
    status, body = service_of(request).health()
    return Response(dumps(body), status_code=status, media_type=JSON)


async def metrics(request: Request) -> Response:
    return PlainTextResponse(service_of(request).render_metrics(), media_type="text/plain; version=0.0.4")


_TIME_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}],
                "description": "ISO 8601 or epoch seconds, recorded instead of the clock; needs the bearer token"}
_RECORD_SCHEMA = {"type": "object", "additionalProperties": True,
                  "description": "column -> value, as the champion's input signature declares"}
_IDS_SCHEMA = {"type": "array", "items": {"type": ["string", "null"]}, "description": "one per record"}
_RECORDS_SCHEMA = {"type": "array", "items": _RECORD_SCHEMA, "minItems": 1}

_DATAFRAME_SPLIT = {
    "type": "object", "required": ["columns", "data"], "description": "pandas `to_dict(orient='split')`",
    "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                   "data": {"type": "array", "items": {"type": "array"}, "description": "one list per row"},
                   "index": {"type": "array"}},
}
# /predict's body is parsed by hand (orjson, the hot path): its accepted shapes, for the OpenAPI document.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": {"oneOf": [
            {"title": "One record", "type": "object", "required": ["record"], "properties": {
                "record": _RECORD_SCHEMA, "unit_id": {"type": "string"}, "request_id": {"type": "string"},
                "ts": _TIME_SCHEMA}},
            {"title": "Records", "type": "object", "required": ["records"], "properties": {
                "records": _RECORDS_SCHEMA, "unit_ids": _IDS_SCHEMA, "request_ids": _IDS_SCHEMA, "ts": _TIME_SCHEMA}},
            {"title": "MLflow records", "type": "object", "required": ["dataframe_records"], "properties": {
                "dataframe_records": _RECORDS_SCHEMA, "unit_ids": _IDS_SCHEMA, "request_ids": _IDS_SCHEMA,
                "ts": _TIME_SCHEMA}},
            {"title": "Bare list of records", **_RECORDS_SCHEMA},
            {"title": "MLflow split frame", "type": "object", "required": ["dataframe_split"],
             "properties": {"dataframe_split": _DATAFRAME_SPLIT}},
        ]}}},
    }
}

_COLUMNS_OR_ROWS = {"oneOf": [
    {"title": "Records", **_RECORDS_SCHEMA},
    {"title": "Rows", "type": "array", "items": {"type": "array"},
     "description": "values in the order of the champion's input signature"},
    {"title": "Columns", "type": "object", "additionalProperties": {"type": "array"},
     "description": "column -> values"},
]}
_MLFLOW_EXTRAS = {"params": {"type": "object", "description": "accepted; the estimator is called directly, as "
                                                             "MLflow's sklearn flavour does, so they change nothing"},
                  "unit_ids": _IDS_SCHEMA, "request_ids": _IDS_SCHEMA, "ts": _TIME_SCHEMA}
_ID_HEADERS = [
    {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 64},
     "description": "the request's id (its rows are logged as <id>-<i> when it has several); a new UUIDv7 if absent"},
    {"name": "x-unit-id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 128},
     "description": "the randomisation unit of every row (else the policy's unit column in each row)"},
]
_ANSWER_HEADERS = {
    "x-request-id": {"description": "the request's id, for POST /labels", "schema": {"type": "string"}},
    "x-model-version": {"description": "the version(s) that answered", "schema": {"type": "string"}},
}

class MlflowError(BaseModel):
    """An error answer of POST /invocations, as MLflow's server writes it."""

    error_code: str = Field(description="BAD_REQUEST, REQUEST_LIMIT_EXCEEDED, TEMPORARILY_UNAVAILABLE, ...")
    message: str = Field(description="the field first, then what is wrong")
    errors: list[dict[str, Any]] | None = None


class InferenceError(BaseModel):
    """An error answer of the Open Inference Protocol's endpoints."""

    error: str = Field(description="the field first, then what is wrong: `inputs[2](income).data[0]: ...`")
    errors: list[dict[str, Any]] | None = None


# MLflow's scoring protocol, as `mlflow models serve` takes it.
INVOCATIONS_BODY = {
    "parameters": _ID_HEADERS,
    "requestBody": {"required": True, "content": {
        JSON: {"schema": {"oneOf": [
            {"title": "dataframe_split", "type": "object", "required": ["dataframe_split"],
             "properties": {"dataframe_split": _DATAFRAME_SPLIT, **_MLFLOW_EXTRAS}},
            {"title": "dataframe_records", "type": "object", "required": ["dataframe_records"],
             "properties": {"dataframe_records": _RECORDS_SCHEMA, **_MLFLOW_EXTRAS}},
            {"title": "instances", "type": "object", "required": ["instances"],
             "properties": {"instances": _COLUMNS_OR_ROWS, **_MLFLOW_EXTRAS}},
            {"title": "inputs", "type": "object", "required": ["inputs"],
             "properties": {"inputs": _COLUMNS_OR_ROWS, **_MLFLOW_EXTRAS}},
        ]}},
        "text/csv": {"schema": {"type": "string", "description": "a header line, then one line per row"}},
        "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
    }},
    "responses": {"200": {"description": "MLflow's answer: what the model's pyfunc predict returns, per row "
                                         "(class probabilities for rollout's classifiers)",
                          "headers": _ANSWER_HEADERS,
                          "content": {JSON: {"schema": {"type": "object", "properties": {
                              "predictions": {"type": "array"}}}}}},
                  "4XX": {"description": "MLflow's error shape, the field first in the message",
                          "content": {JSON: {"schema": MlflowError.model_json_schema()}}}},
}

_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "description": "a column of the model's input signature, or any name for one "
                                              "[n, k] tensor of every input in signature order"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "[n] or [n, 1] per column"},
    "datatype": {"type": "string", "enum": ["BYTES", "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
                                            "UINT32", "UINT64", "FP16", "FP32", "FP64"]},
    "data": {"type": "array", "description": "row-major, flat or nested"},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
}}
INFER_BODY = {
    "parameters": _ID_HEADERS,
    "requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "required": ["inputs"], "title": "InferenceRequest", "properties": {
            "id": {"type": "string", "description": "the request's id (rows of several: <id>-<i>)"},
            "parameters": {"type": "object", "properties": {
                "content_type": {"type": "string", "example": "pd"}, "ts": _TIME_SCHEMA}},
            "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string", "enum": ["predict", "predict_proba", "request_id", "version"]}}},
                "description": "predict by default"},
        }}}}},
    "responses": {"200": {"description": "InferenceResponse: model_name, model_version, id, outputs",
                          "headers": _ANSWER_HEADERS},
                  "4XX": {"description": "the Open Inference Protocol's error shape",
                          "content": {JSON: {"schema": InferenceError.model_json_schema()}}}},
}


class Problem(BaseModel):
    """Every error answer (the OpenAPI document's, in place of FastAPI's default validation error)."""

    detail: str = Field(description="the field first, then what is wrong: `records[3].income: expected number ...`")
    errors: list[dict[str, Any]] | None = Field(None, description="every problem found, when there are several")


ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": Problem, "description": "a client error"}}


def router() -> APIRouter:
    routes = APIRouter(responses=ERRORS)
    routes.add_api_route("/predict", predict, methods=["POST"], openapi_extra=PREDICT_BODY)
    mlflow: list[str | Enum] = ["MLflow scoring protocol"]
    routes.add_api_route("/invocations", invocations, methods=["POST"], openapi_extra=INVOCATIONS_BODY, tags=mlflow)
    routes.add_api_route("/ping", ping, methods=["GET"], tags=mlflow)
    routes.add_api_route("/health", ping, methods=["GET"], tags=mlflow)
    routes.add_api_route("/version", mlflow_version, methods=["GET"], tags=mlflow)
    oip: list[str | Enum] = ["Open Inference Protocol (v2)"]
    routes.add_api_route(INFER, infer, methods=["POST"], openapi_extra=INFER_BODY, tags=oip)
    routes.add_api_route(PINNED_INFER, pinned_infer, methods=["POST"], openapi_extra=INFER_BODY, tags=oip,
                         description="One loaded version, not routed and not logged (admin token): for tests "
                                     "and debugging.")
    routes.add_api_route("/v2", v2_server, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/health/live", v2_live, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/health/ready", v2_ready, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/models/{name}", v2_model, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/models/{name}/versions/{version}", v2_model, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"], tags=oip)
    routes.add_api_route("/v2/models/{name}/versions/{version}/ready", v2_model_ready, methods=["GET"], tags=oip)
    routes.add_api_route("/labels", post_labels, methods=["POST"], dependencies=[Depends(require_token)])
    routes.add_api_route("/label-requests", get_label_requests, methods=["GET"], dependencies=[Depends(require_token)],
                         description="A batch of predictions to label, drawn from the open rollout's rows logged "
                                     "since the last batch: rows where the versions disagree are favoured, and each "
                                     "comes with its inclusion probability (rollout.label_requests).")
    routes.add_api_route("/routing", get_routing, methods=["GET"])
    routes.add_api_route("/routing", put_routing, methods=["PUT"], dependencies=[Depends(require_token)])
    routes.add_api_route("/healthz", healthz, methods=["GET"])
    routes.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    return routes


def validation_error(exc: RequestValidationError) -> RequestError:
    """A pydantic error as today's format: 422 naming the field (`labels[0].label`), or 400 for invalid JSON."""
    problems = []
    for error in exc.errors():
        loc = error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        problems.append({"field": where, "error": error["msg"]})
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return RequestError(400, f"body: invalid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    return RequestError(422, f"{problems[0]['field']}: {problems[0]['error']}", problems)


def mount(app: FastAPI, service: Service) -> None:
    """The endpoints, error handlers and body-size bound of `service` on `app`."""
    app.include_router(router())
    app.add_middleware(BodyLimit, limits=body_limits(service.cfg), metrics=service.metrics)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        status, body = refuse(service.metrics, request.scope["path"], exc)
        return Response(body, status_code=status, media_type=JSON, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return await request_error(request, validation_error(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:  # pragma: no cover - last resort
        service.metrics.http[(path_label(request.scope["path"]), 500)] += 1
        return Response(internal_error(exc), status_code=500, media_type=JSON)
