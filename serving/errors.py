"""The server's error answers: OpenAI-style bodies from `jaxsgl.http_errors`. Nothing a client
sends produces a 500, and nothing it sends stops the engine."""

from __future__ import annotations

from aiohttp import web

from jaxsgl.http_errors import (
    HTTPError,
    auth_middleware,
    error_body,
    error_middleware,
    error_response,
    parse_json_object,
)

__all__ = [
    "HTTPError",
    "auth_middleware",
    "error_body",
    "error_middleware",
    "error_response",
    "json_body",
]


async def json_body(request: web.Request) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    return parse_json_object(await request.read())
