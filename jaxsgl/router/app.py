"""The router's aiohttp application: proxied generation routes, health, metrics, admin routes.

POST /generate, /v1/completions, /v1/chat/completions   graded into a pool, then proxied
GET  /v1/models      the models of one healthy worker per pool, merged
GET  /health         200 while at least one worker is healthy, else 503
GET  /metrics        Prometheus text (`jaxsgl.router.metrics`)
POST /add_worker     {"url": ..., "pool": ...}: checked once, then routed to when healthy
POST /remove_worker  {"url": ...}
GET  /list_workers   every worker with its pool, health, in-flight and totals
GET  /server_info    every healthy worker's, merged (`jaxsgl.router.aggregate`)
GET  /model_info     the first healthy worker's
POST /flush_cache    sent to every healthy worker; 200 only if each flushed
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import aiohttp
from aiohttp import web

from jaxsgl.router.aggregate import merge_server_info
from jaxsgl.router.errors import HTTPError, auth_middleware, error_middleware, parse_json_object
from jaxsgl.router.features import request_features
from jaxsgl.router.metrics import RouterMetrics
from jaxsgl.router.proxy import Call, Upstream, forward
from jaxsgl.router.rules import Rules
from jaxsgl.router.workers import WorkerSet, check_all, check_worker, health_loop

logger = logging.getLogger(__name__)

PROXIED_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass(kw_only=True)
class RouterConfig:
    """How the router checks workers and forwards requests (the CLI's flags)."""

    rules: Rules = dataclasses.field(default_factory=Rules)
    health_interval_s: float = 5.0
    health_timeout_s: float = 3.0
    max_retries: int = 2
    request_timeout_s: float = 600.0  # silence from a worker before its request fails
    worker_api_key: str | None = None  # sent to workers instead of the client's key


@dataclasses.dataclass
class Router:
    workers: WorkerSet
    config: RouterConfig
    metrics: RouterMetrics
    upstream: Upstream | None = None  # made at startup, inside the event loop


ROUTER = web.AppKey("router", Router)


def create_app(
    workers: WorkerSet, config: RouterConfig, api_key: str | None = None
) -> web.Application:
    """The router over `workers` (more can be added at run time through `/add_worker`)."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(api_key)], client_max_size=64 * 2**20
    )
    app[ROUTER] = Router(workers, config, RouterMetrics(workers))
    for path in PROXIED_ROUTES:
        app.router.add_post(path, _proxy)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/add_worker", _add_worker)
    app.router.add_post("/remove_worker", _remove_worker)
    app.router.add_get("/list_workers", _list_workers)
    for path in ("/server_info", "/get_server_info"):  # the server's names, SGLang's too
        app.router.add_get(path, _server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, _model_info)
    app.router.add_post("/flush_cache", _flush_cache)
    app.cleanup_ctx.append(_lifetime)
    return app


async def _lifetime(app: web.Application):
    """One client session and the health-check loop for the app's lifetime."""
    router = app[ROUTER]
    cfg = router.config
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=cfg.health_timeout_s, sock_read=cfg.request_timeout_s
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
    router.upstream = Upstream(
        router.workers, session, cfg.max_retries, min(1.0, cfg.health_interval_s)
    )
    await check_all(router.workers, session, cfg.health_timeout_s)
    task = asyncio.create_task(
        health_loop(router.workers, session, cfg.health_interval_s, cfg.health_timeout_s)
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await session.close()


async def _proxy(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    raw = await request.read()
    body = parse_json_object(raw)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"stream must be a boolean, got {stream!r}")
    features = request_features(body, request.headers)
    headers = {"Content-Type": "application/json", **_worker_auth(router, request)}
    pool = router.config.rules.pool_for(features)
    call = Call(request.path, raw, pool, features.text, stream, headers)
    return await forward(router.upstream, call, request)


def _worker_auth(router: Router, request: web.Request) -> dict[str, str]:
    """The Authorization header for workers: the router's worker key, else the client's."""
    key = router.config.worker_api_key
    auth = f"Bearer {key}" if key else request.headers.get("Authorization")
    return {"Authorization": auth} if auth else {}


async def _models(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    first_healthy = {}
    for w in router.workers.healthy():
        first_healthy.setdefault(w.pool, w)
    if not first_healthy:
        raise HTTPError(503, "no healthy worker", "server_error")
    headers = _worker_auth(router, request)
    models: dict[str, dict] = {}
    for w in first_healthy.values():
        try:
            async with router.upstream.session.get(w.url + "/v1/models", headers=headers) as r:
                if r.status == 200:
                    for m in (await r.json()).get("data", []):
                        models.setdefault(m.get("id"), m)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            logger.warning("GET /v1/models from %s failed: %s", w.url, e)
    if not models:
        raise HTTPError(502, "no worker listed its models", "server_error")
    return web.json_response({"object": "list", "data": list(models.values())})


async def _each_worker(request: web.Request, method: str, path: str) -> list[tuple]:
    """(worker, status, body) from every healthy worker, asked at once; 503 if none is."""
    router = request.app[ROUTER]
    workers = router.workers.healthy()
    if not workers:
        raise HTTPError(503, "no healthy worker", "server_error")
    headers = _worker_auth(router, request)

    async def ask(w):
        try:
            async with router.upstream.session.request(method, w.url + path, headers=headers) as r:
                json_body = r.content_type == "application/json"
                return w, r.status, await (r.json() if json_body else r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return w, 502, str(e)

    return await asyncio.gather(*(ask(w) for w in workers))


async def _server_info(request: web.Request) -> web.Response:
    answers = await _each_worker(request, "GET", "/server_info")
    failed = [w.url for w, status, body in answers if status != 200 or not isinstance(body, dict)]
    if failed:
        raise HTTPError(502, f"no server_info from {', '.join(failed)}", "server_error")
    return web.json_response(merge_server_info([body for _, _, body in answers]))


async def _model_info(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    workers = router.workers.healthy(router.config.rules.default_pool) or router.workers.healthy()
    if not workers:
        raise HTTPError(503, "no healthy worker", "server_error")
    url = workers[0].url + "/model_info"
    try:
        async with router.upstream.session.get(url, headers=_worker_auth(router, request)) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise HTTPError(502, f"GET {url} failed: {e}", "server_error") from None


async def _flush_cache(request: web.Request) -> web.Response:
    answers = await _each_worker(request, "POST", "/flush_cache")
    failed = [(w, status) for w, status, _ in answers if status != 200]
    if failed:  # a worker with running requests answers 400: so does the router
        busy = all(s == 400 for _, s in failed)
        where = ", ".join(f"{w.url} ({s})" for w, s in failed)
        message = f"cache not flushed on {where}"
        raise HTTPError(400, message) if busy else HTTPError(502, message, "server_error")
    return web.Response(text=f"Cache flushed on {len(answers)} workers.")


async def _health(request: web.Request) -> web.Response:
    n = len(request.app[ROUTER].workers.healthy())
    return web.Response(status=200 if n else 503, text=f"{n} healthy workers")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[ROUTER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _add_worker(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    body = parse_json_object(await request.read())
    unknown = sorted(set(body) - {"url", "pool"})
    if unknown:
        raise HTTPError(400, f"unknown fields: {', '.join(unknown)}")
    if "url" not in body:
        raise HTTPError(400, "missing field: url")
    worker = router.workers.add(body["url"], body.get("pool", router.config.rules.default_pool))
    reason = await check_worker(router.upstream.session, worker, router.config.health_timeout_s)
    router.workers.record_check(worker, not reason, reason)
    return web.json_response(worker.as_json())


async def _remove_worker(request: web.Request) -> web.Response:
    body = parse_json_object(await request.read())
    if set(body) != {"url"}:
        raise HTTPError(400, 'the body must be {"url": ...}')
    try:
        worker = request.app[ROUTER].workers.remove(body["url"])
    except KeyError:
        raise HTTPError(404, f"no worker {body['url']!r}", "not_found_error") from None
    return web.json_response(worker.as_json())


async def _list_workers(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    return web.json_response(
        {
            "policy": router.workers.policy_name,
            "default_pool": router.config.rules.default_pool,
            "workers": [w.as_json() for w in router.workers.workers.values()],
            "retries_total": dict(router.workers.retries_total),
        }
    )
