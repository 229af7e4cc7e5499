"""`Generator`: the offline engine in one object, like `sglang.Engine`.

with Generator() as gen:                       # the embedded SmolLM2
    out = gen.generate("The capital of France is", {"max_new_tokens": 16})
    print(out["text"], out["meta_info"]["cached_tokens"])
    for chunk in gen.generate("Count: 1, 2,", stream=True):
        print(chunk["text"], end="")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import queue
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from jaxsgl.engine.engine import Engine
from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.replicas import Replicas
from jaxsgl.engine.request import Request
from jaxsgl.sampling_params import SamplingParams, grammar_of
from jaxsgl.tokenizer import check_token_ids

Prompt = str | list[str] | None
Ids = list[int] | list[list[int]] | None


class Generator:
    def __init__(self, model_path: str | None = None, *, progress: bool = True, **options: Any):
        """`options` take the server flags' names (`tp_size`, `max_total_tokens`, ...)."""
        self.options = EngineOptions.from_kwargs(model_path, **options)
        # One engine, or `dp_size` of them on their own devices behind a dispatcher.
        self.replicas = Replicas(self.options, progress=progress)
        self.engine = self.replicas.engines[0]  # model, tokenizer, context, grammar compiler
        self.options = self.engine.options  # with the device's defaults filled in
        self.tokenizer = self.engine.tokenizer
        if self.options.chat_template is not None and self.tokenizer is not None:
            self.tokenizer.hf.chat_template = self.options.chat_template
        self._inboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._inbox_lock = threading.Lock()
        self.replicas.start()
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------
    def make_requests(
        self,
        prompt: Prompt = None,
        sampling_params: dict | list | None = None,
        input_ids: Ids = None,
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        namespace: str = "",
        rid: str | list[str] | None = None,
    ) -> tuple[list[Request], bool]:
        """Validated engine requests (n copies per prompt for `n > 1`) and whether the caller
        passed a batch. Raises ValueError naming whatever is wrong."""
        prompts, batched = self._prompt_ids(prompt, input_ids)
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        rids = rid if isinstance(rid, list) else [rid] * len(prompts)
        reqs = []
        for ids, p, r in zip(prompts, params, rids, strict=True):
            sp = p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p or {})
            sp.validate(self.engine.loaded.config.vocab_size)
            if len(ids) >= self.engine.context_length:
                raise ValueError(
                    f"prompt of {len(ids)} tokens exceeds the context length "
                    f"{self.engine.context_length}"
                )
            if top_logprobs_num < 0 or logprob_start_len < -1:
                raise ValueError("top_logprobs_num must be >= 0 and logprob_start_len >= -1")
            base = r or uuid.uuid4().hex
            for j in range(sp.n):
                reqs.append(
                    Request(
                        rid=base if sp.n == 1 else f"{base}-{j}",
                        prompt_ids=ids,
                        params=sp,
                        grammar=self._grammar(sp),
                        namespace=namespace,
                        return_logprob=return_logprob,
                        logprob_start_len=logprob_start_len,
                        top_logprobs_num=top_logprobs_num,
                    )
                )
        return reqs, batched or any(r.params.n > 1 for r in reqs)

    def _grammar(self, params: SamplingParams):
        """A fresh grammar state for `params` (compiled here, in the caller's thread), or
        None. ValueError for an invalid regex, schema or grammar."""
        spec = grammar_of(params)
        return None if spec is None else self.engine.grammars().compile(*spec)

    def _prompt_ids(self, prompt: Prompt, input_ids: Ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        vocab = self.engine.loaded.config.vocab_size
        if input_ids is not None:
            batched = bool(input_ids) and isinstance(input_ids[0], list)
            seqs = input_ids if batched else [input_ids]
            seqs = [check_token_ids(s, vocab) for s in seqs]
        else:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass input_ids")
            batched = isinstance(prompt, list)
            texts = prompt if batched else [prompt]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompt must be a string or a list of strings")
            seqs = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("every prompt needs at least one token")
        return seqs, batched

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt = None,
        sampling_params: dict | list | None = None,
        input_ids: Ids = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        **kwargs: Any,
    ) -> dict | list[dict] | Iterator[dict]:
        """SGLang-shaped results: `{"text", "output_ids", "meta_info"}` per prompt (a list for a
        batch), or with `stream=True` an iterator of incremental chunks."""
        reqs, batched = self.make_requests(
            prompt,
            sampling_params,
            input_ids,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            **kwargs,
        )
        events: queue.SimpleQueue = queue.SimpleQueue()
        for req in reqs:
            req.on_event = events.put
            self.replicas.submit(req)
        if stream:
            return self._stream(reqs, events)
        results = _collect(reqs, iter(events.get, None))
        return results if batched else results[0]

    def _stream(self, reqs: Sequence[Request], events: queue.SimpleQueue) -> Iterator[dict]:
        index = {r.rid: i for i, r in enumerate(reqs)}
        left = len(reqs)
        try:
            while left:
                ev = events.get()
                left -= ev["finished"]
                yield {**ev, "index": index[ev["rid"]]}
        finally:
            if left:  # the caller stopped reading: stop generating
                for r in reqs:
                    self.replicas.abort(r.rid)

    async def async_generate(
        self,
        prompt: Prompt = None,
        sampling_params=None,
        input_ids=None,
        stream: bool = False,
        **kwargs: Any,
    ):
        """`generate` for asyncio callers: awaits the result, or with `stream` returns an async
        iterator of chunks."""
        reqs, batched = self.make_requests(prompt, sampling_params, input_ids, **kwargs)
        events = self.stream_events(reqs)
        if stream:
            return _indexed(reqs, events)
        results = _collect(reqs, [ev async for ev in events])
        return results if batched else results[0]

    async def stream_events(self, reqs: Sequence[Request]) -> AsyncIterator[dict]:
        """Submit `reqs` and yield their events until all finish. Leaving early (a closed
        stream, a cancelled task: a client that went away) aborts whatever still runs."""
        async with contextlib.aclosing(self.stream_event_batches(reqs)) as batches:
            async for batch in batches:
                for ev in batch:
                    yield ev

    async def stream_event_batches(self, reqs: Sequence[Request]) -> AsyncIterator[list[dict]]:
        """`stream_events`, a list at a time: every event that has arrived when the caller
        asks (at least one), so a caller that falls behind catches up in one go."""
        inbox = self._inbox(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()
        for req in reqs:
            req.on_event = functools.partial(inbox.put, events)
            self.replicas.submit(req)
        left = len(reqs)
        try:
            while left:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                left -= sum(ev["finished"] for ev in batch)
                yield batch
        finally:
            if left:
                for r in reqs:
                    self.replicas.abort(r.rid)

    def _inbox(self, loop: asyncio.AbstractEventLoop) -> _LoopInbox:
        with self._inbox_lock:
            if loop not in self._inboxes:
                self._inboxes[loop] = _LoopInbox(loop)
            return self._inboxes[loop]

    def chat(self, messages: list[dict], sampling_params: dict | None = None, **kwargs: Any):
        """Apply the chat template and generate the assistant's answer."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(input_ids=ids, sampling_params=sampling_params, **kwargs)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are running."""
        return all(
            self._on_engine(lambda s=e.scheduler: not s.has_work and s.kv.flush() >= 0, e)
            for e in self.replicas.engines
        )

    def pin_prefix(
        self, prompt: str | None = None, input_ids: list[int] | None = None, namespace: str = ""
    ) -> int:
        """Compute `prompt`'s KV if it is not cached yet and pin its whole pages in the radix
        cache of `namespace`: no eviction or flush drops them until `unpin_prefix`. Returns
        the pinned length in tokens (a multiple of the page size; 0 for a prompt shorter
        than a page). Each pin needs its own unpin."""
        [ids], _ = self._prompt_ids(prompt, input_ids)
        return min(self._pin_on(e, ids, namespace) for e in self.replicas.engines)

    def _pin_on(self, engine: Engine, ids: list[int], namespace: str) -> int:
        """`pin_prefix` on one replica (every replica keeps its own copy of a pinned prefix)."""
        page = self.options.page_size
        cache = engine.scheduler.kv.cache
        for _ in range(3):  # a flood of requests may evict it between the prefill and the pin
            [req], _ = self.make_requests(
                input_ids=ids, sampling_params={"max_new_tokens": 0}, namespace=namespace
            )
            events: queue.SimpleQueue = queue.SimpleQueue()
            req.on_event = events.put
            engine.submit(req)
            _collect([req], iter(events.get, None))
            pinned = self._on_engine(lambda: cache.pin(ids, namespace), engine)
            if pinned == len(ids) // page * page or cache.disable:
                return pinned
            self._on_engine(lambda: cache.unpin(ids, namespace), engine)
        raise RuntimeError(f"could not pin a prefix of {len(ids)} tokens: the cache is too busy")

    def unpin_prefix(
        self, prompt: str | None = None, input_ids: list[int] | None = None, namespace: str = ""
    ) -> None:
        """Release one `pin_prefix` of the same prompt; its pages become evictable again.
        ValueError when nothing of it is pinned."""
        [ids], _ = self._prompt_ids(prompt, input_ids)
        for e in self.replicas.engines:
            self._on_engine(lambda c=e.scheduler.kv.cache: c.unpin(ids, namespace), e)

    def check_integrity(self) -> dict[str, int]:
        """Run every manager's integrity check on the engine thread; raises on a violation."""

        def check(engine: Engine) -> tuple[int, int]:
            engine.check_integrity()
            return len(engine.scheduler.running), len(engine.scheduler.waiting)

        counts = [self._on_engine(lambda e=e: check(e), e) for e in self.replicas.engines]
        return {"running": sum(r for r, _ in counts), "waiting": sum(w for _, w in counts)}

    # -- state of every replica --------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The engines' counters (added up over data-parallel replicas)."""
        return self.replicas.metrics()

    def gen_throughput(self, window: float = 10.0) -> float:
        return self.replicas.gen_throughput(window)

    def namespace_metrics(self) -> dict[str, tuple[int, int]]:
        """Per namespace: (prompt tokens, cached prompt tokens), over every replica."""
        total: dict[str, tuple[int, int]] = {}
        for e in self.replicas.engines:
            for ns, (p, c) in e.namespace_metrics().items():
                tp, tc = total.get(ns, (0, 0))
                total[ns] = (tp + p, tc + c)
        return total

    @property
    def has_work(self) -> bool:
        return self.replicas.has_work

    @property
    def alive(self) -> bool:
        return self.replicas.alive

    def abort_all(self) -> None:
        self.replicas.abort_all()

    def _on_engine(self, fn: Callable[[], Any], engine: Engine | None = None) -> Any:
        """`fn()` run on an engine's thread (the first replica's by default) between steps;
        its result, or its exception."""
        engine = engine or self.engine
        done: queue.SimpleQueue = queue.SimpleQueue()

        def call():
            try:
                done.put((True, fn()))
            except Exception as e:  # handed to the caller's thread
                done.put((False, e))

        engine.run_on_engine_thread(call)
        ok, out = done.get()
        if not ok:
            raise out
        return out

    def shutdown(self) -> None:
        self.replicas.shutdown()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _collect(reqs: Sequence[Request], events: Iterable[dict]) -> list[dict]:
    """Gather events until every request finished; one result dict per request."""
    text = {r.rid: [] for r in reqs}
    final: dict[str, dict] = {}
    for ev in events:
        text[ev["rid"]].append(ev["text"])
        if ev["finished"]:
            final[ev["rid"]] = ev
            if len(final) == len(reqs):
                break
    return [
        {
            "text": "".join(text[r.rid]),
            "output_ids": list(r.output_ids),
            "meta_info": final[r.rid]["meta_info"],
        }
        for r in reqs
    ]


class _LoopInbox:
    """Events from engine threads for one asyncio loop, handed over in batches: the loop is
    woken once for all the events of an engine step, not once per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the inbox lives in a weak map keyed by the loop
        self._pending: list[tuple[asyncio.Queue, dict]] = []
        self._lock = threading.Lock()

    def put(self, events: asyncio.Queue, ev: dict) -> None:
        """From any thread: `ev` goes into `events` on the loop's thread (dropped once the
        loop is gone: nobody is left to read it)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return
        with self._lock:
            wake = not self._pending
            self._pending.append((events, ev))
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop closed just now
                loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for events, ev in pending:
            events.put_nowait(ev)


async def _indexed(reqs: Sequence[Request], events: AsyncIterator[dict]) -> AsyncIterator[dict]:
    index = {r.rid: i for i, r in enumerate(reqs)}
    async for ev in events:
        yield {**ev, "index": index[ev["rid"]]}
