"""What clients do to a server besides asking nicely: leave mid-stream, send anything at all,
forget the API key, and keep asking while it shuts down."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import time

import aiohttp
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from server_fixture import CONTEXT_LENGTH, MODEL, run_server, scrape, value

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
FUZZ_MAX_TOKENS = 2  # generated bodies may ask for more: capped so the run stays short
FUZZ_MAX_N = 4
FUZZ_IN_FLIGHT = 32
FUZZ_TIMEOUT = 120  # seconds for one answer; a request this slow is stuck


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- clients that leave ---------------------------------------------------------------------


async def _leave_midway(session: aiohttp.ClientSession, url: str, i: int) -> int:
    """Start a long stream, read a couple of chunks, drop the connection; chunks read."""
    body = {
        "messages": user(f"Tell me a very long story about dragon number {i}."),
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    resp = await session.post(url + CHAT, json=body)
    assert resp.status == 200
    chunks = 0
    async for line in resp.content:
        chunks += line.startswith(b"data: ")
        if chunks == 3:  # the role chunk and two tokens' worth
            break
    resp.close()  # closes the connection, not just this response
    return chunks


def test_disconnected_streams_are_aborted(server):
    server.wait_idle()
    before = scrape(server)

    async def leave_all():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_leave_midway(session, server.url, i) for i in range(10)))

    assert asyncio.run(leave_all()) == [3] * 10
    server.wait_idle(timeout=30)  # nothing running or queued, page accounting clean
    after = scrape(server)
    aborted = value(after, "sglang:num_aborted_requests_total")
    assert aborted - value(before, "sglang:num_aborted_requests_total") == 10
    generated = value(after, "sglang:generation_tokens_total")
    assert generated - value(before, "sglang:generation_tokens_total") < 10 * 200 // 2
    resp = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions
    out = resp.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4 or out.choices[0].finish_reason == "stop"


# -- fuzzing --------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_extreme = st.sampled_from(
    [0, -1, 2**31, 2**63, 10**30, -(10**30), 1e308, -1e308, 5e-324, "", "x" * 300, [], {}]
)
_FIELDS = {  # route -> a valid body, and the fields a mutation may break
    "/v1/completions": (
        {"prompt": "Hello there", "max_tokens": 2},
        ["prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "stop", "seed",
         "logprobs", "stream", "stream_options", "logit_bias", "model", "echo", "ignore_eos",
         "repetition_penalty", "frequency_penalty", "presence_penalty", "regex", "min_tokens"],
    ),
    CHAT: (
        {"messages": user("Hi"), "max_tokens": 2},
        ["messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "stop",
         "seed", "logprobs", "top_logprobs", "stream", "stream_options", "response_format",
         "model", "logit_bias", "stop_token_ids", "min_tokens", "skip_special_tokens"],
    ),
    "/generate": (
        {"text": "Hello there", "sampling_params": {"max_new_tokens": 2}},
        ["text", "input_ids", "sampling_params", "stream", "return_logprob", "rid",
         "logprob_start_len", "top_logprobs_num", "namespace", "image_data", "unknown"],
    ),
}  # fmt: skip


@st.composite
def _mutated(draw) -> tuple[str, dict]:
    """A valid body with one field replaced by any JSON value (wrong types, huge numbers)."""
    path = draw(st.sampled_from(sorted(_FIELDS)))
    base, fields = _FIELDS[path]
    return path, {**copy.deepcopy(base), draw(st.sampled_from(fields)): draw(_json | _extreme)}


_ROUTES = st.sampled_from(sorted(_FIELDS))
_raw = st.tuples(  # malformed JSON, or JSON that is not an object
    _ROUTES,
    st.binary(max_size=40)
    | _json.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b"", b"{", b'{"prompt": NaN}', b'{"prompt": 1e400}', b"[" * 100_000]),
)

_LONG = "word " * (CONTEXT_LENGTH + 100)
_EDGE_CASES = [  # (path, body): each must be refused with a 4xx
    (CHAT, {"messages": [], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}),
    (CHAT, {"messages": [{}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    (CHAT, {"messages": user("hi"), "max_tokens": 0}),
    (CHAT, {"messages": user("hi"), "max_tokens": -5}),
    (CHAT, {"messages": user("hi"), "max_tokens": CONTEXT_LENGTH}),
    (CHAT, {"messages": user(_LONG), "max_tokens": 2}),
    (CHAT, {"messages": user("hi"), "max_tokens": 2, "model": "gpt-9"}),
    (CHAT, {"messages": user("hi"), "max_tokens": 2, "n": 10**12}),
    (CHAT, {"messages": user("hi"), "max_tokens": 2, "top_logprobs": 5}),
    (CHAT, {"messages": user("hi"), "max_tokens": 2, "stream_options": []}),
    ("/v1/completions", {"prompt": _LONG, "max_tokens": 2}),
    ("/v1/completions", {"prompt": [[1, 2], "x"], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True}),
    ("/generate", {"input_ids": [1] * (CONTEXT_LENGTH + 5), "sampling_params": {}}),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "n": 10**12}}),
    ("/generate", {"text": "hi", "sampling_params": [{"max_new_tokens": 2}] * 3}),
    ("/generate", {"text": ["a", "b"], "rid": ["only-one"], "sampling_params": {}}),
    ("/generate", {"text": "hi", "input_ids": [1, 2], "sampling_params": {}}),
    ("/generate", {"input_ids": [-1], "sampling_params": {"max_new_tokens": 2}}),
]


def _examples(strategy: st.SearchStrategy, n: int) -> list:
    """`n` draws of `strategy` (fewer if it runs dry), the same ones every run."""
    drawn: list = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(example):
        drawn.append(example)

    draw()
    return drawn


def _tame(path: str, body):
    """Cap generation lengths and `n` in a generated body, so the run stays short; bodies
    that ask for more than the context keep asking (they must get a 400, not a generation)."""
    if not isinstance(body, dict):
        return body
    if path == "/generate":
        params = body.get("sampling_params") or {}  # null, [], "": the defaults
        if isinstance(params, list):
            params = [{} if p is None else p for p in params]  # so is a null in a list
        body["sampling_params"] = params
        for p in params if isinstance(params, list) else [params]:
            if isinstance(p, dict):
                p.setdefault("max_new_tokens", FUZZ_MAX_TOKENS)
                _cap(p, "max_new_tokens")
                _cap(p, "n", FUZZ_MAX_N)
    elif path.startswith("/v1/"):
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = FUZZ_MAX_TOKENS
        _cap(body, "max_tokens")
        _cap(body, "max_completion_tokens")
        _cap(body, "n", FUZZ_MAX_N)
    return body


def _cap(d: dict, key: str, cap: int = FUZZ_MAX_TOKENS) -> None:
    v = d.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and cap < v <= CONTEXT_LENGTH:
        d[key] = cap


def _schemathesis_requests(url: str, n: int) -> list[dict]:
    """Requests from the server's own OpenAPI description: valid, and each part made invalid."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    requests = []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        for case in _examples(schema.as_strategy(generation_mode=mode), n):
            case.body = _tame(case.path, case.body)
            kwargs = case.as_transport_kwargs(base_url=url)
            kwargs["headers"].pop("Connection", None)
            requests.append(kwargs)
    return requests


def _fuzz_requests(url: str) -> list[dict]:
    def post(path: str, data: bytes) -> dict:
        return {"method": "POST", "url": url + path, "data": data,
                "headers": {"Content-Type": "application/json"}}  # fmt: skip

    requests = _schemathesis_requests(url, 200)
    for path, body in _examples(_mutated(), 150):
        requests.append(post(path, json.dumps(_tame(path, body)).encode()))
    requests += [post(path, data) for path, data in _examples(_raw, 60)]
    return requests + [post(path, json.dumps(body).encode()) for path, body in _EDGE_CASES]


async def _send(session: aiohttp.ClientSession, limit: asyncio.Semaphore, req: dict):
    """(request, status, content type, body), every body read to its end, streams too;
    status 0 when no answer came within `FUZZ_TIMEOUT` seconds."""
    kwargs = {k: v for k, v in req.items() if k in ("headers", "params", "data", "json")}
    async with limit:
        try:
            async with asyncio.timeout(FUZZ_TIMEOUT):
                async with session.request(req["method"], req["url"], **kwargs) as resp:
                    return req, resp.status, resp.content_type, await resp.read()
        except TimeoutError:
            return req, 0, "", b""


def _problem(req: dict, status: int, content_type: str, body: bytes) -> str | None:
    """What is wrong with one fuzzed exchange, if anything."""
    where = f"{req['method']} {req['url']} {str(req.get('json', req.get('data')))[:200]}"
    if status >= 500 or status == 0:
        return f"{status or 'no answer'} for {where}: {body[:200]!r}"
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            error = None
        ok = isinstance(error, dict) and error.get("code") == status
        if not (ok and isinstance(error["type"], str) and error.get("message")):
            return f"not an OpenAI error body for {where}: {body[:200]!r}"
    elif content_type == "text/event-stream" and not body.rstrip().endswith(b"data: [DONE]"):
        return f"stream without [DONE] for {where}: {body[-200:]!r}"
    return None


def test_fuzzed_requests_never_get_a_5xx(server):
    greeting = {"model": MODEL, "messages": user("Say hello."), "max_tokens": 8, "temperature": 0}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    expected = client.chat.completions.create(**greeting).choices[0].message.content
    requests = _fuzz_requests(server.url)

    async def send_all():
        limit = asyncio.Semaphore(FUZZ_IN_FLIGHT)
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_send(session, limit, r) for r in requests))

    start = time.monotonic()
    responses = asyncio.run(send_all())
    print(f"fuzz: {len(responses)} requests in {time.monotonic() - start:.1f} s")
    problems = [p for p in (_problem(*response) for response in responses) if p]
    assert not problems, "\n".join([f"{len(problems)} bad answers:", *problems, server.output()])
    statuses = [status for _, status, _, _ in responses]
    assert len(responses) >= 500
    # Both sides explored (random regex / schema / ebnf strings are mostly refused).
    assert statuses.count(200) >= 60 and statuses.count(400) >= 100
    edge = zip(_EDGE_CASES, statuses[-len(_EDGE_CASES) :], strict=True)
    assert not [(case, s) for case, s in edge if not 400 <= s < 500], "edge cases not refused"
    server.wait_idle()
    assert client.chat.completions.create(**greeting).choices[0].message.content == expected
    assert server.get("/health") == (200, b"ok")


# -- API key, and shutting down with requests in flight --------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    """A second server: it wants `secret`, and gives running requests 3 s at SIGTERM."""
    yield from run_server("--drain-seconds", "3", api_key="secret")


def test_api_key(keyed_server):
    url = keyed_server.url

    async def statuses():
        async with aiohttp.ClientSession() as session:
            out = {}
            for name, headers in [("none", {}), ("wrong", {"Authorization": "Bearer nope"})]:
                async with session.post(url + CHAT, json={}, headers=headers) as resp:
                    out[name] = resp.status, await resp.json()
            return out

    for status, body in asyncio.run(statuses()).values():
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == 401 and body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
    resp = client.chat.completions.create(
        model=MODEL, messages=user("Hi"), max_tokens=4, temperature=0
    )
    assert resp.choices[0].message.content and resp.usage.completion_tokens <= 4
    assert keyed_server.get("/health") == (200, b"ok")
    assert keyed_server.get("/metrics")[0] == 200
    assert keyed_server.get("/server_info")[0] == 401
    assert keyed_server.get("/server_info", Authorization="Bearer secret")[0] == 200


async def _in_flight_then_sigterm(server) -> tuple[dict, float]:
    """Long and short requests (streamed and not) running when SIGTERM comes; their outcomes
    and how long the clients waited after the signal."""
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="secret", max_retries=0, timeout=120
    )

    async def call(stream: bool, max_tokens: int):
        resp = await client.chat.completions.create(
            model=MODEL,
            messages=user(f"Describe {max_tokens} kinds of clouds."),
            max_tokens=max_tokens,
            temperature=0,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if not stream:
            return resp
        return [chunk async for chunk in resp]

    shapes = {"long": (False, 200), "long_stream": (True, 200), "short": (False, 8)}
    tasks = {k: asyncio.create_task(call(*v)) for k, v in shapes.items()}
    deadline = time.monotonic() + 60
    while True:  # until every request runs (or, the short one, has already finished)
        running = (await asyncio.to_thread(server.server_info))["num_running_reqs"]
        errors = [t.exception() for t in tasks.values() if t.done() and t.exception()]
        assert not errors and time.monotonic() < deadline, f"not all running: {errors}"
        if running + sum(t.done() for t in tasks.values()) == len(tasks):
            break
        await asyncio.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    await client.close()
    return dict(zip(tasks, results, strict=True)), time.monotonic() - signalled


def test_sigterm_with_requests_in_flight(keyed_server):
    results, waited = asyncio.run(_in_flight_then_sigterm(keyed_server))
    assert keyed_server.proc.wait(60) == 0
    assert waited < 60, f"clients hung for {waited:.0f} s"
    for name in ("long", "long_stream"):  # 200 tokens do not fit the 3 s drain: aborted
        err = results[name]
        assert isinstance(err, openai.APIError) and not isinstance(
            err, openai.APIConnectionError
        ), f"{name}: {err!r}"
        assert "shutting down" in err.message, f"{name}: {err.message}"
    short = results["short"]  # finished in the drain window, or aborted cleanly
    if isinstance(short, BaseException):
        assert isinstance(short, openai.APIStatusError) and "shutting down" in short.message
    else:
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 8
