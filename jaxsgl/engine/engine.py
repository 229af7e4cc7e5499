"""The engine loop: schedule, run, postprocess, emit — on one background thread.

    while running:
        take new and aborted requests
        batch = scheduler.schedule()
        result = runner.run(batch)
        postprocess: append tokens, stream text, finish, cache, free

Callers talk to it through `submit` and `abort` (thread safe); each request's events go to its
`on_event` callback from the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import random
import threading
import time
from typing import Any

import numpy as np

from jaxsgl.constrained.grammar import GrammarBackend
from jaxsgl.distributed import Followers
from jaxsgl.engine.model_runner import (
    ModelRunner,
    PendingStep,
    PreparedStep,
    StepResult,
    enable_compilation_cache,
)
from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.output import OutputState
from jaxsgl.engine.postprocess import emit, record_step
from jaxsgl.engine.request import Request, Status
from jaxsgl.engine.scheduler import ScheduledBatch, Scheduler
from jaxsgl.engine.sizing import chunked_prefill_size_for, context_length_for, kv_pages_for
from jaxsgl.model.loader import load_model, resolve_model_path
from jaxsgl.profiler import TRACE
from jaxsgl.sampler import RowState
from jaxsgl.sharding import make_mesh
from jaxsgl.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DECODE_LOG_INTERVAL = 40


class EngineStats:
    """Counters the server exports; updated on the engine thread."""

    def __init__(self):
        self.num_requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.num_aborted = 0
        self.num_extend_steps = 0
        self.extend_tokens = 0  # prompt tokens computed in extend steps (mixed decodes apart)
        self.num_decode_steps = 0
        self.num_decode_launches = 0  # fewer than the steps with --num-continuous-decode-steps
        # Engine-thread seconds of the steps of each kind, from taking the step to its tokens
        # sent on: together, the time the engine was busy.
        self.seconds = {"extend": 0.0, "decode": 0.0}
        self.num_lookahead_steps = 0  # decode steps launched before the previous one ended
        self.jump_forward_tokens = 0  # output tokens a grammar forced, appended unsampled
        self.mixed_decode_tokens = 0  # decode tokens computed in prefill steps (mixed chunk)
        self.steps = collections.deque(maxlen=1024)  # (kind, requests, tokens) of recent steps
        self.token_times = collections.deque(maxlen=65536)  # when recent tokens were generated
        self.ttft = collections.deque(maxlen=4096)  # seconds, recent requests
        self.itl = collections.deque(maxlen=4096)  # seconds between tokens, recent requests
        # namespace -> [prompt tokens, cached prompt tokens] of its finished requests
        self.namespaces: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def gen_throughput(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.perf_counter()
        return sum(now - t <= window for t in list(self.token_times)) / window

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Engine:
    def __init__(
        self,
        options: EngineOptions,
        progress: bool = True,
        devices=None,
        compile_threads: int | None = None,
    ):
        """`devices`: this engine's share of the machine (a data-parallel replica's group);
        None: the first `tp_size` devices. `compile_threads`: how many step shapes warm-up
        compiles at once (default: the cores, shared out over `dp_size` replicas)."""
        self.options = options
        enable_compilation_cache(options.compilation_cache_dir)
        mesh = make_mesh(options.tp_size, devices=devices)
        self.loaded = load_model(
            options.model_path,
            load_format=options.load_format,
            dtype=options.dtype,
            mesh=mesh,
            seed=options.random_seed,
            progress=progress,
        )
        cfg = self.loaded.config
        self.tokenizer = None
        if options.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(options.tokenizer_path)
            if len(self.tokenizer.hf) > cfg.vocab_size:
                raise ValueError(
                    f"tokenizer {options.tokenizer_path!r} has {len(self.tokenizer.hf)} tokens, "
                    f"more than the model's vocabulary of {cfg.vocab_size}"
                )
        elif options.load_format != "dummy":
            self.tokenizer = load_tokenizer(
                self.loaded.path or resolve_model_path(options.model_path)
            )
        self.eos_ids = self.tokenizer.eos_token_ids if self.tokenizer else cfg.eos_token_ids
        chunk = chunked_prefill_size_for(options, self.loaded)
        self.options = options = dataclasses.replace(options, chunked_prefill_size=chunk)
        self.context_length = context_length_for(options, cfg)
        num_pages = kv_pages_for(options, self.loaded, self.context_length)
        self.followers = None
        if options.nnodes > 1:  # the other hosts build the same pool and launch every step
            self.followers = Followers(options.dist_init_addr, options.nnodes - 1)
            self.followers.send(("init", num_pages))
        self.runner = ModelRunner(
            self.loaded,
            num_pages,
            options.page_size,
            cfg.vocab_size,
            self.eos_ids,
            attention_backend=options.attention_backend,
            followers=self.followers,
            max_context=self.context_length,
            kv_cache_dtype=options.kv_cache_dtype,
        )
        self.scheduler = Scheduler(options, num_pages, self.context_length)
        if options.warmup:
            cores = os.cpu_count() or 1
            self.runner.warmup(
                options.max_running_requests,
                self.context_length,
                options.chunk_tokens,
                progress=progress,
                decode_steps=options.num_continuous_decode_steps,
                compile_threads=compile_threads or max(1, cores // options.dp_size),
            )
        self.stats = EngineStats()
        self.outputs: dict[int, OutputState] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._inflight: tuple[ScheduledBatch, PendingStep] | None = None  # launched, uncollected
        self._grammars: GrammarBackend | None = None
        self._grammars_lock = threading.Lock()
        self._stop = threading.Event()
        self._seeds = random.Random(options.random_seed)  # for requests without a seed
        self._last_log = (time.perf_counter(), 0)  # (when, generation_tokens) last logged
        logger.info(
            "engine ready: %d KV pages of %d tokens, context %d",
            num_pages,
            options.page_size,
            self.context_length,
        )

    # -- API, any thread -----------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request (validated by the caller); its events go to `req.on_event`."""
        self._inbox.put(("add", req))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxsgl-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.followers is not None:
            self.followers.close()

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.scheduler.has_work
            self._drain(timeout=0.05 if idle else None)
            try:
                ran = self.step()
            except Exception:  # one bad step must not kill the engine: fail its requests
                logger.exception("engine step failed")
                self._fail_running("internal error in the engine step")
                ran = True
            if ran:
                TRACE.after_step()
            if not ran and self.scheduler.has_work:
                time.sleep(0.0005)  # waiting out the batching window

    def _drain(self, timeout: float | None) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            self._add(payload)
        elif kind == "abort":
            req = self._requests.get(payload)
            if req is not None:
                self.outputs[id(req)].abort("aborted by the client")
                self._finish(req)
        elif kind == "abort_all":
            for req in list(self._requests.values()):
                self.outputs[id(req)].abort("the server is shutting down")
                self._finish(req)
        elif kind == "call":
            payload()

    def _add(self, req: Request) -> None:
        seed = req.params.sampling_seed
        req.seed = self._seeds.getrandbits(32) if seed is None else seed
        self._requests[req.rid] = req
        self.outputs[id(req)] = OutputState(req, self.tokenizer)
        try:
            self.scheduler.add(req)
        except ValueError as e:
            self.outputs[id(req)].abort(str(e))
            self._finish(req)

    def step(self) -> bool:
        """Run one batch; False when there was nothing to run.

        Overlap: while decode step N runs on the device, step N+1 for the same requests is
        launched with placeholders for the tokens N is sampling, so recording N and preparing
        N+1 on the host hide behind the device's work. Rows of requests that finished or left
        meanwhile are dropped when N+1 is collected.
        """
        t0 = time.perf_counter()
        if self._inflight is not None:
            batch, pending = self._inflight
            self._inflight = None
        else:
            batch = self.scheduler.schedule()
            if batch is None:
                return False
            pending = self.runner.launch(self._prepare(batch))
        # Only an unchanged batch looks ahead: its step then has the shape of the one before,
        # whose sampled tokens it reads row for row. After a request leaves, one step waits.
        overlap = not self.options.disable_overlap_schedule
        live = _live(batch)  # nothing below changes a request before the rows are recorded
        unchanged = len(live) == len(batch.reqs)
        if overlap and unchanged and all(r.can_run_ahead() for r in batch.reqs):
            nxt = self.scheduler.lookahead(batch)
            if nxt is not None:
                step = self._prepare(nxt, lookahead=True)
                self._inflight = (nxt, self.runner.launch(step, prev=pending))
                self.stats.num_lookahead_steps += 1
        launched, results = batch, self.runner.collect_steps(pending)
        batch, first = _live_rows(launched, live, results[0])
        if not batch.reqs:
            return True
        record_step(self, batch, first)
        for result in results[1:]:  # further steps of one launch: requests that went on
            live = [i for i in live if launched.reqs[i].finish_reason is None]
            if live:
                record_step(self, *_live_rows(launched, live, result))
        self._log_step(batch, launched.num_steps)
        for req in batch.reqs:
            if req.finish_reason is not None:
                self._finish(req)
            else:
                emit(self, req, finished=False)
        self.stats.seconds[launched.kind] += time.perf_counter() - t0
        return True

    def _prepare(self, batch: ScheduledBatch, lookahead: bool = False) -> PreparedStep:
        """Host inputs for `batch`. A lookahead batch's chunk i takes its token from row i of
        the launch before it, and is as many tokens further than its request recorded as that
        launch ran steps."""
        rows = [
            self._row_state(r, c.prefix_len - r.kv_len, sampled)
            for r, c, sampled in zip(batch.reqs, batch.chunks, batch.sample, strict=True)
        ]
        k = max((r.top_logprobs_num for r in batch.reqs if r.return_logprob), default=0)
        targets = [
            self._targets(r, c) if c.all_logits else None
            for r, c in zip(batch.reqs, batch.chunks, strict=True)
        ]
        return self.runner.prepare(
            batch.chunks,
            rows,
            batch.kind == "decode",
            k,
            targets,
            placeholders=lookahead,
            num_steps=batch.num_steps,
        )

    def _log_step(self, batch: ScheduledBatch, num_steps: int = 1) -> None:
        """SGLang-style batch lines: every prefill, every `DECODE_LOG_INTERVAL`-th decode."""
        st, sched = self.stats, self.scheduler
        st.steps.append((batch.kind, len(batch.reqs), sum(len(c.tokens) for c in batch.chunks)))
        kv = sched.kv
        usage = 1 - kv.allocator.num_free / kv.num_usable_pages
        if batch.kind == "extend":
            st.num_extend_steps += 1
            st.mixed_decode_tokens += batch.num_mixed
            prompts = batch.chunks[: len(batch.chunks) - batch.num_mixed]
            new_tokens = st.steps[-1][2] - batch.num_mixed  # each mixed decode row is one token
            st.extend_tokens += new_tokens
            logger.info(
                "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, "
                "#mixed-decode: %d, token usage: %.2f, #running-req: %d, #queue-req: %d",
                len(prompts),
                new_tokens,
                sum(c.prefix_len for c in prompts),
                batch.num_mixed,
                usage,
                len(sched.running),
                len(sched.waiting),
            )
            return
        st.num_decode_launches += 1
        st.num_decode_steps += num_steps
        if st.num_decode_steps // DECODE_LOG_INTERVAL > (st.num_decode_steps - num_steps) // (
            DECODE_LOG_INTERVAL
        ):
            now, made = time.perf_counter(), st.generation_tokens
            rate = (made - self._last_log[1]) / max(now - self._last_log[0], 1e-9)
            self._last_log = (now, made)
            tokens = sum(r.kv_len for r in sched.running)
            logger.info(
                "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
                "gen throughput (token/s): %.2f, #queue-req: %d",
                len(batch.reqs),
                tokens,
                usage,
                rate,
                len(sched.waiting),
            )

    def grammars(self) -> GrammarBackend:
        """The grammar compiler for this model's tokenizer (built on first use, any thread)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.options.grammar_backend == "none":
                    raise ValueError("constrained decoding is off (grammar backend 'none')")
                if self.tokenizer is None:
                    raise ValueError("constrained decoding needs the model's tokenizer")
                vocab = self.loaded.config.vocab_size
                self._grammars = GrammarBackend(self.tokenizer.hf, self.eos_ids, vocab)
            return self._grammars

    def _row_state(self, req: Request, ahead: int = 0, sampled: bool = True) -> RowState:
        # A grammar's mask only matters where the step samples (not mid-prompt chunks).
        mask = req.grammar.allowed_mask() if req.grammar is not None and sampled else None
        return RowState(
            allowed_words=mask,
            params=req.params,
            seed=req.seed,
            num_output_tokens=len(req.output_ids) + ahead,
            output_counts=collections.Counter(req.output_ids) if req.penalized else {},
            prompt_ids=req.prompt_ids,
        )

    def _targets(self, req: Request, chunk) -> list[int]:
        start = chunk.prefix_len + 1
        nxt = req.tokens[start : start + len(chunk.tokens)]
        return nxt + [0] * (len(chunk.tokens) - len(nxt))

    def _finish(self, req: Request) -> None:
        if req.status is not Status.FINISHED:
            req.status = Status.FINISHED
            self.scheduler.remove(req)
            self.stats.num_requests += 1
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.cached_tokens += req.num_cached_tokens
            counts = self.stats.namespaces[req.namespace]
            counts[0] += len(req.prompt_ids)
            counts[1] += req.num_cached_tokens
            self.stats.num_aborted += req.finish_reason.get("type") == "abort"
        emit(self, req, finished=True)
        self._requests.pop(req.rid, None)
        self.outputs.pop(id(req), None)

    def _fail_running(self, message: str) -> None:
        self._inflight = None
        for req in list(self.scheduler.running):
            self.outputs[id(req)].abort(message)
            self._finish(req)

    def run_on_engine_thread(self, fn) -> None:
        """Run `fn()` between steps (flush, integrity checks); fire and forget."""
        self._inbox.put(("call", fn))

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def metrics(self) -> dict[str, float]:
        """A snapshot of the counters (read from any thread; each value is a plain number)."""
        sched, kv, st = self.scheduler, self.scheduler.kv, self.stats
        used_pages = kv.num_usable_pages - kv.allocator.num_free - kv.cache.num_evictable_pages
        return {
            "num_running_reqs": len(sched.running),
            "num_queue_reqs": len(sched.waiting),
            "num_used_tokens": used_pages * kv.page_size,
            "token_usage": used_pages / kv.num_usable_pages,
            "num_cached_pages": kv.cache.num_cached_pages,
            "cache_hit_rate": st.cache_hit_rate,
            "prompt_tokens_total": st.prompt_tokens,
            "cached_tokens_total": st.cached_tokens,
            "generation_tokens_total": st.generation_tokens,
            "num_requests_total": st.num_requests,
            "num_aborted_total": st.num_aborted,
            "num_retractions_total": sched.num_retractions,
            "num_evicted_pages_total": kv.num_evicted_pages,
            "jump_forward_tokens_total": st.jump_forward_tokens,
            "mixed_decode_tokens_total": st.mixed_decode_tokens,
            "extend_steps_total": st.num_extend_steps,
            "extend_tokens_total": st.extend_tokens,
            "extend_seconds_total": st.seconds["extend"],
            "decode_launches_total": st.num_decode_launches,
            "decode_steps_total": st.num_decode_steps,
            "decode_seconds_total": st.seconds["decode"],
            "step_compiles_total": self.runner.num_runtime_compiles,
            "step_compile_seconds_total": self.runner.runtime_compile_seconds,
            **self._grammar_metrics(),
        }

    def namespace_metrics(self) -> dict[str, tuple[int, int]]:
        """Per namespace: (prompt tokens, cached prompt tokens) of its finished requests."""
        return {ns: (p, c) for ns, (p, c) in list(self.stats.namespaces.items())}

    def _grammar_metrics(self) -> dict[str, float]:
        g = self._grammars
        return {
            "grammar_compiled_total": g.num_compiled if g else 0,
            "grammar_cache_hits_total": g.num_cache_hits if g else 0,
            "grammar_compile_seconds_total": sum(g.compile_seconds) if g else 0.0,
            "num_grammar_waiting_reqs": g.num_compiling if g else 0,
        }


def _live(batch: ScheduledBatch) -> list[int]:
    """Rows of `batch` whose requests are still where the batch left them: running, their KV
    ending where the chunk began (not finished, aborted or retracted since)."""
    return [
        i
        for i, (r, c) in enumerate(zip(batch.reqs, batch.chunks, strict=True))
        if r.status is Status.RUNNING and r.kv_len == c.prefix_len
    ]


def _subset(batch: ScheduledBatch, rows: list[int]) -> ScheduledBatch:
    assert batch.kind == "decode"  # only lookahead steps outlive a request
    pick = lambda xs: [xs[i] for i in rows]
    return ScheduledBatch(batch.kind, pick(batch.reqs), pick(batch.chunks), pick(batch.sample))


def _live_rows(
    batch: ScheduledBatch, keep: list[int], result: StepResult
) -> tuple[ScheduledBatch, StepResult]:
    """`batch` and `result` with only the rows `keep` (see `_live`)."""
    if len(keep) == len(batch.reqs):
        return batch, result
    rows = np.asarray(keep, np.int64)
    live = _subset(batch, keep)
    assert result.target_logprobs is None  # only lookahead steps outlive a request: decodes
    return live, dataclasses.replace(
        result,
        tokens=result.tokens[rows],
        logprobs=result.logprobs[rows],
        top_logprobs=result.top_logprobs[rows],
        top_ids=result.top_ids[rows],
    )
