"""OpenAI-style error bodies and the aiohttp middlewares that produce them, for the server and
the router alike.

Bad input (a `ValueError`, or `HTTPError(400, ...)`) becomes a 400 with
`{"error": {"message", "type", "param", "code"}}`; other statuses come from `HTTPError` or from
the caller's own exception types; anything else is a bug, logged and answered with a 500 body
of the same shape, and the process keeps serving.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

logger = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/health", "/metrics"})  # no API key needed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPError(Exception):
    """An error answer: HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_body(status: int, message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": status}}


def error_response(status: int, message: str, type_: str = "invalid_request_error"):
    return web.json_response(error_body(status, message, type_), status=status)


def error_middleware(
    statuses: Mapping[type[Exception], tuple[int, str]] | None = None, what: str = "server"
) -> Callable:
    """Failures into error bodies; `statuses` maps further exception types to (status, type)."""
    statuses = dict(statuses or {})

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HTTPError as e:
            return error_response(e.status, e.message, e.type)
        except ValueError as e:
            return error_response(400, str(e))
        except web.HTTPException as e:
            if e.status >= 400:
                return error_response(e.status, e.reason or "error", "invalid_request_error")
            raise
        except Exception as e:
            for kind, (status, type_) in statuses.items():
                if isinstance(e, kind):
                    return error_response(status, str(e), type_)
            # A bug: keep serving, tell the client, log the trace.
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, f"internal {what} error", "internal_error")

    return middleware


def auth_middleware(api_key: str | None) -> Callable:
    """Require `Authorization: Bearer <api_key>` on every route but health and metrics."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorized = request.headers.get("Authorization", "") == f"Bearer {api_key}"
        if api_key and request.path not in OPEN_ROUTES and not authorized:
            return error_response(401, "invalid or missing API key", "authentication_error")
        return await handler(request)

    return middleware


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # `[[[[...` thousands deep: the decoder's own limit
        raise HTTPError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body
