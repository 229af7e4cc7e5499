"""OpenAI-style error bodies for the router, and the middlewares that produce them.

Bad input is a 400 (`ValueError` or `RouterError(400, ...)`), no worker to take a request a 503,
failing workers a 502/504; anything else is a bug, logged and answered with a 500 body of the
same shape. The router does not import `serving` (which builds on `jaxsgl`), hence these few
lines of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from jaxsgl.router.workers import NoWorkerError

logger = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/health", "/metrics"})  # no API key needed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RouterError(Exception):
    """An error answer: HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_body(status: int, message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": status}}


def error_response(status: int, message: str, type_: str = "invalid_request_error"):
    return web.json_response(error_body(status, message, type_), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as e:
        return error_response(e.status, e.message, e.type)
    except NoWorkerError as e:
        return error_response(503, str(e), "server_error")
    except ValueError as e:
        return error_response(400, str(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason or "error")
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal router error", "internal_error")


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
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RouterError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RouterError(400, "request body must be a JSON object")
    return body
