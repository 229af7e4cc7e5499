"""Programs of the frontend language on the real SmolLM2, each run on both backends — the
in-process Generator and a RuntimeEndpoint on the shared server — with identical greedy results."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from aiohttp import web
from lang_fixtures import SERVER_OPTIONS
from server_fixture import free_port

import jaxsgl as sgl
from jaxsgl.lang import ProgramState
from jaxsgl.tokenizer import load_tokenizer
from serving.app import create_app

pytest_plugins = ["server_fixture", "lang_fixtures"]
pytestmark = pytest.mark.slow

PAGE = 16  # the engines' page size: caching is in whole pages


def run_both(backends: dict, prog: sgl.SglFunction, **kwargs) -> dict[str, ProgramState]:
    """The program on every backend at once; their texts and variables must be equal."""
    with ThreadPoolExecutor(len(backends)) as pool:
        futures = {k: pool.submit(prog.run, backend=b, **kwargs) for k, b in backends.items()}
        states = {k: f.result() for k, f in futures.items()}
    gen, http = states["generator"], states["endpoint"]
    assert gen.text() == http.text()
    assert gen.variables() == http.variables()
    return states


@sgl.function
def few_shot_qa(s, question):
    s += "Q: What is the capital of Germany?\nA: Berlin\n\n"
    s += "Q: What is the capital of Spain?\nA: Madrid\n\n"
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, stop="\n")


def test_few_shot_qa(backends):
    question = "What is the capital of France?"
    states = run_both(backends, few_shot_qa, question=question, temperature=0)
    state = states["generator"]
    assert state["answer"].strip() == "Paris"
    assert state.text().endswith("Q: What is the capital of France?\nA:" + state["answer"])
    assert state.get_meta_info("answer")["finish_reason"]["type"] == "stop"


@sgl.function
def multi_turn(s, first, second):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(first)
    s += sgl.assistant(sgl.gen("first", max_tokens=8))
    s += sgl.user(second)
    s += sgl.assistant_begin()
    s += sgl.gen("second", max_tokens=8)
    s += sgl.assistant_end()


def test_multi_turn_chat_follows_the_chat_template(backends, lang_generator):
    states = run_both(
        backends,
        multi_turn,
        first="What is the capital of France?",
        second="And of Italy?",
        temperature=0,
    )
    state = states["endpoint"]
    assert "Paris" in state["first"] and "Rome" in state["second"]
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == state["first"]
    # The program's text is exactly what the model's own template writes for the messages.
    template = lang_generator.tokenizer.render_chat(messages, add_generation_prompt=False)
    assert state.text() == template
    # The second turn's prompt starts with the first turn, already cached.
    assert state.get_meta_info("second")["cached_tokens"] >= PAGE


@sgl.function
def fork_join(s, topic):
    s += sgl.user(f"Give one short fact about {topic}. " * 4)
    s += sgl.assistant_begin()
    forks = s.fork(3)
    forks += [sgl.gen("fact", max_tokens=4, temperature=0, min_tokens=k) for k in (1, 2, 3)]
    s["prefix_tokens"] = forks.prefix_tokens
    s["cached"] = [f.get_meta_info("fact")["cached_tokens"] for f in forks]
    forks.join()


def test_fork_computes_the_shared_prefix_once_and_join_gathers(backends):
    states = run_both(backends, fork_join, topic="the Moon")
    for state in states.values():
        prefix = state["prefix_tokens"]
        assert prefix > 2 * PAGE
        # Every branch found the whole pages of the shared prefix in the cache.
        # (A prompt that is all prefix still computes its last token: the `- 1`.)
        assert all(c >= (prefix - 1) // PAGE * PAGE for c in state["cached"]), state["cached"]
        facts = state["fact"]
        assert isinstance(facts, list) and len(facts) == 3 and all(facts)


@sgl.function
def pick_city(s):
    s += "Q: Which city is the capital of France?\nA: The capital of France is"
    s += sgl.select("city", choices=[" London", " Paris", " the city of Rome in Italy"])


def test_select_picks_the_highest_mean_logprob(backends, server, smollm2_path):
    states = run_both(backends, pick_city)
    state = states["generator"]
    assert state["city"] == " Paris"
    # Independently: each choice's token logprobs from `/generate`, over the model's tokens.
    tok = load_tokenizer(smollm2_path)
    prefix = tok.encode(state.text()[: -len(state["city"])], add_special_tokens=True)
    choices = [" London", " Paris", " the city of Rome in Italy"]
    body = {
        "input_ids": [prefix + tok.encode(c) for c in choices],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": len(prefix),
    }
    outs = backends["endpoint"]._request("POST", "/generate", body)
    means = []
    for out, choice in zip(outs, choices, strict=True):
        rows = out["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in rows] == tok.encode(choice)
        means.append(sum(lp for lp, _, _ in rows) / len(rows))
    assert choices[means.index(max(means))] == state["city"]
    assert state.get_meta_info("city")["choice_scores"] == pytest.approx(means, abs=1e-4)


IP = r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@sgl.function
def constrained(s):
    s += "The IP address of localhost is " + sgl.gen("ip", max_tokens=16, regex=IP)
    s += "\nA person as JSON: " + sgl.gen("person", max_tokens=40, json_schema=PERSON)


def test_regex_and_json_constrained_gen(backends):
    state = run_both(backends, constrained, temperature=0)["generator"]
    assert re.fullmatch(IP, state["ip"]), state["ip"]
    jsonschema.validate(json.loads(state["person"]), PERSON)


def calculator(expression: str) -> str:
    a, op, b = re.fullmatch(r"\s*(\d+)\s*([+*-])\s*(\d+)\s*", expression).groups()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


@sgl.function
def tool_use(s, question, calls):
    s += f"Question: {question}\nThe right tool (calculator or encyclopedia) is the"
    s += sgl.select("tool", choices=[" calculator", " encyclopedia"])
    if s["tool"] == " calculator":
        expression = r"[0-9]{1,3} ?[+*-] ?[0-9]{1,3}"
        s += "\nExpression: " + sgl.gen("call", max_tokens=8, regex=expression)
        result = calculator(s["call"])
    else:
        s += "\nSearch for: " + sgl.gen("call", max_tokens=6, stop="\n")
        result = "Hamlet was written by William Shakespeare."
    calls.append((s["tool"].strip(), s["call"]))
    s += f"\nTool result: {result}\nFinal answer:" + sgl.gen("answer", max_tokens=8, stop="\n")


@pytest.mark.parametrize("question", ["What is 12 + 30?", "Who wrote the play Hamlet?"])
def test_tool_calling_program_branches_on_the_model_output(backends, question):
    calls: list = []
    states = run_both(backends, tool_use, question=question, calls=calls, temperature=0)
    state = states["generator"]
    tool = state["tool"].strip()
    # One call per backend, to the tool the model chose, with the argument it generated.
    assert calls == [(tool, state["call"])] * 2
    if tool == "calculator":
        assert f"Tool result: {calculator(state['call'])}\n" in state.text()
    else:
        assert "Tool result: Hamlet was written by" in state.text()


@sgl.function
def add_numbers(s, a, b):
    s += "You add numbers. Examples: 1 + 1 = 2. 2 + 3 = 5. 10 + 4 = 14.\n"
    s += f"{a} + {b} =" + sgl.gen("sum", max_tokens=3, stop=".")


def test_run_batch_of_64_with_a_progress_bar(backends, capsys):
    batch = [{"a": i, "b": i % 7} for i in range(64)]
    results = {}
    for name, backend in backends.items():
        states = add_numbers.run_batch(batch, backend=backend, progress_bar=True, temperature=0)
        results[name] = [s["sum"] for s in states]
        # The shared first line was computed before the batch: every program hit it.
        assert all(s.get_meta_info("sum")["cached_tokens"] >= PAGE for s in states)
        assert [s.text().split("\n")[1].split(" =")[0] for s in states] == [
            f"{k['a']} + {k['b']}" for k in batch
        ]
    assert results["generator"] == results["endpoint"]
    sums = [str(k["a"] + k["b"]) for k in batch]
    right = [r.strip() == want for r, want in zip(results["endpoint"], sums, strict=True)]
    assert sum(right) > 8
    assert "64/64" in capsys.readouterr().err


def test_streamed_run_yields_the_text_as_it_is_generated(backends):
    question = "What is the capital of France?"
    kwargs = dict(first=question, second="And of Italy?", temperature=0)
    whole = multi_turn.run(backend=backends["endpoint"], **kwargs)
    state = multi_turn.run(backend=backends["endpoint"], stream=True, **kwargs)
    pieces = list(state.text_iter("first"))
    assert len(pieces) > 1 and "".join(pieces) == state["first"] == whole["first"]
    assert state.text() == whole.text()


def test_server_options_match_the_generator(server):
    # run_both compares greedy outputs: the two engines must be configured alike.
    info = server.server_info()
    for key in ("max_total_tokens", "context_length", "chunked_prefill_size"):
        assert info[key] == SERVER_OPTIONS[key], key


@pytest.fixture
def keyed_url(lang_generator):
    """The Generator behind an app that wants an API key, served from a thread."""
    app = create_app(lang_generator, model_name="keyed", api_key="secret")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    port = free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_endpoint_sends_its_api_key(keyed_url):
    with pytest.raises(ValueError, match="401"):
        sgl.RuntimeEndpoint(keyed_url)
    endpoint = sgl.RuntimeEndpoint(keyed_url, api_key="secret")
    assert endpoint.tokenize("Hello", False) == endpoint.tokenize("Hello", True)  # no bos
    state = few_shot_qa.run(question="What is 2 + 2?", max_new_tokens=2, backend=endpoint)
    assert state.get_meta_info("answer")["completion_tokens"] >= 1
