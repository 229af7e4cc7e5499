"""Forwarding one request to a worker of its pool.

The client's bytes go to the worker unchanged. A non-streaming request that meets a connection
error or a 502/503/504 is sent again to another healthy worker of the pool, at most
`max_retries` times. A stream is retried only before its first byte reaches the client; after
that, a worker that dies (connection cut, or silent while marked dead) ends the stream with an
error event and `data: [DONE]`, so the client never waits on a worker that is gone. Streams are
relayed event by event (whole `data: ...\\n\\n` blocks, as the worker flushes them), so a cut
never leaves half an event before the error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import aiohttp
from aiohttp import web

from jaxsgl.router.errors import HTTPError, error_body
from jaxsgl.router.workers import NoWorkerError, Worker, WorkerSet

logger = logging.getLogger(__name__)

WORKER_HEADER = "X-Jaxsgl-Worker"  # which worker served the response
RETRY_STATUSES = frozenset({502, 503, 504})  # a worker that is failing, not a bad request
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)


@dataclasses.dataclass
class Upstream:
    """What proxying needs: the workers, one client session, and the retry and stall bounds."""

    workers: WorkerSet
    session: aiohttp.ClientSession
    max_retries: int = 2
    stall_check_s: float = 1.0  # how often a silent stream looks whether its worker died


@dataclasses.dataclass(frozen=True)
class Call:
    """One client request as the router forwards it."""

    path: str
    body: bytes
    pool: str
    text: str  # the routing text for the policy
    stream: bool
    headers: dict[str, str]


async def forward(up: Upstream, call: Call, request: web.Request) -> web.StreamResponse:
    """The worker's answer to `call`, after retries on failing workers; 503 if none is left."""
    tried: list[Worker] = []
    failure = ""
    for attempt in range(up.max_retries + 1):
        try:
            worker = up.workers.pick(call.pool, call.text, exclude=tried)
        except NoWorkerError as e:
            if not tried:
                raise
            raise HTTPError(503, f"{e}; last failure: {failure}", "server_error") from None
        if attempt:
            up.workers.retries_total[call.pool] += 1
            logger.info("retrying on %s after: %s", worker.url, failure)
        tried.append(worker)
        worker.in_flight += 1
        worker.requests_total += 1
        try:
            response, failure = await _send(up, worker, call, request)
        finally:
            worker.in_flight -= 1
        if response is not None:
            return response
    raise HTTPError(502, f"{len(tried)} workers failed; last failure: {failure}", "server_error")


async def _send(
    up: Upstream, worker: Worker, call: Call, request: web.Request
) -> tuple[web.StreamResponse | None, str]:
    """(response, "") when the worker answered for good; (None, why) when to try another."""
    try:
        url = worker.url + call.path
        async with up.session.post(url, data=call.body, headers=call.headers) as r:
            if call.stream and r.status == 200:
                return await _relay(up, worker, r, request), ""
            body = await r.read()
            status, content_type = r.status, r.content_type
    except aiohttp.ConnectionTimeoutError as e:  # unreachable: like a refused connection
        return None, _failed(up, worker, e)
    except TimeoutError:
        worker.failures_total += 1
        raise HTTPError(504, f"worker {worker.url} timed out", "server_error") from None
    except _CONNECTION_ERRORS as e:
        return None, _failed(up, worker, e)
    if status >= 500:
        worker.failures_total += 1
        if status in RETRY_STATUSES:
            return None, f"{worker.url} answered {status}: {body[:200]!r}"
    headers = {"Content-Type": content_type, WORKER_HEADER: worker.url}
    return web.Response(body=body, status=status, headers=headers), ""


def _failed(up: Upstream, worker: Worker, error: Exception) -> str:
    failure = f"{worker.url}: {type(error).__name__}: {error}"
    worker.failures_total += 1
    up.workers.mark_dead(worker, failure)
    return failure


async def _relay(
    up: Upstream, worker: Worker, upstream: aiohttp.ClientResponse, request: web.Request
) -> web.StreamResponse:
    """Pass the worker's SSE stream through; end it with an error event if the worker dies.
    A client that leaves ends the relay; closing the upstream then aborts the worker's work."""
    response = web.StreamResponse(
        headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            WORKER_HEADER: worker.url,
        }
    )
    await response.prepare(request)
    try:
        failure = await _pump(up, worker, upstream, response)
        if failure:
            worker.failures_total += 1
            up.workers.mark_dead(worker, failure)
            error = json.dumps(error_body(502, failure, "server_error")).encode()
            await _write(response, b"data: " + error + b"\n\ndata: [DONE]\n\n")
        await _write(response, b"", eof=True)
    except _ClientGone:
        logger.info("client left a stream from %s", worker.url)
    return response


class _ClientGone(Exception):
    """Writing to the router's own client failed."""


async def _pump(
    up: Upstream, worker: Worker, upstream: aiohttp.ClientResponse, response: web.StreamResponse
) -> str:
    """Copy whole events until the stream ends ("") or the worker fails (what went wrong)."""
    pending = b""  # an event not yet complete
    while True:
        try:
            async with asyncio.timeout(up.stall_check_s):
                chunk = await upstream.content.readany()
        except TimeoutError:
            if worker.healthy:
                continue
            return f"worker {worker.url} stopped answering and failed its health check"
        except _CONNECTION_ERRORS as e:
            return f"worker {worker.url} failed mid-stream: {type(e).__name__}: {e}"
        if not chunk:  # a clean end
            await _write(response, pending)
            return ""
        events, sep, pending = (pending + chunk).rpartition(b"\n\n")
        await _write(response, events + sep)


async def _write(response: web.StreamResponse, data: bytes, eof: bool = False) -> None:
    try:
        if data:
            await response.write(data)
        if eof:
            await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionError) as e:
        raise _ClientGone() from e
