"""Continuous batching: which requests run in the next step, and with which tokens.

Each step is either an extend (new tokens of one or more requests after their cached prefix:
prompts, prompt chunks, recomputes after retraction) or a decode (one token for every running
request whose prompt is done). Extends go first whenever a request can be admitted, so new
arrivals start quickly; chunking keeps any one extend to `chunk_tokens`. With
`enable_mixed_chunk` an extend also carries one token of every decoding request (a one-token
run over its prefix, the last rows of the batch), so decodes go on while prompts are computed.

Memory: admission keeps `new_token_ratio` of each running request's remaining output reserved,
so decodes rarely run dry; when they do, the request with the fewest generated tokens is
retracted (its computed pages go to the cache, it waits and is recomputed later).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque

from jaxsgl.engine.kv_manager import KVManager
from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.policy import order_waiting
from jaxsgl.engine.request import Request, Status
from jaxsgl.model.forward_batch import SeqChunk

logger = logging.getLogger(__name__)

CACHE_AWARE_MAX_WAITING = 128  # longer queues are admitted fcfs (see `_admit`)


@dataclasses.dataclass
class ScheduledBatch:
    kind: str  # "extend" | "decode"
    reqs: list[Request]
    chunks: list[SeqChunk]
    sample: list[bool]  # the chunk reaches the request's last token: a new token is sampled
    num_steps: int = 1  # decode steps run in one launch (`--num-continuous-decode-steps`)
    num_mixed: int = 0  # an extend's last rows that are decodes riding along (mixed chunk)


class Scheduler:
    def __init__(self, options: EngineOptions, num_pages: int, context_length: int):
        self.options = options
        self.context_length = context_length
        self.kv = KVManager(num_pages, options.page_size, options.disable_radix_cache)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        base = min(1.0, 0.7 * options.schedule_conservativeness)
        self.min_new_token_ratio = min(base, 0.15 * options.schedule_conservativeness)
        self.new_token_ratio = base
        self.num_retractions = 0
        self.namespace_limits = dict(options.namespace_max_running)

    # -- queue ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        need = self.kv.pages_for(req.num_tokens + req.params.max_new_tokens)
        pinned = self.kv.cache.num_pinned_pages  # never evicted: a request must fit beside them
        if need > self.kv.num_usable_pages - pinned:
            raise ValueError(
                f"request {req.rid}: {req.num_tokens} prompt + {req.params.max_new_tokens} new "
                f"tokens need {need} pages, but the KV pool holds {self.kv.num_usable_pages}"
                + (f", {pinned} of them pinned" if pinned else "")
            )
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and release everything it holds."""
        if req in self.running:
            self.running.remove(req)
            self.kv.release(req, keep=req.status is Status.FINISHED)
        elif req in self.waiting:
            self.waiting.remove(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- batch formation -------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> ScheduledBatch | None:
        batch = self._schedule_extend(time.perf_counter() if now is None else now)
        batch = batch if batch is not None else self._schedule_decode()
        if batch is None and any(r.prefilling for r in self.running):
            # Chunked prefills starved of pages and nothing decoding: free one and go on.
            self._retract(min(self.running, key=lambda r: (len(r.output_ids), -r.arrival_time)))
            return self.schedule(now)
        return batch

    def _window_open(self, now: float) -> bool:
        """The batching window: hold a prefill while the oldest arrival is younger than it."""
        window = self.options.schedule_constraint_ms / 1000
        if window <= 0 or not self.waiting:
            return False
        oldest = min(r.arrival_time for r in self.waiting)
        return now - oldest < window and len(self.running) + len(self.waiting) < (
            self.options.max_running_requests
        )

    def _schedule_extend(self, now: float) -> ScheduledBatch | None:
        budget = self.options.chunk_tokens
        decoding = self._decodes_to_mix()
        budget -= len(decoding)  # their tokens share the step's token budget
        batch = ScheduledBatch("extend", [], [], [])
        for req in self.running:  # unfinished chunked prefills continue first
            if req.prefilling and budget > 0:
                budget -= self._add_extend(batch, req, budget)
        if not self._window_open(now):
            self._admit(batch, budget)
        if not batch.reqs:
            return None
        for req in decoding:  # last, as one-token runs over their prefixes
            batch.reqs.append(req)
            batch.chunks.append(SeqChunk(req.tokens[-1:], req.kv_len, list(req.pages)))
            batch.sample.append(True)
        batch.num_mixed = len(decoding)
        return batch

    def _decodes_to_mix(self) -> list[Request]:
        """The decoding requests an extend carries with `enable_mixed_chunk`: all of them, with
        the page for each one's token reserved; none when they would take more than half the
        step's tokens (prompts must still advance) or a page is short (the decode step then
        retracts as usual)."""
        prompts = self.waiting or any(r.prefilling for r in self.running)
        if not self.options.enable_mixed_chunk or not prompts:
            return []
        decoding = self._decoding()
        if len(decoding) > self.options.chunk_tokens // 2:
            return []
        if not all(self.kv.reserve(r, r.kv_len + 1) for r in decoding):
            return []
        return decoding

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        # Cache-aware orders need every waiting request's match; fcfs matches only the ones it
        # reaches. Matching hundreds of long prompts costs milliseconds a step, so past
        # CACHE_AWARE_MAX_WAITING waiting requests the queue is taken in arrival order.
        policy = self.options.schedule_policy
        if len(self.waiting) > CACHE_AWARE_MAX_WAITING:
            policy = "fcfs"
        matches = {}
        if policy != "fcfs":
            matches = {id(r): self.kv.match(r, self._match_limit(r)) for r in self.waiting}
        reserved = self._decode_reservation()
        started: set[tuple] = set()
        per_namespace = Counter(r.namespace for r in self.running)
        for req in order_waiting(policy, list(self.waiting), matches):
            if budget <= 0 or len(self.running) >= self.options.max_running_requests:
                break
            cap = self.namespace_limits.get(req.namespace)
            if cap is not None and per_namespace[req.namespace] >= cap:
                continue  # its namespace is at its limit; other namespaces may still start
            match = matches.get(id(req))
            if match is None or match.node.removed:  # not matched yet, or evicted since
                match = self.kv.match(req, self._match_limit(req))
            # A prefix another request of this step is computing: wait one step, then hit it.
            first_page = req.tokens[match.num_tokens : match.num_tokens + self.kv.page_size]
            key = (req.namespace, id(match.node), tuple(first_page))
            if not self.kv.cache.disable and len(first_page) == self.kv.page_size:
                if key in started:
                    continue
                started.add(key)
            take = min(req.num_tokens - match.num_tokens, budget)
            if take < req.num_tokens - match.num_tokens and self.options.chunked_prefill_size == -1:
                if batch.reqs:
                    break  # unchunked prompts run alone when they exceed the budget
                take = req.num_tokens - match.num_tokens
            need = self.kv.pages_for(req.num_tokens) - len(match.pages)  # the whole prompt
            future = self._future_pages(req)
            if need + future + reserved > self.kv.num_available_pages - self._locked_by(match):
                break  # keeps arrival order: nobody overtakes a request that does not fit
            self.waiting.remove(req)
            self.kv.attach_prefix(req, match)
            if not req.admitted_once:
                req.num_cached_tokens, req.admitted_once = match.num_tokens, True
            req.status = Status.RUNNING
            self.running.append(req)
            per_namespace[req.namespace] += 1
            budget -= self._add_extend(batch, req, take)
            reserved += future

    def _add_extend(self, batch: ScheduledBatch, req: Request, budget: int) -> int:
        take = min(req.num_tokens - req.kv_len, budget)
        if not self.kv.reserve(req, req.kv_len + take):
            return 0  # a later chunk that no longer fits: decodes or a retraction free pages
        tokens = req.tokens[req.kv_len : req.kv_len + take]
        batch.reqs.append(req)
        batch.chunks.append(
            SeqChunk(tokens, req.kv_len, list(req.pages), all_logits=req.wants_prompt_logprobs())
        )
        batch.sample.append(req.kv_len + take == req.num_tokens)
        return take

    def _decoding(self) -> list[Request]:
        return [r for r in self.running if not r.prefilling]

    def _schedule_decode(self) -> ScheduledBatch | None:
        reqs = self._decoding()
        while reqs:
            short = [r for r in reqs if not self.kv.reserve(r, r.kv_len + 1)]
            if not short:
                break
            victim = min(reqs, key=lambda r: (len(r.output_ids), -r.arrival_time))
            self._retract(victim)
            reqs.remove(victim)
        if not reqs:
            return None
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - 0.001)
        steps = self._decode_steps(reqs, ahead=0)
        chunks = [SeqChunk(r.tokens[-1:], r.kv_len, list(r.pages)) for r in reqs]
        return ScheduledBatch("decode", reqs, chunks, [True] * len(reqs), steps)

    def _decode_steps(self, reqs: list[Request], ahead: int) -> int:
        """How many decode steps the next launch for `reqs` runs, `ahead` tokens past what they
        recorded: `num_continuous_decode_steps` when every request stays inside the context for
        that many steps, needs no recorded state, and gets the pages; else 1. Only those two
        counts, so each batch shape compiles at most twice.

        A request that reaches `max_new_tokens` (or eos, or a stop) inside a launch finishes
        there and its later rows are dropped, so it does not shorten the launch: with hundreds
        of requests in flight one of them is nearly always within k tokens of its end."""
        k = self.options.num_continuous_decode_steps
        if k == 1:
            return 1
        for r in reqs:
            if r.num_tokens + ahead + k > self.context_length:
                return 1
            if not r.can_run_ahead() or r.params.min_new_tokens > len(r.output_ids):
                return 1
        # Every step's token writes its K/V: pages up to the last one (a stop inside the launch
        # wastes at most k - 1 slots, freed with the request).
        if all(self.kv.reserve(r, r.kv_len + ahead + k) for r in reqs):
            return k
        return 1

    def lookahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after `batch` for the same requests, formed before `batch`'s tokens
        are known (each chunk's token is a placeholder). None when that step might not be
        the next one: requests wait, or a request lacks a page for the extra token.

        A request that finishes in `batch` keeps a row in the lookahead step; the engine drops
        that row, and its extra KV slot, past the request's end, is never read.
        """
        if batch.kind != "decode" or self.waiting:
            return None
        if any(r.prefilling for r in self.running):
            return None
        ahead = batch.num_steps  # tokens `batch` adds to each request
        for req, chunk in zip(batch.reqs, batch.chunks, strict=True):
            if not self.kv.reserve(req, chunk.prefix_len + ahead + 1):
                return None
        steps = self._decode_steps(batch.reqs, ahead)
        chunks = [
            SeqChunk([0], c.prefix_len + ahead, list(r.pages))
            for r, c in zip(batch.reqs, batch.chunks, strict=True)
        ]
        return ScheduledBatch("decode", list(batch.reqs), chunks, [True] * len(batch.reqs), steps)

    def _retract(self, req: Request) -> None:
        logger.info("retracting %s after %d tokens: KV pool full", req.rid, len(req.output_ids))
        self.running.remove(req)
        self.kv.release(req, keep=True)
        req.status = Status.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)

    # -- memory accounting -------------------------------------------------------------------
    def _match_limit(self, req: Request) -> int:
        """At least one token must be computed (its logits give the next token), and prompt
        logprobs need logits from `logprob_start_len - 1` on."""
        limit = req.num_tokens - 1
        if req.wants_prompt_logprobs():
            limit = min(limit, max(0, req.logprob_start_len - 1))
        return limit

    def _future_pages(self, req: Request) -> int:
        """Pages the request's expected output adds beyond its current tokens. Rounded as one
        sum (not per part), so a request that `add` accepted always fits an empty pool."""
        remaining = req.params.max_new_tokens - len(req.output_ids)
        grown = req.num_tokens + int(remaining * self.new_token_ratio)
        return self.kv.pages_for(grown) - self.kv.pages_for(req.num_tokens)

    def _decode_reservation(self) -> int:
        return sum(self._future_pages(r) for r in self.running)

    def _locked_by(self, match) -> int:
        """Matched pages that are evictable now but locked once the request is attached."""
        node, n = match.node, 0
        while node is not None and node.parent is not None and node.lock_ref == 0:
            n += len(node.pages)
            node = node.parent
        return n

    def check_integrity(self) -> None:
        for req in self.waiting:
            assert not req.pages and req.last_node is None and req.kv_len == 0, req.rid
        for req in self.running:
            assert req.status is Status.RUNNING, req.rid
        running = Counter(r.namespace for r in self.running)
        for namespace, limit in self.namespace_limits.items():
            assert running[namespace] <= limit, (namespace, running[namespace], limit)
        self.kv.check_integrity(self.running)
