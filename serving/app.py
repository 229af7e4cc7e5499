"""The aiohttp application: routes, middlewares, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from jaxsgl.generator import Generator
from serving import cache_api, native_api, openai_api
from serving.errors import auth_middleware, error_middleware
from serving.metrics import Metrics
from serving.openapi import openapi_spec
from serving.server_state import DRAIN_SECONDS, STATE, ServerState

logger = logging.getLogger(__name__)


def create_app(
    generator: Generator,
    *,
    model_name: str,
    api_key: str | None = None,
    drain_seconds: float = 30.0,
) -> web.Application:
    metrics = Metrics(generator.metrics, generator.gen_throughput, generator.namespace_metrics)
    app = web.Application(
        middlewares=[error_middleware(), auth_middleware(api_key)], client_max_size=64 * 2**20
    )
    app[STATE] = ServerState(generator, model_name, metrics)
    app[DRAIN_SECONDS] = drain_seconds
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_post("/generate", native_api.generate)
    app.router.add_get("/health", native_api.health)
    app.router.add_get("/health_generate", native_api.health_generate)
    app.router.add_get("/model_info", native_api.model_info)
    app.router.add_get("/get_model_info", native_api.model_info)
    app.router.add_get("/server_info", native_api.server_info)
    app.router.add_get("/get_server_info", native_api.server_info)
    app.router.add_post("/flush_cache", native_api.flush_cache)
    app.router.add_post("/start_profile", native_api.start_profile)
    app.router.add_post("/stop_profile", native_api.stop_profile)
    app.router.add_post("/pin_prefix", cache_api.pin_prefix)
    app.router.add_post("/unpin_prefix", cache_api.unpin_prefix)
    app.router.add_post("/tokenize", cache_api.tokenize)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.on_shutdown.append(_drain)
    return app


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await asyncio.to_thread(state.metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())


async def _drain(app: web.Application) -> None:
    """On SIGTERM: refuse new work, let running requests finish for a while, abort the rest."""
    state = app[STATE]
    state.draining = True
    generator = state.generator
    deadline = asyncio.get_running_loop().time() + app[DRAIN_SECONDS]
    while generator.has_work and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if generator.has_work:
        logger.warning("aborting requests still running at shutdown")
        generator.abort_all()
        while generator.has_work:
            await asyncio.sleep(0.05)
