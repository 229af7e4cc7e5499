"""The load generator: sessions start on a Poisson arrival schedule (or all at once), at most
`max_concurrency` requests are in flight, and a session's next turn is sent only when the
answer to its previous turn has arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator

import aiohttp
import numpy as np

from jaxsgl.bench_serving.backends import Reply, Target, send
from jaxsgl.bench_serving.datasets import Prompt, Session
from jaxsgl.bench_serving.metrics import RequestRecord


@dataclasses.dataclass(frozen=True)
class Load:
    """How hard to push: arrival rate (req/s, inf: all at once), the in-flight cap, and how
    long: a number of sessions, or a duration in seconds after which nothing new is sent."""

    request_rate: float = math.inf
    max_concurrency: int | None = None
    num_sessions: int | None = None
    duration: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0, got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if (self.num_sessions is None) == (self.duration is None):
            raise ValueError("give either a number of prompts (sessions) or a --duration")
        if self.num_sessions is not None and self.num_sessions < 1:
            raise ValueError(f"the number of prompts must be >= 1, got {self.num_sessions}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration}")
        unbounded = math.isinf(self.request_rate) and self.max_concurrency is None
        if self.duration is not None and unbounded:
            raise ValueError("--duration with an infinite --request-rate needs --max-concurrency")


def arrival_offsets(rate: float, rng: np.random.Generator) -> Iterator[float]:
    """Send times in seconds from the start: a Poisson process (exponential gaps of mean
    1 / rate), or all zero for an infinite rate."""
    t = 0.0
    while True:
        yield t
        if math.isfinite(rate):
            t += float(rng.exponential(1.0 / rate))


class Benchmark:
    """One timed run against one target; `records` fill in as requests finish."""

    def __init__(self, http: aiohttp.ClientSession, target: Target, load: Load, progress=None):
        self.http, self.target, self.load, self.progress = http, target, load, progress
        cap = load.max_concurrency
        self.slots = asyncio.Semaphore(cap) if cap else None
        self.records: list[RequestRecord] = []
        self.counter = itertools.count()
        self.t0 = 0.0
        self.deadline = math.inf

    async def run(self, sessions: Iterable[Session]) -> list[RequestRecord]:
        """Run the sessions; the records in sending order."""
        rng = np.random.default_rng(self.load.seed)
        if self.load.num_sessions is not None:
            sessions = itertools.islice(sessions, self.load.num_sessions)
        self.t0 = time.perf_counter()
        if self.load.duration is not None:
            self.deadline = self.t0 + self.load.duration
        tasks = []
        for sid, (session, offset) in enumerate(
            zip(sessions, arrival_offsets(self.load.request_rate, rng), strict=False)
        ):
            at = self.t0 + offset
            if at >= self.deadline:
                break
            if at > time.perf_counter():
                await asyncio.sleep(at - time.perf_counter())
            if self.slots is not None:
                await self.slots.acquire()
            if time.perf_counter() >= self.deadline:
                self._release()
                break
            tasks.append(asyncio.create_task(self._session(sid, session)))
        await asyncio.gather(*tasks)
        return sorted(self.records, key=lambda r: r.index)

    async def _session(self, sid: int, session: Session) -> None:
        """The turns of one conversation; enters holding a slot for its first request."""
        prompt = session[0]
        for turn in range(len(session)):
            if turn > 0:
                if time.perf_counter() >= self.deadline:
                    return
                if self.slots is not None:
                    await self.slots.acquire()
            index = next(self.counter)
            try:
                reply = await send(self.http, self.target, prompt)
            finally:
                self._release()
            self.records.append(to_record(reply, index, sid, turn, prompt, self.t0))
            if self.progress is not None:
                self.progress.update(1)
            if not reply.ok:
                return  # the conversation cannot go on without the answer
            if turn + 1 < len(session):
                prompt = prompt.follow(reply.text, reply.output_ids, session[turn + 1])

    def _release(self) -> None:
        if self.slots is not None:
            self.slots.release()


def to_record(
    reply: Reply, index: int, session: int, turn: int, prompt: Prompt, t0: float
) -> RequestRecord:
    """A reply as a record; token counts the server did not report are our own."""
    times = reply.token_times
    return RequestRecord(
        index=index,
        session=session,
        turn=turn,
        start=reply.start - t0,
        end=reply.end - t0,
        success=reply.ok,
        error=reply.error,
        prompt_tokens=prompt.num_tokens if reply.prompt_tokens is None else reply.prompt_tokens,
        output_tokens=len(times) if reply.output_tokens is None else reply.output_tokens,
        cached_tokens=reply.cached_tokens,
        requested_output_tokens=prompt.output_len,
        ttft=times[0] - reply.start if times else None,
        itl=[b - a for a, b in itertools.pairwise(times)],
    )


async def warm_up(
    http: aiohttp.ClientSession, target: Target, prompts: list[Prompt], max_concurrency: int | None
) -> None:
    """Send untimed requests (e.g. to finish compilation); fails if any of them fails."""
    slots = asyncio.Semaphore(max_concurrency or max(len(prompts), 1))

    async def one(prompt: Prompt) -> Reply:
        async with slots:
            return await send(http, target, prompt)

    replies = await asyncio.gather(*(one(p) for p in prompts))
    failed = [r for r in replies if not r.ok]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(prompts)} warm-up requests failed; first: {failed[0].error}"
        )


async def flush_cache(http: aiohttp.ClientSession, base_url: str, headers: dict) -> None:
    """POST /flush_cache; the server flushes only when idle."""
    async with http.post(base_url.rstrip("/") + "/flush_cache", headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"/flush_cache answered {r.status}: {(await r.text())[:200]}")
