"""The predict paths straight from the ASGI scope, past FastAPI's telemetry, middleware, router and dependencies:
POST /predict, MLflow's POST /invocations and the Open Inference Protocol's POST /v2/models/{name}/infer.

At a few thousand requests a second those cost about as much as the rest of a request: measured by
`benchmarks/serving.py --fastpath` (serving/README.md has the figures). The answer is the routed
endpoint's: both call the handler `serving.http.direct_route` names, bound the body with `read_body` and
format errors with `refuse` (tests/serving/test_fastpath.py compares the two).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from serving.errors import RequestError
from serving.http import Handler, direct_route, internal_error, path_label, read_body, refuse, send_json

if TYPE_CHECKING:
    from serving.app import Service


class FastPredict:
    """The direct path of the predict endpoints for one service."""

    def __init__(self, service: Service, limit: int) -> None:
        self.service = service
        self.limit = limit

    @staticmethod
    def route(path: str) -> tuple[Handler, dict[str, str]] | None:
        return direct_route(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       route: tuple[Handler, dict[str, str]]) -> None:
        started = time.perf_counter()
        handler, params = route
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        path = scope["path"]
        answer_headers: dict[str, str] = {}
        try:
            body = await read_body(receive, headers.get("content-length"), self.limit)
            if body is None:
                return
            answer, answer_headers = await handler(self.service, body, headers, params, started)
            status = 200
        except RequestError as exc:
            status, answer = refuse(self.service.metrics, path, exc)
            answer_headers = exc.headers
        except Exception as exc:  # noqa: BLE001 - last resort, as the app's exception handler
            self.service.metrics.http[(path_label(path), 500)] += 1
            status, answer = 500, internal_error(exc)
        await send_json(send, status, answer, answer_headers)


class App(FastAPI):
    """FastAPI whose predict endpoints take `fast_predict` when set; every other request goes through FastAPI."""

    fast_predict: FastPredict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_predict
        if (
            fast is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and not self.root_path
            and (route := fast.route(scope["path"])) is not None
        ):
            await fast(scope, receive, send, route)
            return
        await super().__call__(scope, receive, send)
