"""POST /predict straight from the ASGI scope, past FastAPI's telemetry, middleware, router and dependencies.

At a few thousand requests a second those cost about as much as the rest of a request: measured by
`benchmarks/serving.py --fastpath` (serving/README.md has the figures). The answer is the routed
endpoint's: both call `serving.http.predict_answer`, bound the body with `read_body` and format errors
with `refuse` (tests/serving/test_fastpath.py compares the two).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from serving.errors import RequestError
from serving.http import internal_error, predict_answer, read_body, refuse, send_json

if TYPE_CHECKING:
    from serving.app import Service


class FastPredict:
    """The direct path of POST /predict for one service."""

    def __init__(self, service: Service, limit: int) -> None:
        self.service = service
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        authorization = ""
        length: str | None = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value.decode("latin-1")
        headers: dict[str, str] = {}
        try:
            body = await read_body(receive, length, self.limit)
            if body is None:
                return
            status, answer = 200, await predict_answer(self.service, body, authorization, started)
        except RequestError as exc:
            status, answer = refuse(self.service.metrics, "/predict", exc)
            headers = exc.headers
        except Exception as exc:  # noqa: BLE001 - last resort, as the app's exception handler
            self.service.metrics.http[("/predict", 500)] += 1
            status, answer = 500, internal_error(exc)
        await send_json(send, status, answer, headers)


class App(FastAPI):
    """FastAPI whose POST /predict takes `fast_predict` when set; every other request goes through FastAPI."""

    fast_predict: FastPredict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_predict
        if (
            fast is not None
            and scope["type"] == "http"
            and scope["path"] == "/predict"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and not self.root_path
        ):
            await fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
