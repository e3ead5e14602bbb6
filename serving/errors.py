"""The one error type of the service's endpoints: a client error with its status and the field it names."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """Answered as HTTP `status` with `{"detail": message}` (plus `errors`, every problem, when given)."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = {} if retry_after_s is None else {"retry-after": str(retry_after_s)}
