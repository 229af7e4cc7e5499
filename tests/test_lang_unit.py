"""The frontend language's interpreter on a scripted backend: no model, every call recorded."""

from __future__ import annotations

import asyncio
import json

import pytest

import jaxsgl as sgl
from jaxsgl.lang import backend as backend_module
from jaxsgl.lang import ir
from jaxsgl.lang.chat import TemplateRenderer, role_affixes

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ScriptedBackend(sgl.Backend):
    """Generates "<n>" where n is the prompt's length; token ids are characters; the logprob
    of "a" is -2 and of any other character -1."""

    def __init__(self):
        self.renderer = TemplateRenderer(CHATML)
        self.calls: list[tuple] = []

    def generate(self, text, params, namespace):
        self.calls.append(("generate", text, dict(params), namespace))
        return {"text": f"<{len(text)}>", "meta_info": {"prompt_tokens": len(text)}}

    def stream(self, text, params, namespace):
        out = self.generate(text, params, namespace)
        yield from ((c, None) for c in out["text"])
        yield "", out["meta_info"]

    def tokenize(self, text, add_special_tokens):
        return [ord(c) for c in text]

    def prompt_logprobs(self, prompts, start, namespace):
        self.calls.append(("logprobs", len(prompts), start, namespace))
        rows = [[[-2.0 if t == ord("a") else -1.0, t, None] for t in p[start:]] for p in prompts]
        return [{"input_token_logprobs": r} for r in rows]

    def pin(self, text, namespace):
        self.calls.append(("pin", text, namespace))
        return len(text)

    def unpin(self, text, namespace):
        self.calls.append(("unpin", text, namespace))


@pytest.fixture
def be():
    return ScriptedBackend()


def test_steps_validate_their_arguments():
    assert isinstance(sgl.gen("x", choices=["a", "b"]), ir.Select)
    step = sgl.gen("x", json_schema={"type": "object"}, temperature=0)
    assert step.params == {"json_schema": '{"type": "object"}', "temperature": 0}
    with pytest.raises(ValueError, match="at most one"):
        sgl.gen("x", regex="a", ebnf="b")
    with pytest.raises(ValueError, match="non-empty strings"):
        sgl.select("x", choices=[])
    with pytest.raises(ValueError, match="not 5"):
        ir.as_expr(5)
    assert ("a" + sgl.gen("x") + "b").items[0] == ir.Text("a")


def test_gen_merges_run_defaults_and_stores_variables(be):
    @sgl.function(namespace="ns")
    def prog(s, q):
        s += q + sgl.gen("a", max_tokens=3)
        s += sgl.gen("b")

    state = prog.run("Hi", temperature=0, max_new_tokens=9, backend=be)
    assert [c[2] for c in be.calls] == [
        {"temperature": 0, "max_new_tokens": 3},
        {"temperature": 0, "max_new_tokens": 9},
    ]
    assert state["a"] == "<2>" and state["b"] == "<5>" and state.text() == "Hi<2><5>"
    assert {c[3] for c in be.calls} == {"ns"}
    assert state.get_meta_info("a") == {"prompt_tokens": 2}
    with pytest.raises(KeyError, match="no variable 'c'"):
        state["c"]
    with pytest.raises(ValueError, match="bad arguments for program 'prog'"):
        prog.run(backend=be, nope=1)


def test_select_normalizes_by_token_count_unless_told_not_to(be):
    @sgl.function
    def prog(s):
        s += "pick: " + sgl.select("mean", ["a", "bbbb"])
        s += sgl.select("total", ["a", "bbbb"], normalize=False)

    state = prog.run(backend=be)
    assert state["mean"] == "bbbb" and state["total"] == "a"
    assert state.get_meta_info("mean")["choice_scores"] == [-2.0, -1.0]
    assert state.get_meta_info("total")["choice_scores"] == [-2.0, -4.0]
    # One batched request per select, scored from the end of the text before it.
    assert be.calls == [("logprobs", 2, len("pick: "), ""), ("logprobs", 2, len("pick: bbbb"), "")]


def test_roles_write_the_chat_template(be):
    @sgl.function
    def chat(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Hi")
        s += sgl.assistant(sgl.gen("reply"))

    state = chat.run(backend=be)
    assert state.text() == be.renderer(state.messages())
    assert state.messages()[2] == {"role": "assistant", "content": state["reply"]}
    with pytest.raises(ValueError, match="started inside a user message"):
        sgl.function(lambda s: s.__iadd__(sgl.user_begin() + sgl.user("x"))).run(backend=be)
    with pytest.raises(ValueError, match="assistant_end without assistant_begin"):
        sgl.function(lambda s: s.__iadd__(sgl.assistant_end())).run(backend=be)


def test_role_affixes_drop_what_the_conversation_already_wrote():
    render = TemplateRenderer(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}",
        bos_token="<s>",
    )
    assert role_affixes(render, [], "user") == ("<s><|user|>", "<|end|>")
    history = [{"role": "user", "content": "Hi"}]
    assert role_affixes(render, history, "assistant") == ("<|assistant|>", "<|end|>")


def test_fork_prefills_once_and_join_gathers(be):
    @sgl.function
    def prog(s):
        s += "shared"
        forks = s.fork(3)
        forks += [sgl.gen("x", max_tokens=k) for k in (1, 2, 3)]
        assert forks.prefix_tokens == len("shared")
        with pytest.raises(ValueError, match="2 steps for 3 branches"):
            forks += ["a", "b"]
        forks.join()

    state = prog.run(backend=be)
    prefill, *gens = be.calls
    assert prefill == ("generate", "shared", backend_module.PREFILL, "")
    assert sorted(c[2]["max_new_tokens"] for c in gens) == [1, 2, 3]
    assert state["x"] == ["<6>"] * 3 and state.text() == "shared"
    with pytest.raises(ValueError, match="n >= 1"):
        state.fork(0)


def test_run_batch_prefills_the_common_opening_first(be):
    @sgl.function
    def prog(s, name):
        s += "Hello there, " + name + sgl.gen("g")

    states = prog.run_batch([{"name": "Ann"}, {"name": "Bob"}, {"name": "Al"}], backend=be)
    assert be.calls[0] == ("generate", "Hello there, ", backend_module.PREFILL, "")
    assert [s.text() for s in states] == [
        "Hello there, Ann<16>",
        "Hello there, Bob<16>",
        "Hello there, Al<15>",
    ]
    with pytest.raises(ValueError, match="list of argument dicts"):
        prog.run_batch({"name": "Ann"}, backend=be)


def test_streamed_run_follows_the_text_and_reraises_errors(be):
    @sgl.function
    def prog(s, fail):
        s += "ab" + sgl.gen("g")
        if fail:
            raise RuntimeError("tool failed")

    state = prog.run(False, stream=True, backend=be)
    assert list(state.text_iter("g")) == ["<", "2", ">"]
    assert state.text() == "ab<2>" and list(state.text_iter()) == []
    pieces = asyncio.run(_collect(prog.run(False, stream=True, backend=be).text_async_iter()))
    assert "".join(pieces) == "ab<2>"
    failed = prog.run(True, stream=True, backend=be)
    with pytest.raises(RuntimeError, match="tool failed"):
        failed.text()


async def _collect(pieces):
    return [p async for p in pieces]


def test_session_pins_what_programs_wrote_and_unpins_on_exit(be):
    @sgl.function(namespace="shop")
    def system_prompt(s):
        s += sgl.system("You sell books.")

    with sgl.session(be) as session:
        text = session.run(system_prompt).text()
        assert session.pin("extra") == 5
    assert be.calls == [
        ("pin", text, "shop"),
        ("pin", "extra", ""),
        ("unpin", "extra", ""),
        ("unpin", text, "shop"),
    ]


def test_default_backend(be, monkeypatch):
    monkeypatch.setattr(backend_module, "_default", None)
    with pytest.raises(ValueError, match="no backend"):
        sgl.function(lambda s: None).run()
    with pytest.raises(ValueError, match="not a backend"):
        sgl.set_default_backend(object())
    assert sgl.set_default_backend(be) is be and sgl.get_default_backend() is be
    assert sgl.function(lambda s: s.__iadd__("x")).run().text() == "x"


def test_endpoint_reports_an_unreachable_server():
    with pytest.raises(ValueError, match="cannot reach"):
        sgl.RuntimeEndpoint("http://127.0.0.1:9", timeout=2)


def test_json_schema_text_is_kept_as_given():
    schema = json.dumps({"type": "string"})
    assert sgl.gen("x", json_schema=schema).params["json_schema"] == schema
