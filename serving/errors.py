"""OpenAI-style error bodies and the middleware that turns failures into them.

Bad input anywhere (a `ValueError` from parsing, validation or the engine's checks) becomes a
400 with `{"error": {"message", "type", "param", "code"}}`; nothing a client sends produces a
500, and nothing it sends stops the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

logger = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/health", "/metrics"})


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_body(status: int, message: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": status}}


def error_response(status: int, message: str, type_: str = "invalid_request_error"):
    return web.json_response(error_body(status, message, type_), status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_middleware() -> Callable:
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
        except Exception:  # a bug: keep serving, tell the client, log the trace
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal server error", "internal_error")

    return middleware


def auth_middleware(api_key: str | None) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorized = request.headers.get("Authorization", "") == f"Bearer {api_key}"
        if api_key and request.path not in OPEN_ROUTES and not authorized:
            return error_response(401, "invalid or missing API key", "authentication_error")
        return await handler(request)

    return middleware


async def json_body(request: web.Request) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # `[[[[...` thousands deep: the decoder's own limit
        raise HTTPError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return body
