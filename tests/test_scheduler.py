"""Scheduler + KV manager driven like the engine drives them, with a fake model and no weights.

The fake model is honest about the KV cache: for each chunk it reads the prefix tokens back from
a simulated pool through the chunk's pages, writes the new tokens into their slots, and samples
`next_token(context)`, a hash of the namespace and the whole token history. So every request's
output is fixed by its prompt alone (`reference_output`), whatever the batching, chunking,
caching or retraction, and any page bookkeeping error (a stale, shared or missing page, a page
of another namespace, a recompute that loses or repeats a token) shows up as a wrong context or
a wrong output.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.request import Request, Status
from jaxsgl.engine.scheduler import CACHE_AWARE_MAX_WAITING, ScheduledBatch, Scheduler
from jaxsgl.sampling_params import SamplingParams

VOCAB = 8  # small, so generated continuations also share prefixes
CONTEXT_LENGTH = 1 << 20  # requests stop on max_new_tokens only


def next_token(context: list[int], namespace: str = "") -> int:
    return zlib.crc32(namespace.encode() + np.asarray(context, np.int64).tobytes()) % VOCAB


def reference_output(req: Request) -> list[int]:
    """What the request generates when its KV is always right: its full max_new_tokens."""
    tokens = list(req.prompt_ids)
    for _ in range(req.params.max_new_tokens):
        tokens.append(next_token(tokens, req.namespace))
    return tokens[len(req.prompt_ids) :]


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class FakeModel:
    """A KV pool of token ids: slot page * G + offset holds the token whose K/V it would hold,
    and the namespace that computed it (K/V differ across namespaces, e.g. LoRA adapters)."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.pool = np.full(num_pages * page_size, -1, np.int64)
        self.pool_ns = np.full(num_pages * page_size, -1, np.int64)
        self.ns_ids: dict[str, int] = {}

    def slots(self, pages, start: int, stop: int) -> np.ndarray:
        pos = np.arange(start, stop)
        return np.asarray(pages, np.int64)[pos // self.page_size] * self.page_size + (
            pos % self.page_size
        )

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """The sampled token of each row (None where the batch does not sample)."""
        written: set[int] = set()
        sampled: list[int | None] = []
        for req, chunk, sample in zip(batch.reqs, batch.chunks, batch.sample, strict=True):
            ns = self.ns_ids.setdefault(req.namespace, len(self.ns_ids))
            end = chunk.prefix_len + len(chunk.tokens)
            read = self.slots(chunk.pages, 0, chunk.prefix_len)
            prefix = self.pool[read].tolist()
            assert prefix == req.tokens[: chunk.prefix_len], (
                f"{req.rid}: its pages {list(chunk.pages)} hold {prefix}, "
                f"not its first {chunk.prefix_len} tokens {req.tokens[: chunk.prefix_len]}"
            )
            assert (self.pool_ns[read] == ns).all(), f"{req.rid} reads another namespace's KV"
            write = self.slots(chunk.pages, chunk.prefix_len, end)
            assert written.isdisjoint(write.tolist()), f"{req.rid} writes a slot twice in a step"
            written.update(write.tolist())
            self.pool[write], self.pool_ns[write] = chunk.tokens, ns
            context = prefix + list(chunk.tokens)
            sampled.append(next_token(context, req.namespace) if sample else None)
        return sampled


class Sim:
    """A Scheduler, the fake model and the engine's bookkeeping; invariants checked each step."""

    def __init__(self, num_pages: int, **options):
        self.options = EngineOptions(**options)
        self.scheduler = Scheduler(self.options, num_pages, CONTEXT_LENGTH)
        self.model = FakeModel(num_pages, self.options.page_size)
        self.now = 0.0
        self.reqs: list[Request] = []
        self.batches: list[ScheduledBatch] = []
        # Per request: prompt positions whose logprob some step's logits gave.
        self.scored: dict[int, set[int]] = {}

    def add(
        self,
        prompt: list[int],
        max_new_tokens: int,
        namespace: str = "",
        arrival_time: float | None = None,
        logprob_start_len: int = -1,
    ) -> Request:
        self.now += 1e-6  # distinct arrival times: fcfs order is add order
        req = Request(
            f"r{len(self.reqs)}",
            list(prompt),
            SamplingParams(max_new_tokens=max_new_tokens),
            namespace=namespace,
            return_logprob=logprob_start_len >= 0,
            logprob_start_len=logprob_start_len,
            arrival_time=self.now if arrival_time is None else arrival_time,
        )
        self.scheduler.add(req)
        self.reqs.append(req)
        return req

    def abort(self, req: Request) -> None:
        """As the engine's abort: finish reason, FINISHED, out of the scheduler."""
        req.finish_reason = {"type": "abort", "message": "aborted by the test"}
        req.status = Status.FINISHED
        self.scheduler.remove(req)
        self.check()

    def step(self) -> ScheduledBatch | None:
        batch = self.scheduler.schedule(self.now)
        self.now += 1e-3
        if batch is not None:
            self.check_batch(batch)
            self.record(batch, self.model.run(batch))
            self.batches.append(batch)
        self.check()
        return batch

    def record(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """The engine's `record_step` and `_finish`, minus logprobs and text."""
        for req, chunk, token in zip(batch.reqs, batch.chunks, sampled, strict=True):
            if chunk.all_logits:  # row j predicts token prefix_len + j + 1
                end = min(chunk.prefix_len + len(chunk.tokens) + 1, len(req.prompt_ids))
                self.scored.setdefault(id(req), set()).update(range(chunk.prefix_len + 1, end))
            req.kv_len += len(chunk.tokens)
            if token is None:
                continue
            req.output_ids.append(token)
            n = len(req.output_ids)
            if n >= req.params.max_new_tokens or req.num_tokens >= CONTEXT_LENGTH:
                req.finish_reason = {"type": "length", "length": n}
        if batch.kind == "extend":
            for req in batch.reqs:
                if req.finish_reason is None:
                    self.scheduler.kv.cache_computed(req)
        for req in batch.reqs:
            if req.finish_reason is not None:
                req.status = Status.FINISHED
                self.scheduler.remove(req)

    def check_batch(self, batch: ScheduledBatch) -> None:
        s, page_size = self.scheduler, self.options.page_size
        assert batch.kind in ("extend", "decode")
        assert len(batch.reqs) == len(batch.chunks) == len(batch.sample) > 0
        assert len({id(r) for r in batch.reqs}) == len(batch.reqs), "a request twice in a batch"
        for req, chunk, sample in zip(batch.reqs, batch.chunks, batch.sample, strict=True):
            n = len(chunk.tokens)
            assert req.status is Status.RUNNING and any(r is req for r in s.running), req.rid
            assert n >= 1 and chunk.prefix_len == req.kv_len, (req.rid, n, chunk.prefix_len)
            assert list(chunk.tokens) == req.tokens[req.kv_len : req.kv_len + n], req.rid
            assert len(chunk.pages) * page_size >= chunk.prefix_len + n, (req.rid, chunk)
            assert list(chunk.pages) == req.pages, req.rid
            # New K/V goes to the request's own pages, never into shared cached ones.
            assert chunk.prefix_len // page_size >= req.num_tree_pages, (req.rid, chunk)
            assert sample == (chunk.prefix_len + n == req.num_tokens), (req.rid, chunk)
            assert chunk.all_logits == (batch.kind == "extend" and req.wants_prompt_logprobs())
        if batch.kind == "decode":
            for req, chunk in zip(batch.reqs, batch.chunks, strict=True):
                assert len(chunk.tokens) == 1 and chunk.prefix_len == req.num_tokens - 1, req.rid
        else:
            total = sum(len(c.tokens) for c in batch.chunks)
            alone = self.options.chunked_prefill_size == -1 and len(batch.reqs) == 1
            assert total <= self.options.chunk_tokens or alone, (total, self.options)

    def check(self) -> None:
        s = self.scheduler
        s.check_integrity()
        assert len(s.running) <= self.options.max_running_requests
        for req in [*s.running, *s.waiting]:
            assert not req.finished and 0 <= req.kv_len <= req.num_tokens, req.rid
            assert len(req.output_ids) < req.params.max_new_tokens, req.rid
        kv = s.kv
        owned = sum(len(r.pages) - r.num_tree_pages for r in s.running)
        assert kv.allocator.num_free + kv.cache.num_cached_pages + owned == kv.num_usable_pages

    def run(self, max_steps: int = 10_000) -> None:
        """Step until every request finished; a step with nothing to run is a stall."""
        while self.scheduler.has_work:
            assert len(self.batches) < max_steps, f"livelock: {max_steps} steps"
            assert self.step() is not None, f"stalled with work queued: {self.describe()}"

    def describe(self) -> str:
        s = self.scheduler
        reqs = [
            (r.rid, r.status.value, r.num_tokens, r.kv_len, r.params.max_new_tokens)
            for r in [*s.running, *s.waiting]
        ]
        return (
            f"requests (rid, status, tokens, kv_len, max_new) {reqs}; "
            f"free {s.kv.allocator.num_free}, cached {s.kv.cache.num_cached_pages} "
            f"(evictable {s.kv.cache.num_evictable_pages}) of {s.kv.num_usable_pages} pages"
        )

    def check_done(self) -> None:
        """Everything finished with the reference output, and every page free or cached."""
        s, kv = self.scheduler, self.scheduler.kv
        assert not s.has_work
        for req in self.reqs:
            assert req.finished, req.rid
            expected = reference_output(req)
            if req.finish_reason["type"] == "abort":
                assert req.output_ids == expected[: len(req.output_ids)], req.rid
            else:
                assert req.output_ids == expected, (req.rid, req.num_retractions)
            if req.wants_prompt_logprobs() and req.finish_reason["type"] != "abort":
                # The cache may serve the prompt only up to logprob_start_len - 1.
                wanted = set(range(max(1, req.logprob_start_len), len(req.prompt_ids)))
                assert wanted <= self.scored.get(id(req), set()), (req.rid, req.logprob_start_len)
        assert kv.cache.num_locked_pages == 0
        for ns in {r.namespace for r in self.reqs}:
            assert kv.cache.match_prefix([], ns).node.lock_ref == 0, f"root of {ns!r} locked"
        assert kv.allocator.num_free + kv.cache.num_cached_pages == kv.num_usable_pages
        cached = kv.cache.num_cached_pages
        assert kv.flush() == cached
        assert kv.allocator.num_free == kv.num_usable_pages
        s.check_integrity()

    def outputs(self) -> dict[str, list[int]]:
        return {r.rid: r.output_ids for r in self.reqs}


# -- random workloads ---------------------------------------------------------------------------


class Spec(NamedTuple):
    prompt: list[int]
    max_new_tokens: int
    arrive: int  # the step before which it is added
    abort: int | None = None  # the step before which it is aborted (if still unfinished)
    namespace: str = ""
    logprob_start_len: int = -1  # >= 0: prompt logprobs from there on


@st.composite
def workloads(draw, aborts: bool = True) -> list[Spec]:
    """Requests over a few shared prefixes, so the radix cache has something to hit, in two
    namespaces, so it must also keep them apart."""
    tokens = st.integers(0, VOCAB - 1)
    prefixes = draw(st.lists(st.lists(tokens, max_size=40), min_size=1, max_size=3))
    reqs = []
    for _ in range(draw(st.integers(1, 12))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(tokens, min_size=1, max_size=12))
        arrive = draw(st.integers(0, 15))
        abort = None
        if aborts and draw(st.integers(0, 7)) == 0:
            abort = arrive + draw(st.integers(0, 20))
        namespace = draw(st.sampled_from(["", "", "lora"]))
        start = -1
        if draw(st.integers(0, 5)) == 0:
            start = draw(st.integers(0, len(prompt)))  # len(prompt): asks for none
        max_new = draw(st.integers(1, 16))
        reqs.append(Spec(prompt, max_new, arrive, abort, namespace, start))
    return reqs


@st.composite
def configs(draw):
    page_size = draw(st.sampled_from([1, 4, 16]))
    chunk = draw(st.sampled_from([-1, 8, 16, 32]))
    options = dict(
        page_size=page_size,
        chunked_prefill_size=chunk if chunk == -1 else max(chunk, page_size),
        max_prefill_tokens=draw(st.sampled_from([16384, 24])),
        max_running_requests=draw(st.integers(1, 6)),
        schedule_policy=draw(st.sampled_from(["fcfs", "lpm", "dfs-weight"])),
        schedule_conservativeness=draw(st.sampled_from([0.02, 0.1, 0.3, 1.0, 2.0])),
        disable_radix_cache=draw(st.booleans()),
    )
    return options, draw(st.integers(0, 48)) // page_size  # pool pages beyond the largest request


# Pages random pools keep beyond the largest request: none, so exact fits are exercised too
# (test_a_request_that_exactly_fits_the_pool_is_served covers them directly).
SPARE = 0


def pool_pages(workload: list[Spec], page_size: int, slack: int) -> int:
    """Pages for the largest request, SPARE, `slack`, and the scratch page."""
    largest = max(pages_for(len(r.prompt) + r.max_new_tokens, page_size) for r in workload)
    return 1 + largest + SPARE + slack


def drive(sim: Sim, workload: list[Spec]) -> None:
    """Arrivals and aborts between steps, as the engine takes them from its inbox."""
    pending = sorted(workload, key=lambda r: r.arrive)
    added: list[tuple[Spec, Request]] = []
    max_steps = 500 + 20 * sum(len(r.prompt) + r.max_new_tokens for r in workload)
    t = 0
    while pending or sim.scheduler.has_work:
        while pending and pending[0].arrive <= t:
            spec = pending.pop(0)
            req = sim.add(
                spec.prompt,
                spec.max_new_tokens,
                spec.namespace,
                logprob_start_len=spec.logprob_start_len,
            )
            added.append((spec, req))
        for spec, req in added:
            if spec.abort == t and not req.finished:
                sim.abort(req)
        batch = sim.step()
        assert batch is not None or pending or not sim.scheduler.has_work, (
            f"stalled with work queued: {sim.describe()}"
        )
        t += 1
        assert t < max_steps, f"livelock: {max_steps} steps, {sim.describe()}"


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), configs())
def test_random_workloads_finish_with_reference_outputs(workload, config):
    options, slack = config
    sim = Sim(pool_pages(workload, options["page_size"], slack), **options)
    drive(sim, workload)
    s = sim.scheduler
    event(f"retractions: {min(s.num_retractions, 3)}")
    event(f"evicted pages: {s.kv.num_evicted_pages > 0}")
    if not options["disable_radix_cache"]:
        event(f"radix hits: {sum(r.num_cached_tokens for r in sim.reqs) > 0}")
    event(f"aborted: {sum(r.finish_reason['type'] == 'abort' for r in sim.reqs) > 0}")
    event(f"chunked: {any(b.kind == 'extend' and not all(b.sample) for b in sim.batches)}")
    sim.check_done()


TIGHT = dict(schedule_conservativeness=0.1)  # admits more than decodes can keep: retractions


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(aborts=False), st.sampled_from([1, 4, 16]))
def test_outputs_are_the_same_in_every_configuration(workload, page_size):
    outputs = []
    for radix in (True, False):
        for chunk in (-1, 16):
            for slack, extra in ((0, TIGHT), (40, {})):
                sim = Sim(
                    pool_pages(workload, page_size, slack),
                    page_size=page_size,
                    disable_radix_cache=not radix,
                    chunked_prefill_size=max(chunk, page_size) if chunk != -1 else -1,
                    **extra,
                )
                drive(sim, workload)
                sim.check_done()
                outputs.append(sim.outputs())
    assert all(o == outputs[0] for o in outputs)


def shared_prefix_workload(n: int = 12) -> list[Spec]:
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, VOCAB, 37).tolist(), rng.integers(0, VOCAB, 21).tolist()]
    return [
        Spec(prefixes[i % 2] + rng.integers(0, VOCAB, 3 + i).tolist(), 6 + i % 5, i // 3)
        for i in range(n)
    ]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_outputs_match_with_and_without_cache_chunking_and_retraction(page_size):
    workload = shared_prefix_workload()
    runs = {}
    for radix in (True, False):
        for chunk in (-1, 16):
            for tight in (True, False):
                # tight: a few requests at a time; else room for all of them
                slack = (16 if tight else 1024) // page_size
                sim = Sim(
                    pool_pages(workload, page_size, slack),
                    page_size=page_size,
                    disable_radix_cache=not radix,
                    chunked_prefill_size=max(chunk, page_size) if chunk != -1 else -1,
                    **(TIGHT if tight else {}),
                )
                drive(sim, workload)
                sim.check_done()
                runs[radix, chunk, tight] = sim
    for (radix, chunk, tight), sim in runs.items():
        assert sim.outputs() == runs[True, -1, False].outputs()
        assert (sim.scheduler.num_retractions > 0) == tight, (radix, chunk, tight)
        cached = sum(r.num_cached_tokens for r in sim.reqs)
        assert (cached > 0) == radix, (radix, chunk, tight, cached)


# -- targeted scenarios -------------------------------------------------------------------------


def test_retraction_takes_the_request_with_the_fewest_tokens_and_recomputes_it():
    # Admission reserves almost nothing, so three decoding requests outgrow 24 one-token pages.
    sim = Sim(25, page_size=1, schedule_conservativeness=0.01)
    a = sim.add([1, 2, 3, 4], 12)
    for _ in range(5):
        sim.step()
    b = sim.add([5, 6, 7, 8], 12)
    for _ in range(3):
        sim.step()
    c = sim.add([1, 2, 3, 5], 12)
    victims = []
    while sim.scheduler.has_work:
        decoding = [r for r in sim.scheduler.running if not r.prefilling]
        before = {r.rid: (len(r.output_ids), r.num_retractions) for r in decoding}
        sim.step()
        retracted = [r for r in decoding if r.num_retractions > before[r.rid][1]]
        survivors = [r for r in decoding if r not in retracted]
        for v in retracted:
            assert all(before[v.rid][0] <= before[r.rid][0] for r in survivors), (v.rid, before)
        victims += [v.rid for v in retracted]
    assert sim.scheduler.num_retractions > 0
    assert victims[0] == c.rid and len(c.output_ids) == 12, victims
    assert a.num_retractions == 0
    sim.check_done()  # c's recompute produced exactly its reference output
    assert b.finished


def test_add_refuses_a_request_the_pool_can_never_hold():
    sim = Sim(5, page_size=4)  # 4 usable pages: 16 tokens
    sim.add(list(range(10)), 6)  # exactly 16: accepted
    with pytest.raises(ValueError, match=r"r\d+: 10 prompt \+ 7 new tokens need 5 pages.*KV pool"):
        sim.add(list(range(10)), 7)
    with pytest.raises(ValueError, match=r"the KV pool holds 4"):
        sim.add(list(range(20)), 1)
    assert len(sim.scheduler.waiting) == 1


@pytest.mark.parametrize(
    "page_size,prompt_len,max_new", [(4, 5, 3), (16, 17, 15), (16, 2040, 8), (1, 5, 3)]
)
def test_a_request_that_exactly_fits_the_pool_is_served(page_size, prompt_len, max_new):
    # `add` accepts prompt + max_new_tokens == the pool (e.g. 2040 + 8 in a 2048-token pool);
    # admission must then run it once the pool is empty, or the engine loops on None forever.
    sim = Sim(1 + pages_for(prompt_len + max_new, page_size), page_size=page_size)
    sim.add(list(range(prompt_len)), max_new)
    sim.run()
    sim.check_done()


def _cache(sim: Sim, prompt: list[int]) -> None:
    sim.add(prompt, 1)
    sim.run()


@pytest.mark.parametrize("policy,expected", [("lpm", ["c", "b", "a"]), ("fcfs", ["a", "b", "c"])])
def test_lpm_prefers_the_longest_cached_prefix_and_fcfs_the_arrival(policy, expected):
    sim = Sim(64, page_size=4, schedule_policy=policy)
    hot = list(range(100, 116))
    _cache(sim, hot + [1])
    reqs = {
        "a": sim.add(list(range(200, 220)), 2),  # nothing cached
        "b": sim.add(hot[:8] + list(range(300, 312)), 2),  # 8 tokens cached
        "c": sim.add(hot + list(range(400, 404)), 2),  # 16 tokens cached
    }
    names = {id(r): k for k, r in reqs.items()}
    batch = sim.step()
    assert batch.kind == "extend" and [names[id(r)] for r in batch.reqs] == expected
    assert [reqs[k].num_cached_tokens for k in "abc"] == [0, 8, 16]
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("waiting", [2, CACHE_AWARE_MAX_WAITING, CACHE_AWARE_MAX_WAITING + 1])
def test_lpm_over_a_long_queue_admits_in_arrival_order(waiting):
    """A queue longer than CACHE_AWARE_MAX_WAITING is taken fcfs (matching every waiting prompt
    each step costs too much there); at the limit lpm still orders it."""
    sim = Sim(4096, page_size=4, schedule_policy="lpm", chunked_prefill_size=40)
    hot = list(range(100, 116))
    _cache(sim, hot + [1])
    cold = sim.add(list(range(200, 220)), 2)
    hit = sim.add(hot + list(range(400, 404)), 2)
    for i in range(waiting - 2):
        sim.add([500 + i % 7, 600 + i, 1], 2)
    assert len(sim.scheduler.waiting) == waiting
    batch = sim.step()
    first = cold if waiting > CACHE_AWARE_MAX_WAITING else hit
    assert batch.kind == "extend" and batch.reqs[0] is first
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("policy,expected", [("dfs-weight", "xxxyy"), ("fcfs", "xyxyx")])
def test_dfs_weight_groups_requests_that_share_a_prefix(policy, expected):
    sim = Sim(64, page_size=4, schedule_policy=policy)
    p, q = list(range(100, 108)), list(range(200, 208))
    _cache(sim, p + [1])
    _cache(sim, q + [1])
    names = {}
    for i, group in enumerate("xyxyx"):
        req = sim.add((p if group == "x" else q) + list(range(300 + 4 * i, 304 + 4 * i)), 2)
        names[id(req)] = group
    batch = sim.step()
    assert batch.kind == "extend" and len(batch.reqs) == 5
    assert "".join(names[id(r)] for r in batch.reqs) == expected
    assert all(sim.reqs[i].num_cached_tokens == 8 for i in range(2, 7))
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("radix", [True, False])
def test_requests_sharing_an_uncached_prefix_wait_for_the_first_to_compute_it(radix):
    sim = Sim(64, page_size=16, disable_radix_cache=not radix)
    prefix = list(range(1000, 1064))
    reqs = [sim.add(prefix + [i, i + 1, i + 2, i + 3, i + 4], 3) for i in range(4)]
    other = sim.add(prefix + [9, 9, 9, 9, 9], 3, namespace="lora")  # shares no KV with them
    first = sim.step()
    if radix:
        assert first.reqs == [reqs[0], other] and len(sim.scheduler.waiting) == 3
        second = sim.step()
        assert second.kind == "extend" and second.reqs == reqs[1:]
        assert all(r.num_cached_tokens >= 48 for r in reqs[1:]), [r.num_cached_tokens for r in reqs]
        assert all(len(c.tokens) == 5 for c in second.chunks)
    else:  # nothing to share: all start at once
        assert first.reqs == [*reqs, other]
    sim.run()
    sim.check_done()


def test_an_admission_that_evicts_a_matched_prefix_makes_the_later_request_match_again():
    sim = Sim(13, page_size=4)  # 12 usable pages
    _cache(sim, [1, 2, 3, 4, 9])  # x: 1 page
    y = list(range(50, 74))
    _cache(sim, y + [9])  # y: 6 pages; 5 pages free
    a = sim.add(list(range(100, 124)), 1)  # 6 pages: evicts the least recently used, x
    b = sim.add([1, 2, 3, 4, 5], 1)  # matched x (which touches it) ...
    c = sim.add(y + [7], 1)  # ... before c matched y, so x is the older one
    batch = sim.step()
    # b's match was evicted under it: it matched again (nothing) and took y's pages instead.
    assert batch.reqs == [a, b] and b.num_cached_tokens == 0
    assert sim.scheduler.kv.num_evicted_pages == 7
    sim.run()
    assert c.num_cached_tokens == 0
    sim.check_done()


def test_admission_counts_the_matched_prefix_as_no_longer_evictable():
    sim = Sim(11, page_size=4, schedule_conservativeness=0.01)  # 10 pages, ~no reservation
    x = list(range(10, 18))
    _cache(sim, x + [9])  # x: 2 evictable pages
    a = sim.add(list(range(100, 120)), 12)
    sim.step()
    sim.step()  # a decodes in 6 pages: 2 free
    b = sim.add(x + list(range(200, 212)), 1)
    # b needs 3 pages past x: 2 free + x's 2 evictable would do, but admitting b locks x.
    batch = sim.step()
    assert batch.kind == "decode" and batch.reqs == [a] and b.status is Status.WAITING
    sim.run()
    assert b.num_cached_tokens == 8
    sim.check_done()


def test_max_running_requests_caps_the_batch():
    sim = Sim(512, page_size=4, max_running_requests=3)
    for i in range(20):
        sim.add([i, i + 1, i + 2], 4)
    peak = 0
    while sim.scheduler.has_work:
        assert sim.step() is not None
        peak = max(peak, len(sim.scheduler.running))
        assert all(len(b.reqs) <= 3 for b in sim.batches)
    assert peak == 3
    sim.check_done()


def test_schedule_constraint_holds_a_prefill_inside_the_window():
    sim = Sim(64, page_size=4, schedule_constraint_ms=50)
    req = sim.add([1, 2, 3, 4, 5], 2, arrival_time=100.0)
    assert sim.scheduler.schedule(now=100.010) is None  # arrived 10 ms ago: wait for company
    batch = sim.scheduler.schedule(now=100.060)  # arrived 60 ms ago: go
    assert batch is not None and batch.kind == "extend" and batch.reqs == [req]


def test_chunked_prefill_takes_chunks_and_samples_after_the_last():
    sim = Sim(64, page_size=4, chunked_prefill_size=32)
    req = sim.add([t % VOCAB for t in range(100)], 3)
    sim.run()
    extends = [b for b in sim.batches if b.kind == "extend"]
    assert [len(b.chunks[0].tokens) for b in extends] == [32, 32, 32, 4]
    assert [b.chunks[0].prefix_len for b in extends] == [0, 32, 64, 96]
    assert [b.sample for b in extends] == [[False], [False], [False], [True]]
    assert [b.kind for b in sim.batches[4:]] == ["decode", "decode"]
    assert req.output_ids == reference_output(req)
    sim.check_done()


def test_namespaces_share_no_cached_prefix():
    sim = Sim(64, page_size=4)
    prompt = list(range(100, 117))
    _cache(sim, prompt)
    other = sim.add(prompt, 2, namespace="lora")
    same = sim.add(prompt, 2)
    sim.run()
    assert (other.num_cached_tokens, same.num_cached_tokens) == (0, 16)
    assert other.output_ids != same.output_ids  # the fake model's outputs depend on it too
    sim.check_done()


def test_namespace_max_running_caps_one_namespace_and_lets_others_run():
    sim = Sim(512, page_size=4, namespace_max_running=(("finance", 2),))
    for i in range(6):
        sim.add([i, i + 1, i + 2], 4, namespace="finance")
    for i in range(4):
        sim.add([i, i + 3, i + 5], 4)
    peaks = {"finance": 0, "": 0}
    while sim.scheduler.has_work:
        assert sim.step() is not None
        for ns in peaks:
            running = sum(r.namespace == ns for r in sim.scheduler.running)
            peaks[ns] = max(peaks[ns], running)
    assert peaks == {"finance": 2, "": 4}  # the others were not held up behind finance
    sim.check_done()


def test_namespace_max_running_rejects_bad_limits():
    with pytest.raises(ValueError, match="finance"):
        EngineOptions(namespace_max_running=(("finance", 0),))
    with pytest.raises(ValueError, match="not \\(str, int\\)"):
        EngineOptions(namespace_max_running=(("finance", "2"),))


def test_add_refuses_a_request_that_only_fits_in_pinned_pages():
    sim = Sim(9, page_size=4)  # eight usable pages (page 0 is never handed out)
    system = list(range(1, 17))  # four pages
    _cache(sim, system)
    assert sim.scheduler.kv.cache.pin(system) == 16
    with pytest.raises(ValueError, match="4 of them pinned"):
        sim.add([7] * 17, 3)  # five pages: four are free of pins
    sim.add([7] * 13, 3)  # four pages fit beside the pin
    sim.run()
    sim.scheduler.kv.cache.unpin(system)
    sim.check_done()
