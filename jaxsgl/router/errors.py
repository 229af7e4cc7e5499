"""The router's error answers (`jaxsgl.http_errors`): bad input a 400, no worker to take a
request a 503, failing workers a 502/504."""

from __future__ import annotations

from jaxsgl.http_errors import (
    HTTPError,
    auth_middleware,
    error_body,
    error_response,
    parse_json_object,
)
from jaxsgl.http_errors import error_middleware as _error_middleware
from jaxsgl.router.workers import NoWorkerError

error_middleware = _error_middleware({NoWorkerError: (503, "server_error")}, what="router")

__all__ = [
    "HTTPError",
    "auth_middleware",
    "error_body",
    "error_middleware",
    "error_response",
    "parse_json_object",
]
