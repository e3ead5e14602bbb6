"""The HTTP layer: endpoints, the admin token, the body-size bound and the one error format.

Endpoints: POST /predict, POST /labels (token), GET/PUT /routing (PUT needs the token), GET /healthz,
GET /metrics; see serving/README.md. A client error is a `RequestError`, answered as
`{"detail": "<field>: <message>"}` with its status and counted in `rollout_http_responses_total`.

Simulated time: a /predict or /labels body may carry `ts` (ISO 8601 or epoch seconds); the store records
that time instead of the clock. Because it rewrites history, `ts` on /predict is honoured only with the
bearer token (403 otherwise); /labels needs the token anyway.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rollout.config import ServingConfig
from rollout.times import to_epoch
from serving.admin import LABEL_ROWS_FACTOR, LabelsBody, RoutingBody, add_labels, routing_answer, set_routing
from serving.errors import RequestError
from serving.metrics import Metrics

if TYPE_CHECKING:
    from serving.app import Service

try:  # orjson is several times faster on the hot path; the stdlib is the fallback
    import orjson

    def loads(data: bytes) -> Any:
        return orjson.loads(data)

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover
    import json

    def loads(data: bytes) -> Any:
        return json.loads(data)

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


log = logging.getLogger("rollout.serving")

ROW_BYTES = 4096  # byte budget per record for the request-size bound (max_request_rows * ROW_BYTES)
ENVELOPE_BYTES = 65536  # room beyond the records (ids, ts, framing); also all a PUT /routing body may take
JSON = "application/json"
_JSON_HEADERS = [(b"content-type", JSON.encode())]


def body_limits(cfg: ServingConfig) -> dict[str, int]:
    """The largest body each path takes, in bytes; a larger one is a 413 before anything parses it."""
    predict = cfg.max_request_rows * ROW_BYTES + ENVELOPE_BYTES
    return {"/predict": predict, "/labels": predict * LABEL_ROWS_FACTOR, "/routing": ENVELOPE_BYTES}


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
    """The status and JSON body of a client error, counted by path and status."""
    metrics.http[(path, exc.status)] += 1
    body: dict[str, Any] = {"detail": exc.message}
    if exc.errors:
        body["errors"] = exc.errors
    return exc.status, dumps(body)


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
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
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
    try:
        payload = loads(body)
    except ValueError as exc:
        raise RequestError(400, f"body: invalid JSON ({exc})") from exc
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
        ]}}},
    }
}


class Problem(BaseModel):
    """Every error answer (the OpenAPI document's, in place of FastAPI's default validation error)."""

    detail: str = Field(description="the field first, then what is wrong: `records[3].income: expected number ...`")
    errors: list[dict[str, Any]] | None = Field(None, description="every problem found, when there are several")


ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": Problem, "description": "a client error"}}


def router() -> APIRouter:
    routes = APIRouter(responses=ERRORS)
    routes.add_api_route("/predict", predict, methods=["POST"], openapi_extra=PREDICT_BODY)
    routes.add_api_route("/labels", post_labels, methods=["POST"], dependencies=[Depends(require_token)])
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
        service.metrics.http[(request.scope["path"], 500)] += 1
        return Response(internal_error(exc), status_code=500, media_type=JSON)
