"""Engine behaviour on the real SmolLM2: prefix sharing, sampling, stops, aborts, limits."""

import time

import jax.numpy as jnp
import pytest
from engine_helpers import decode_during_prefill, small_generator

from jaxsgl.generator import Generator

PAGE = 16


@pytest.fixture(scope="module")
def gen():
    with Generator(
        dtype="float32",
        max_total_tokens=8192,
        max_running_requests=16,
        context_length=1024,
        warmup=False,
        progress=False,
    ) as g:
        yield g


@pytest.fixture(autouse=True)
def no_request_left_and_no_page_lost(request):
    yield
    if "gen" in request.fixturenames:
        g = request.getfixturevalue("gen")
        assert g.check_integrity() == {"running": 0, "waiting": 0}
        g.flush_cache()


GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


def _shared_prefix_prompts(gen, n):
    prefix = gen.tokenizer.encode(
        "Background: " + "The lighthouse keeper logged the weather. " * 40
    )[:200]
    assert len(prefix) == 200
    return [
        prefix + gen.tokenizer.encode(f" Question {i}: what did the keeper log?") for i in range(n)
    ]


def test_shared_prefix_is_computed_once(gen):
    prompts = _shared_prefix_prompts(gen, 6)
    outs = gen.generate(input_ids=prompts, sampling_params=GREEDY)
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    page_rounded = 200 // PAGE * PAGE
    assert sum(cached) >= 5 * page_rounded, cached
    gen.flush_cache()
    with Generator(
        dtype="float32",
        max_total_tokens=8192,
        context_length=1024,
        warmup=False,
        progress=False,
        disable_radix_cache=True,
    ) as plain:
        baseline = plain.generate(input_ids=prompts, sampling_params=GREEDY)
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in baseline)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in baseline]


def test_namespaces_never_share_cache(gen):
    prompt = _shared_prefix_prompts(gen, 1)[0]
    first = gen.generate(input_ids=prompt, sampling_params=GREEDY, namespace="finance")
    other = gen.generate(input_ids=prompt, sampling_params=GREEDY, namespace="legal")
    again = gen.generate(input_ids=prompt, sampling_params=GREEDY, namespace="finance")
    assert first["meta_info"]["cached_tokens"] == 0
    assert other["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] >= 200 // PAGE * PAGE
    assert first["output_ids"] == other["output_ids"] == again["output_ids"]


def test_seeded_sampling_reproduces_across_batches(gen):
    params = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 16, "sampling_seed": 1234}
    alone = gen.generate("Tell me about the sea.", params)
    crowd = gen.generate(
        ["Write a poem.", "Tell me about the sea.", "1, 2, 3,", "Hello"],
        [
            {"temperature": 1.0, "max_new_tokens": 20},
            params,
            GREEDY,
            {"temperature": 0.5, "top_k": 5, "max_new_tokens": 8},
        ],
    )
    assert crowd[1]["output_ids"] == alone["output_ids"]
    other_seed = gen.generate("Tell me about the sea.", {**params, "sampling_seed": 99})
    assert other_seed["output_ids"] != alone["output_ids"]


SCHEDULE_PROMPTS = ["Tell me about the sea.", "1, 2, 3,", "Hello", "Name a color:", "Count: a,"]
SCHEDULE_PARAMS = [
    {"temperature": 1.0, "max_new_tokens": 17, "sampling_seed": 5},
    {"temperature": 0.0, "max_new_tokens": 30, "stop": [", 9"]},
    {"temperature": 0.7, "top_k": 20, "max_new_tokens": 6, "sampling_seed": 8},
    {"temperature": 0.0, "max_new_tokens": 40},
    {"temperature": 0.0, "max_new_tokens": 10, "frequency_penalty": 0.5},
]


@pytest.mark.parametrize(("overlap", "steps"), [(False, 1), (True, 4), (False, 4)])
def test_schedules_change_no_output(gen, overlap, steps):
    """The module's engine (lookahead decode steps, the default) against step-by-step decoding
    and against four decode steps a launch, with and without lookahead: the same tokens and
    logprobs for seeded sampling, requests ending at different steps (mid-launch too) by
    length, eos and stop strings, and a penalized request (one step a launch while it runs)."""
    before = gen.engine.stats.num_lookahead_steps
    reference = gen.generate(SCHEDULE_PROMPTS, SCHEDULE_PARAMS, return_logprob=True)
    assert gen.engine.stats.num_lookahead_steps > before
    with small_generator(
        disable_overlap_schedule=not overlap, num_continuous_decode_steps=steps
    ) as other:
        got = other.generate(SCHEDULE_PROMPTS, SCHEDULE_PARAMS, return_logprob=True)
        st = other.engine.stats
        assert (st.num_lookahead_steps > 0) == overlap
        if steps > 1:
            assert st.num_decode_steps >= 2 * st.num_decode_launches > 0  # most launches ran 4
        assert other.check_integrity() == {"running": 0, "waiting": 0}
    for a, b in zip(reference, got, strict=True):
        assert a["output_ids"] == b["output_ids"]
        assert a["text"] == b["text"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        lp_a = [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_a_request_near_its_end_does_not_shorten_the_launch(gen):
    """Four steps a launch: a request with fewer tokens to go finishes inside a launch, and the
    others' launches stay four steps long. 39 decode tokens for the longer request, so 10
    launches; the same tokens as one step a launch."""
    prompts = ["1, 2, 3,", "Tell me about the sea."]
    params = [
        {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
        {"temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True},
    ]
    reference = gen.generate(prompts, params)
    for overlap in (False, True):
        with small_generator(
            num_continuous_decode_steps=4, disable_overlap_schedule=not overlap
        ) as other:
            got = other.generate(prompts, params)
            st = other.engine.stats
            assert (st.num_decode_launches, st.num_decode_steps) == (10, 40), overlap
            assert other.check_integrity() == {"running": 0, "waiting": 0}
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in reference]
        assert [len(o["output_ids"]) for o in got] == [6, 40]


def test_the_extend_step_size_left_unset_is_the_devices_default(gen):
    assert gen.options.chunked_prefill_size == 2048  # the CPU's, filled in by the engine
    assert gen.engine.scheduler.options.chunk_tokens == 2048


def test_an_8_bit_kv_cache_keeps_greedy_outputs(gen):
    """`kv_cache_dtype="fp8_e4m3"`: the pool holds one byte an element, and SmolLM2's greedy
    answers keep the float32 pool's tokens (first-token logprobs within 0.1)."""
    prompts = ["1, 2, 3, 4,", "The capital of France is"]
    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    reference = gen.generate(prompts, params, return_logprob=True)
    with small_generator(kv_cache_dtype="fp8_e4m3") as other:
        pool = other.engine.runner.kv.k
        assert pool.dtype == jnp.float8_e4m3fn and pool.dtype.itemsize == 1
        got = other.generate(prompts, params, return_logprob=True)
        assert other.check_integrity() == {"running": 0, "waiting": 0}
    for a, b in zip(reference, got, strict=True):
        assert a["output_ids"] == b["output_ids"]
        first = [o["meta_info"]["output_token_logprobs"][0][0] for o in (a, b)]
        assert first[0] == pytest.approx(first[1], abs=0.1)


def test_n_copies_share_the_prompt(gen):
    prompt = _shared_prefix_prompts(gen, 1)[0]
    outs = gen.generate(
        input_ids=prompt, sampling_params={"temperature": 1.0, "n": 3, "max_new_tokens": 10}
    )
    assert len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached[1] >= 200 // PAGE * PAGE  # all but the first hit the prompt's pages


def test_stop_strings_match_across_tokens_and_are_trimmed(gen):
    base = gen.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 12})
    assert base["text"].startswith(" 5, 6, 7, 8,")
    for stop in ["6, 7", ", 8"]:  # inside one token's text, and across two
        out = gen.generate(
            "1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 12, "stop": [stop, "never"]}
        )
        cut = base["text"].index(stop)
        assert out["text"] == base["text"][:cut], stop
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        chunks = gen.generate(
            "1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 12, "stop": [stop]}, stream=True
        )
        assert "".join(c["text"] for c in chunks) == out["text"]


def test_stop_token_ids_and_min_new_tokens(gen):
    comma = gen.tokenizer.encode(",")[0]
    out = gen.generate(
        "1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [comma]}
    )
    assert out["output_ids"][-1] == comma and comma not in out["output_ids"][:-1]
    assert out["meta_info"]["finish_reason"]["matched"] == comma
    chat = gen.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        {"temperature": 0, "max_new_tokens": 40},
    )
    assert chat["meta_info"]["finish_reason"]["type"] == "stop"
    n = chat["meta_info"]["completion_tokens"]
    longer = gen.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": n + 5},
    )
    assert longer["meta_info"]["completion_tokens"] >= n + 5


def test_abandoned_stream_aborts_and_frees(gen):
    stream = gen.generate(
        "Write a very long story about dragons.",
        {"temperature": 0.7, "max_new_tokens": 500},
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 30
    while gen.check_integrity()["running"] and time.time() < deadline:
        time.sleep(0.05)


def test_request_that_can_never_fit_is_aborted_with_a_reason(gen):
    out = gen.generate(input_ids=[5] * 100, sampling_params={"max_new_tokens": 9000})
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "KV pool" in reason["message"]
    ok = gen.generate("Still serving?", GREEDY)  # the engine goes on
    assert ok["meta_info"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(prompt="x", sampling_params={"temprature": 0}), "temprature"),
        (dict(prompt="x", sampling_params={"top_p": 0}), "top_p"),
        (dict(input_ids=[1, 2, 10**9]), "10000000"),
        (dict(input_ids=[]), "at least one token"),
        (dict(prompt="x", input_ids=[1]), "exactly one"),
        (dict(input_ids=[7] * 1024), "context length"),
    ],
)
def test_bad_input_is_a_value_error(gen, bad, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(**bad)


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_policies_keep_greedy_outputs(policy):
    with Generator(
        dtype="float32",
        max_total_tokens=4096,
        context_length=1024,
        warmup=False,
        progress=False,
        schedule_policy=policy,
    ) as g:
        prompts = _shared_prefix_prompts(g, 3) + [g.tokenizer.encode("Hello there")]
        outs = g.generate(input_ids=prompts, sampling_params=GREEDY)
        g.check_integrity()
        fcfs = [g.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    assert [o["output_ids"] for o in outs] == fcfs


def test_batching_window_gathers_arrivals():
    with Generator(
        dtype="float32",
        max_total_tokens=4096,
        context_length=512,
        warmup=False,
        progress=False,
        schedule_constraint_ms=400,
    ) as g:
        g.generate("warm up", {"max_new_tokens": 2})
        before = g.engine.stats.num_extend_steps
        a = g.generate("First arrival", {"max_new_tokens": 4}, stream=True)  # submitted now
        time.sleep(0.1)
        b = g.generate("Second arrival", {"max_new_tokens": 4})
        list(a)
        assert b["meta_info"]["completion_tokens"] == 4
        assert g.engine.stats.num_extend_steps - before == 1  # one prefill for both
        g.check_integrity()


def test_nothing_recompiles_after_warmup_and_compiles_are_counted():
    # The native backend: its warm-up leaves extends of several sequences out (the Pallas
    # kernels' warm-up covers them, see test_attention_backends).
    with Generator(
        attention_backend="native",
        dtype="float32",
        max_total_tokens=2048,
        context_length=256,
        max_running_requests=4,
        chunked_prefill_size=64,
        progress=False,
    ) as g:
        compiled = g.engine.runner.num_compiled
        assert compiled > 0
        for text in ["Hi", "The capital of France is", "Count to ten: 1, 2, 3," * 5]:
            g.generate(text, {"temperature": 0, "max_new_tokens": 30})
        assert g.engine.runner.num_compiled == compiled
        assert g.metrics()["step_compiles_total"] == 0
        # Three prompts admitted together make an extend of three sequences, a shape warm-up
        # leaves out: it compiles now, and the counters say so.
        g.generate(["a b", "c d e", "f"], {"temperature": 0, "max_new_tokens": 3})
        grown = g.engine.runner.num_compiled - compiled
        m = g.metrics()
        assert grown >= 1 and m["step_compiles_total"] == grown
        assert m["step_compile_seconds_total"] > 0


def test_mixed_chunk_decodes_while_a_prompt_is_computed():
    """With --enable-mixed-chunk a running request's tokens come from the prefill steps of a
    prompt that arrives meanwhile (no decode waits for it), and greedy outputs are unchanged."""
    long_prompt = "Write about the sea. " * 40  # ~200 tokens: several 32-token chunks
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    outputs = {}
    for mixed in (False, True):
        with Generator(
            dtype="float32",
            max_total_tokens=2048,
            context_length=512,
            chunked_prefill_size=32,
            enable_mixed_chunk=mixed,
            warmup=False,
            progress=False,
        ) as g:
            outputs[mixed] = decode_during_prefill(
                g, "Count slowly: one, two,", long_prompt, params,
                {"temperature": 0, "max_new_tokens": 4},
            )  # fmt: skip
            st = g.engine.stats
            assert (st.mixed_decode_tokens > 0) == mixed
            if mixed:  # most of the prompt's chunks carried a token of the running request
                assert st.mixed_decode_tokens >= 4
            assert g.check_integrity() == {"running": 0, "waiting": 0}
    assert outputs[True] == outputs[False]
    assert len(outputs[True][0]) == 24


def test_counters(gen):
    before = gen.engine.stats.generation_tokens
    gen.generate(["a b c", "d e f"], {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    st = gen.engine.stats
    assert st.generation_tokens - before == 10
    assert len(st.ttft) >= 2 and len(st.itl) >= 8 and min(st.itl) >= 0
    assert 0.0 <= st.cache_hit_rate <= 1.0
    m = gen.engine.metrics()
    assert m["num_running_reqs"] == 0 and m["num_queue_reqs"] == 0
    assert m["generation_tokens_total"] == st.generation_tokens
    assert 0 <= m["cached_tokens_total"] <= m["prompt_tokens_total"]
    assert 0.0 <= m["token_usage"] <= 1.0


def test_events_from_another_thread_reach_the_loop_in_order_with_one_wake_up_a_burst():
    import asyncio
    import threading

    from jaxsgl.generator import _LoopInbox

    async def main():
        loop = asyncio.get_running_loop()
        inbox = _LoopInbox(loop)
        deliveries = 0
        deliver = inbox._deliver

        def counting_deliver():
            nonlocal deliveries
            deliveries += 1
            deliver()

        inbox._deliver = counting_deliver
        events: asyncio.Queue = asyncio.Queue()
        # The loop is busy in this coroutine while the thread sends a burst of 200 events.
        sender = threading.Thread(target=lambda: [inbox.put(events, i) for i in range(200)])
        sender.start()
        sender.join()
        received = [await events.get() for _ in range(200)]
        return received, deliveries

    received, deliveries = asyncio.run(main())
    assert received == list(range(200))
    assert deliveries == 1
