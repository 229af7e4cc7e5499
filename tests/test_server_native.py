"""SGLang's native routes against a real server: `/generate` in its shapes, the info routes,
`/flush_cache`, `/start_profile` and `/stop_profile`, `/openapi.json`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from server_fixture import CONTEXT_LENGTH

from jaxsgl.tokenizer import load_tokenizer

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
OTHER = "def fibonacci(n):"
GREEDY = {"max_new_tokens": 8, "temperature": 0}
META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> dict | list:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def sse_events(session: aiohttp.ClientSession, url: str, body: dict) -> list:
    """The `data:` payloads of a stream, `[DONE]` included as the string."""
    events = []
    async with session.post(url, json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for line in resp.content:
            if line.strip():
                assert line.startswith(b"data: "), line
                data = line.decode().removeprefix("data: ").strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def _generate_calls(url: str, prompt_ids: list[int]) -> dict:
    calls = {
        "single": {"text": PROMPT, "sampling_params": GREEDY},
        "batch": {"text": [PROMPT, OTHER], "sampling_params": GREEDY},
        "input_ids": {"input_ids": prompt_ids, "sampling_params": GREEDY},
        "logprobs": {
            "input_ids": prompt_ids,
            "sampling_params": GREEDY,
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 2,
        },
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        streamed = sse_events(
            session, url + "/generate", {"text": PROMPT, "sampling_params": GREEDY, "stream": True}
        )
        results = await asyncio.gather(
            streamed, *(post(session, url + "/generate", body) for body in calls.values())
        )
    return {"stream": results[0], **dict(zip(calls, results[1:], strict=True))}


@pytest.fixture(scope="module")
def generated(base_url, tokenizer) -> dict:
    """The `/generate` shapes, sent at once so the engine batches them."""
    return asyncio.run(_generate_calls(base_url, tokenizer.encode(PROMPT, True)))


def check_meta(out: dict, tokenizer) -> dict:
    meta = out["meta_info"]
    assert set(meta) >= META_KEYS and isinstance(meta["id"], str) and meta["e2e_latency"] > 0
    assert meta["completion_tokens"] == len(out["output_ids"]) > 0
    assert 0 <= meta["cached_tokens"] < meta["prompt_tokens"]
    reason = meta["finish_reason"]
    if reason["type"] == "length":
        assert reason["length"] == meta["completion_tokens"] == GREEDY["max_new_tokens"]
    else:
        assert reason["type"] == "stop" and reason["matched"] in tokenizer.eos_token_ids
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    return meta


def test_generate_single_text(generated, tokenizer):
    out = generated["single"]
    meta = check_meta(out, tokenizer)
    assert meta["prompt_tokens"] == len(tokenizer.encode(PROMPT, True))
    assert "Paris" in out["text"]


def test_generate_batch_of_texts(generated, tokenizer):
    first, second = generated["batch"]
    for out in (first, second):
        check_meta(out, tokenizer)
    assert first["output_ids"] == generated["single"]["output_ids"]  # greedy, same prompt
    assert first["meta_info"]["id"] != second["meta_info"]["id"]
    assert second["meta_info"]["prompt_tokens"] == len(tokenizer.encode(OTHER, True))


def test_generate_input_ids(generated, tokenizer):
    out = generated["input_ids"]
    check_meta(out, tokenizer)
    assert out["output_ids"] == generated["single"]["output_ids"]


def test_generate_stream_is_cumulative_and_ends_with_done(generated):
    *chunks, done = generated["stream"]
    assert done == "[DONE]" and chunks
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    whole = generated["single"]
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]


def test_generate_logprobs_shapes(generated, tokenizer):
    out = generated["logprobs"]
    meta = check_meta(out, tokenizer)
    prompt = tokenizer.encode(PROMPT, True)
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt and inputs[0][0] is None
    assert [t for _, t, _ in outputs] == out["output_ids"]
    for lp, token, text in inputs[1:] + outputs:
        assert isinstance(lp, float) and lp <= 0 and isinstance(token, int)
        assert text is None or isinstance(text, str)
    input_top, output_top = meta["input_top_logprobs"], meta["output_top_logprobs"]
    assert len(input_top) == len(prompt) and input_top[0] is None
    assert len(output_top) == len(outputs)
    for top in input_top[1:] + output_top:
        assert len(top) == 2 and all(len(entry) == 3 for entry in top)
        assert top[0][0] >= top[1][0]
    for (lp, token, _), top in zip(outputs, output_top, strict=True):
        assert top[0][1] == token and top[0][0] == pytest.approx(lp, abs=1e-4)  # greedy


def test_repeated_long_prompt_hits_the_cache_until_flushed(server):
    body = {"text": "A story about a lighthouse keeper. " * 20, "sampling_params": GREEDY}

    async def three():
        async with aiohttp.ClientSession() as session:
            url = server.url + "/generate"
            first, second = [await post(session, url, body) for _ in range(2)]
            async with session.post(server.url + "/flush_cache") as resp:
                assert resp.status == 200 and "flushed" in (await resp.text()).lower()
            return first, second, await post(session, url, body)

    server.wait_idle()
    first, second, after_flush = asyncio.run(three())
    assert first["meta_info"]["prompt_tokens"] > 100
    assert second["meta_info"]["cached_tokens"] > first["meta_info"]["cached_tokens"]
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 16
    assert after_flush["meta_info"]["cached_tokens"] == 0
    assert first["output_ids"] == second["output_ids"] == after_flush["output_ids"]


def test_flush_cache_is_refused_while_a_request_runs(server):
    body = {
        "text": "Count slowly from one to one hundred:",
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }

    async def flush_midway():
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/generate", json=body) as stream,
        ):
            await stream.content.readline()  # the first token is out: the request runs
            async with session.post(server.url + "/flush_cache") as resp:
                refused = resp.status, await resp.json()
            return refused, await stream.read()

    server.wait_idle()
    (status, error), rest = asyncio.run(flush_midway())
    assert status == 400 and "running" in error["error"]["message"]
    assert rest.rstrip().endswith(b"data: [DONE]")
    server.wait_idle()
    assert server.get("/flush_cache")[0] == 405  # POST only
    assert _post_status(server.url + "/flush_cache") == 200


def _post_status(url: str) -> int:
    async def go():
        async with aiohttp.ClientSession() as session, session.post(url) as resp:
            return resp.status

    return asyncio.run(go())


def test_profile_routes_write_a_trace(server, tmp_path):
    """`/start_profile` with `num_steps`: the trace stops itself after that many engine steps
    and is written (TensorBoard's xplane and Perfetto's JSON); a second start while one runs,
    a stop with none running and bad fields are 400s."""

    async def go():
        async with aiohttp.ClientSession() as session:
            url = server.url
            bad = {"num_steps": 0}
            async with session.post(url + "/start_profile", json=bad) as resp:
                assert resp.status == 400 and "num_steps" in (await resp.json())["error"]["message"]
            async with session.post(url + "/stop_profile") as resp:
                assert resp.status == 400 and "no trace" in (await resp.json())["error"]["message"]
            body = {"output_dir": str(tmp_path), "num_steps": 2}
            async with session.post(url + "/start_profile", json=body) as resp:
                assert resp.status == 200 and str(tmp_path) in await resp.text()
            async with session.post(url + "/start_profile", json=body) as resp:
                assert resp.status == 400 and "already" in (await resp.json())["error"]["message"]
            await post(session, url + "/generate", {"text": PROMPT, "sampling_params": GREEDY})
            async with session.post(url + "/stop_profile") as resp:  # it stopped by itself
                assert resp.status == 400
            async with session.post(url + "/start_profile") as resp:  # defaults, until stopped
                assert resp.status == 200 and server.trace_dir.name in await resp.text()
            async with session.post(url + "/stop_profile") as resp:
                assert resp.status == 200 and "written" in await resp.text()

    server.wait_idle()
    asyncio.run(go())
    for folder in (tmp_path, Path(server.trace_dir.name)):
        runs = list((folder / "plugins" / "profile").iterdir())
        assert len(runs) == 1
        assert list(runs[0].glob("*.xplane.pb")) and list(runs[0].glob("perfetto_trace.json.gz"))


def test_health_routes(server):
    assert server.get("/health") == (200, b"ok")
    assert server.get("/health_generate", timeout=120)[0] == 200


def test_model_info_and_models(server):
    status, body = server.get("/model_info")
    assert status == 200
    info = json.loads(body)
    assert server.get("/get_model_info") == (status, body)
    assert info["context_length"] == CONTEXT_LENGTH and info["is_generation"] is True
    assert info["vocab_size"] == 49152
    models = json.loads(server.get("/v1/models")[1])
    assert models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == info["served_model_name"] == "smollm2-135m-instruct"
    assert model["object"] == "model" and model["max_model_len"] == CONTEXT_LENGTH


def test_server_info(server):
    info = server.wait_idle()
    assert info["context_length"] == CONTEXT_LENGTH and info["max_total_tokens"] == 16384
    assert info["max_running_requests"] == 64 and info["chunked_prefill_size"] == 512
    assert info["kv_cache_dtype"] == "auto"
    assert info["num_requests_total"] >= 0 and isinstance(info["version"], str)
    assert json.loads(server.get("/get_server_info")[1])["integrity"] == info["integrity"]


def test_openapi_lists_the_routes(server):
    status, body = server.get("/openapi.json")
    assert status == 200
    spec = json.loads(body)
    assert spec["openapi"].startswith("3.")
    routes = {
        ("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
        ("post", "/generate"), ("get", "/health"), ("get", "/health_generate"),
        ("get", "/model_info"), ("get", "/get_model_info"), ("get", "/server_info"),
        ("post", "/flush_cache"), ("get", "/metrics"), ("post", "/start_profile"),
        ("post", "/stop_profile"),
    }  # fmt: skip
    listed = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes <= listed
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        assert "400" in spec["paths"][path]["post"]["responses"]
