"""The OpenAI routes through the official `openai` client, against a real server on loopback.

The client calls of the feature tests run concurrently (one `openai_results` fixture), so the
engine batches them and the module costs a few dozen steps, not one run per test; each test
then checks its own answers. Greedy answers are checked against an in-process `Generator`.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import openai
import pytest
from server_fixture import CONTEXT_LENGTH, scrape, value

from jaxsgl.generator import Generator

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.slow

GREEDY_CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "The three primary colors are"
PENALIZED = {"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.3, "ignore_eos": True}
YES_NO = r"(yes|no), because [a-z ]{3,40}\."
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 30},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Is the sea salty? Answer with a reason."}]
CAT = [{"role": "user", "content": "Invent a name for a cat."}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference():
    """The same model in this process, for greedy answers to compare with the server's."""
    options = dict(context_length=CONTEXT_LENGTH, warmup=False, progress=False)
    with Generator(max_total_tokens=2048, **options) as gen:
        yield gen


async def _feature_calls(client: openai.OpenAI, url: str, model: str) -> dict:
    """Every feature's call at once; each value is the response or the exception it raised."""
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    chat, complete = client.chat.completions.create, client.completions.create
    achat = aclient.chat.completions.create

    async def stream_chat(**kwargs) -> list:
        return [chunk async for chunk in await achat(stream=True, **kwargs)]

    calls = {
        "chat": asyncio.to_thread(
            chat, model=model, messages=GREEDY_CHAT, max_tokens=12, temperature=0
        ),
        "async_chat": achat(model=model, messages=GREEDY_CHAT, max_tokens=12, temperature=0),
        "stream": stream_chat(
            model=model,
            messages=GREEDY_CHAT,
            max_tokens=12,
            temperature=0,
            stream_options={"include_usage": True},
        ),
        "completion": asyncio.to_thread(
            complete, model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2
        ),
        "chat_logprobs": achat(
            model=model,
            messages=user("Name a fruit."),
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        ),
        "n2": achat(
            model=model,
            messages=CAT,
            n=2,
            max_tokens=8,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        ),
        "max_completion_tokens": achat(
            model=model,
            messages=user("Count to ten."),
            max_completion_tokens=3,
            extra_body={"ignore_eos": True},
        ),
        "penalized": achat(
            model=model,
            messages=user("Repeat after me: la la la la la la"),
            max_tokens=10,
            temperature=0.8,
            extra_body=PENALIZED,
        ),
        "regex": achat(model=model, messages=QUESTION, max_tokens=40, extra_body={"regex": YES_NO}),
        "json_schema": achat(
            model=model,
            messages=QUESTION,
            max_tokens=60,
            temperature=1.0,
            extra_body={"json_schema": json.dumps(ANSWER_SCHEMA)},
        ),
        "response_format": achat(
            model=model,
            messages=QUESTION,
            max_tokens=60,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
            },
        ),
        "bad_schema": achat(
            model=model,
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        ),
        "bad_regex": achat(model=model, messages=QUESTION, extra_body={"regex": "(unclosed"}),
    }
    for i in range(2):  # the same seed twice, at temperature 1, in the same batch
        calls[f"seed{i}"] = achat(
            model=model,
            messages=user("Tell me a surprising fact."),
            max_tokens=12,
            temperature=1.0,
            seed=1234,
        )
    try:
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
    finally:
        await aclient.close()
    return dict(zip(calls, results, strict=True))


@pytest.fixture(scope="module")
def openai_results(client, base_url, model) -> dict:
    return asyncio.run(_feature_calls(client, base_url, model))


def ok(results: dict, name: str):
    r = results[name]
    if isinstance(r, BaseException):
        raise AssertionError(f"{name} failed: {r!r}") from r
    return r


def test_chat_greedy_equals_in_process_generator(openai_results, reference):
    resp = ok(openai_results, "chat")
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    expected = reference.chat(GREEDY_CHAT, {"temperature": 0, "max_new_tokens": 12})
    assert choice.message.content == expected["text"]
    assert resp.usage.prompt_tokens == expected["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == expected["meta_info"]["completion_tokens"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    again = ok(openai_results, "async_chat")  # AsyncOpenAI, same request
    assert again.choices[0].message.content == expected["text"]


def test_completion_greedy_with_logprobs(openai_results, reference):
    resp = ok(openai_results, "completion")
    choice = resp.choices[0]
    expected = reference.generate(PROMPT, {"temperature": 0, "max_new_tokens": 12})
    assert resp.object == "text_completion" and choice.text == expected["text"]
    n = resp.usage.completion_tokens
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 2  # two ids may decode to the same text
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the argmax
        assert top.get(token, logprob) == pytest.approx(logprob, abs=1e-4)


def test_chat_logprobs_with_top_logprobs(openai_results):
    resp = ok(openai_results, "chat_logprobs")
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens > 0
    assert "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)
        assert bytes(c.bytes).decode() == c.token


def test_streaming_chat_with_usage(openai_results):
    chunks = ok(openai_results, "stream")
    whole = ok(openai_results, "chat")
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, usage_chunk = chunks
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in body]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert usage_chunk.choices == []
    usage = usage_chunk.usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert isinstance(usage.prompt_tokens_details.cached_tokens, int)
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_n_choices(openai_results, reference):
    resp = ok(openai_results, "n2")
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens == 2 * 8  # ignore_eos: both run to max_tokens
    prompt = reference.tokenizer.apply_chat_template(CAT, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(prompt)  # counted once, not once per choice


def test_same_seed_same_text_at_temperature_one(openai_results):
    a, b = ok(openai_results, "seed0"), ok(openai_results, "seed1")
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens > 0


def test_max_completion_tokens(openai_results):
    resp = ok(openai_results, "max_completion_tokens")
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


def test_sglang_sampling_extras_reach_the_sampler(openai_results, reference):
    resp = ok(openai_results, "penalized")
    messages = user("Repeat after me: la la la la la la")
    params = {"temperature": 0.8, "max_new_tokens": 10, **PENALIZED}
    expected = reference.chat(messages, params)  # top_k=1: greedy over the penalized logits
    assert resp.choices[0].message.content == expected["text"]
    assert resp.usage.completion_tokens == 10  # ignore_eos
    plain = reference.chat(messages, {"temperature": 0, "max_new_tokens": 10})
    assert plain["output_ids"] != expected["output_ids"], "the penalty changed nothing"


def test_constrained_outputs_follow_their_grammar(openai_results, server):
    """Run in one batch with every unconstrained call above: both kinds are served at once."""
    import jsonschema

    metrics = scrape(server)
    # The regex and the schema compiled once each; the second use of the schema hit the cache.
    assert value(metrics, "sglang:grammar_compiled_total") >= 2
    assert value(metrics, "sglang:grammar_cache_hits_total") >= 1
    assert value(metrics, "sglang:grammar_compile_seconds_total") > 0
    assert value(metrics, "sglang:num_grammar_queue_reqs") == 0

    regex = ok(openai_results, "regex").choices[0]
    assert regex.finish_reason == "stop" and re.fullmatch(YES_NO, regex.message.content)
    for name in ("json_schema", "response_format"):
        choice = ok(openai_results, name).choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), ANSWER_SCHEMA)


@pytest.mark.parametrize(("name", "problem"), [("bad_schema", "nonsense"), ("bad_regex", "regex")])
def test_invalid_grammars_are_400(openai_results, name, problem):
    err = openai_results[name]
    assert isinstance(err, openai.BadRequestError), err
    assert err.status_code == 400 and problem in err.message
    assert err.body["type"] == "invalid_request_error"


def test_stop_strings(base_url, model, openai_results):
    text = ok(openai_results, "completion").choices[0].text
    chat_text = ok(openai_results, "chat").choices[0].message.content
    stop, chat_stop = _middle_stop(text), _middle_stop(chat_text)

    async def both():
        url = base_url + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(
                aclient.completions.create(
                    model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                    stop=[stop, "never seen"],
                ),
                aclient.chat.completions.create(
                    model=model, messages=GREEDY_CHAT, max_tokens=12, temperature=0,
                    stop=chat_stop,
                ),
            )  # fmt: skip

    completion, chat = asyncio.run(both())
    assert completion.choices[0].text == text[: text.index(stop)]
    assert completion.choices[0].finish_reason == "stop"
    assert chat.choices[0].message.content == chat_text[: chat_text.index(chat_stop)]
    assert chat.choices[0].finish_reason == "stop"


def _middle_stop(text: str) -> str:
    """A 2-character stop string first found in the middle of `text`."""
    for at in range(len(text) // 3, len(text) - 2):
        s = text[at : at + 2]
        if s.strip() and text.index(s) == at:
            return s
    raise AssertionError(f"no stop string to pick in {text!r}")


# -- 64 concurrent streams ------------------------------------------------------------------


def _concurrent_body(i: int, stream: bool) -> dict:
    topics = ["the moon", "rivers", "bread", "chess", "owls", "glass", "volcanoes", "tea"]
    body = {
        "messages": user(f"In one sentence, fact number {i} about {topics[i % 8]}:"),
        "max_tokens": 8,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def _sse_chat(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    """One streamed chat read as raw SSE: its text, finish reason, usage and [DONE]."""
    text, finish, usage, done = "", None, None, False
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for line in resp.content:
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ") and not done, line
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return {"text": text, "finish_reason": finish, "usage": usage, "done": done}


async def _twins(url: str, n: int) -> tuple[list[dict], list[dict]]:
    """`n` streams at once, then the same requests unstreamed, at once."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        streamed = await asyncio.gather(
            *(_sse_chat(session, url, _concurrent_body(i, True)) for i in range(n))
        )

        async def whole(i: int) -> dict:
            async with session.post(
                url + "/v1/chat/completions", json=_concurrent_body(i, False)
            ) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        return streamed, list(await asyncio.gather(*(whole(i) for i in range(n))))


def test_64_concurrent_streams_equal_their_twins_and_metrics_add_up(server):
    server.wait_idle()
    before = scrape(server)
    streamed, whole = asyncio.run(_twins(server.url, 64))
    server.wait_idle()
    after = scrape(server)

    for i, (s, w) in enumerate(zip(streamed, whole, strict=True)):
        assert s["done"] and s["finish_reason"] in ("length", "stop"), (i, s)
        assert s["text"] == w["choices"][0]["message"]["content"], i
        assert s["finish_reason"] == w["choices"][0]["finish_reason"], i
        assert s["usage"]["completion_tokens"] == w["usage"]["completion_tokens"], i
        assert s["usage"]["prompt_tokens"] == w["usage"]["prompt_tokens"], i
    usages = [s["usage"] for s in streamed] + [w["usage"] for w in whole]
    delta = lambda name: value(after, name) - value(before, name)
    assert delta("sglang:num_requests_total") == 128
    assert delta("sglang:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("sglang:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("sglang:cached_tokens_total") == cached
    assert delta("request_latency_seconds_count") == delta("sglang:num_requests_total")

    # The deployment guide's names, as its Grafana dashboard queries them.
    assert 0 < value(after, "sglang_hit_rate") <= 1  # the twins hit the streams' prefixes
    buckets = after["request_latency_seconds_bucket"]
    assert {labels["le"] for labels, _ in buckets} >= {"0.1", "1.0", "+Inf"}
    memory = after["active_gpu_memory_bytes"]
    assert memory and all(labels.get("device") and v > 0 for labels, v in memory)
