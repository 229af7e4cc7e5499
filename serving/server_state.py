"""What every handler shares: the generator (engine client), names, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from jaxsgl.engine.request import Request
from jaxsgl.generator import Generator
from serving.errors import HTTPError
from serving.metrics import Metrics

MAX_N = 128  # OpenAI's own bound on `n`, the choices per prompt


class ServerState:
    def __init__(self, generator: Generator, model_name: str, metrics: Metrics):
        self.generator = generator
        self.model_name = model_name
        path = generator.options.model_path
        self.served_names = {model_name, "default"} | ({str(path)} if path else set())
        self.metrics = metrics
        self.started = time.time()
        self.draining = False
        self.grammars_waiting = 0  # requests being validated (grammars compiled) off the loop

    async def make_requests(
        self, texts: Any, ids: Any, params: Any, logprobs: bool, top: int, **kwargs: Any
    ) -> tuple[list[Request], bool]:
        """Validated requests (and whether a batch was asked for); a prompt plus
        max_new_tokens must fit the context. Runs in a worker thread: compiling a grammar
        may take a while, and the event loop serves everyone else meanwhile."""
        self.admit(params)
        self.grammars_waiting += 1
        try:
            reqs, batched = await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(
                    self.generator.make_requests,
                    texts,
                    params,
                    ids,
                    return_logprob=logprobs,
                    top_logprobs_num=top,
                    **kwargs,
                ),
            )
        finally:
            self.grammars_waiting -= 1
        self.check_context(reqs)
        return reqs, batched

    def admit(self, params: Any) -> None:
        """Refuse work while draining; bound `n` before the `n` copies of a request are made
        (`"n": 1e12` would fill the memory and stall the event loop)."""
        if self.draining:
            raise HTTPError(503, "the server is shutting down", "service_unavailable")
        for p in params if isinstance(params, list) else [params]:
            n = p.get("n") if isinstance(p, dict) else None
            if isinstance(n, int) and n > MAX_N:
                raise HTTPError(400, f"n must be at most {MAX_N}, got {n}")

    def check_context(self, reqs: list[Request]) -> None:
        context = self.generator.engine.context_length
        for r in reqs:
            if len(r.prompt_ids) + r.params.max_new_tokens > context:
                raise HTTPError(
                    400,
                    f"{len(r.prompt_ids)} prompt tokens + max_tokens "
                    f"{r.params.max_new_tokens} exceed the context length "
                    f"{context}",
                )

    async def events(self, reqs: list[Request]) -> AsyncIterator[dict]:
        """The requests' engine events; the metrics see each finish. Closing early aborts."""
        async with contextlib.aclosing(self.event_batches(reqs)) as batches:
            async for batch in batches:
                for ev in batch:
                    yield ev

    async def event_batches(self, reqs: list[Request]) -> AsyncIterator[list[dict]]:
        """`events`, as many at a time as have arrived (see `Generator.stream_event_batches`).
        A request aborted by the engine is an HTTPError after the events before it."""
        async with contextlib.aclosing(self.generator.stream_event_batches(reqs)) as batches:
            async for batch in batches:
                for i, ev in enumerate(batch):
                    if ev["finished"]:
                        self.metrics.observe_finished(ev["meta_info"])
                        reason = ev["meta_info"]["finish_reason"]
                        if reason["type"] == "abort":
                            if i:
                                yield batch[:i]
                            raise HTTPError(400, f"request aborted: {reason['message']}")
                yield batch

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one state per server, ids are few
    def token_text(self, token_id: int) -> str:
        return self.generator.tokenizer.decode([token_id])


STATE = web.AppKey("state", ServerState)  # the app's one ServerState
DRAIN_SECONDS = web.AppKey("drain_seconds", float)  # how long SIGTERM waits for running requests
