"""Constrained decoding on the real SmolLM2: every output follows its regex or validates
against its JSON schema (jsonschema, at temperature 0 and 1); jump-forward changes no greedy
output and saves decode steps; bad grammars are ValueErrors; the device mask equals numpy's."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from engine_helpers import small_generator

from jaxsgl.generator import Generator
from jaxsgl.sampler import grammar_allows

REGEXES = [
    r"[0-9]{1,4}",
    r"-?[0-9]{1,3}\.[0-9]{1,2}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"[a-z]{2,10}@[a-z]{2,8}\.(com|org|net)",
    r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    r'\{"result": "[^"]{1,30}", "confidence": [0-9]{1,3}\}',
    r"(yes|no)",
    r"(red|green|blue|yellow)",
    r"[A-Z][a-z]{2,12}",
    r"\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}",
    r"#[0-9a-f]{6}",
    r"[0-9]{1,2}:[0-5][0-9] (AM|PM)",
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)day?",
    r"[A-Z]{3}-[0-9]{4}",
    r"https://[a-z]{3,12}\.(com|io)/[a-z]{1,10}",
    r"\$[0-9]{1,5}\.[0-9]{2}",
    r"[a-z]+( [a-z]+){2,5}\.",
    r"(true|false)",
    r"[0-9]{3}-[0-9]{2}-[0-9]{4}",
    r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}",
    r"\[([0-9]{1,2}, ){2}[0-9]{1,2}\]",
]

_name = {"type": "string", "minLength": 1, "maxLength": 20}
SCHEMAS = [
    {"type": "object", "properties": {"name": _name}, "required": ["name"]},
    {
        "type": "object",
        "properties": {
            "result": _name,
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["result", "confidence"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _name, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": _name,
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
            }
        },
        "required": ["person"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
        "required": ["code"],
    },
    {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 9},
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "city": _name,
            "country": _name,
            "population": {"type": "integer", "minimum": 1, "maximum": 99999999},
        },
        "required": ["city", "country", "population"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "medium", "high"]}, "note": _name},
        "required": ["level"],
    },
    {"type": "string", "maxLength": 15},
    {"type": "integer", "minimum": -50, "maximum": 50},
    {"enum": ["alpha", "beta", "gamma"]},
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
                    "required": ["id"],
                },
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"],
    },
    {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "reason": _name},
        "required": ["answer", "reason"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
        "required": ["email"],
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "maxItems": 2,
                },
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {"first": _name, "last": _name, "middle": _name},
        "required": ["first", "last"],
    },
    {
        "type": "object",
        "properties": {
            "value": {"type": "integer", "minimum": 10, "maximum": 20},
            "unit": {"enum": ["kg", "g"]},
        },
        "required": ["value", "unit"],
    },
]


def _closed(schema):
    """Objects take only their listed properties, so every output has a bounded length and
    the grammar, not the token limit, ends it."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


SCHEMAS = [_closed(s) for s in SCHEMAS]


@pytest.fixture(scope="module")
def gen():
    with Generator(
        dtype="float32",
        max_total_tokens=16384,
        max_running_requests=64,
        context_length=1024,  # 42 requests in one batch
        warmup=False,
        progress=False,
    ) as g:
        yield g


def _prompts(gen, kind: str, specs) -> list[list[int]]:
    ask = "Give an example matching this {}: {}"
    return [
        gen.tokenizer.apply_chat_template([{"role": "user", "content": ask.format(kind, s)}])
        for s in specs
    ]


def test_every_output_matches_its_regex(gen):
    """One batch: each regex at temperature 0 and at temperature 1."""
    specs = REGEXES * 2
    params = [
        {
            "regex": r,
            "temperature": float(i >= len(REGEXES)),
            "max_new_tokens": 96,
            "sampling_seed": i,
        }
        for i, r in enumerate(specs)
    ]
    outs = gen.generate(input_ids=_prompts(gen, "regex", specs), sampling_params=params)
    for regex, out in zip(specs, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (regex, out["text"])
        assert re.fullmatch(regex, out["text"]), (regex, out["text"])
    assert gen.check_integrity() == {"running": 0, "waiting": 0}


def test_every_output_validates_against_its_schema(gen):
    """One batch: each schema at temperature 0 and at temperature 1."""
    specs = SCHEMAS * 2
    params = [
        {
            "json_schema": json.dumps(s),
            "temperature": float(i >= len(SCHEMAS)),
            "max_new_tokens": 160,
            "sampling_seed": i,
        }
        for i, s in enumerate(specs)
    ]
    outs = gen.generate(input_ids=_prompts(gen, "JSON schema", specs), sampling_params=params)
    for schema, out in zip(specs, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (schema, out["text"])
        jsonschema.validate(json.loads(out["text"]), schema)
    assert gen.check_integrity() == {"running": 0, "waiting": 0}


LONG_KEYS = {
    "type": "object",
    "properties": {
        "the_name_of_the_city_described": _name,
        "the_country_that_this_city_belongs_to": _name,
        "whether_the_city_is_a_national_capital": {"type": "boolean"},
    },
    "required": [
        "the_name_of_the_city_described",
        "the_country_that_this_city_belongs_to",
        "whether_the_city_is_a_national_capital",
    ],
    "additionalProperties": False,
}


def test_jump_forward_keeps_greedy_output_and_saves_decode_steps(gen):
    prompt = _prompts(gen, "JSON schema", ["a city record"])[0]
    params = {"json_schema": json.dumps(LONG_KEYS), "temperature": 0.0, "max_new_tokens": 160}
    st = gen.engine.stats
    decode0, forced0 = st.num_decode_steps, st.jump_forward_tokens
    fast = gen.generate(input_ids=prompt, sampling_params=params)
    fast_decodes = st.num_decode_steps - decode0
    assert st.jump_forward_tokens - forced0 == fast["meta_info"]["jump_forward_tokens"] > 10
    jsonschema.validate(json.loads(fast["text"]), LONG_KEYS)
    with small_generator(disable_jump_forward=True) as plain:
        slow = plain.generate(input_ids=prompt, sampling_params=params)
        slow_decodes = plain.engine.stats.num_decode_steps
        assert slow["meta_info"]["jump_forward_tokens"] == 0
    assert fast["output_ids"] == slow["output_ids"]
    assert fast_decodes < slow_decodes - 10


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"regex": "[0-9"}, "invalid regex"),
        ({"json_schema": "{not json"}, "not JSON"),
        ({"json_schema": '{"type": "nonsense"}'}, "nonsense"),
        ({"ebnf": "root ::= missing_rule"}, "missing_rule"),
        ({"regex": "a", "json_schema": "{}"}, "only one of"),
    ],
)
def test_bad_grammars_are_value_errors(gen, params, match):
    with pytest.raises(ValueError, match=match):
        gen.generate("Hi", params)
    assert gen.check_integrity() == {"running": 0, "waiting": 0}


def test_ebnf_grammar(gen):
    params = {"ebnf": 'root ::= "Answer: " ("yes" | "no")', "temperature": 0.0}
    out = gen.generate("Is water wet?", params)
    assert out["text"] in ("Answer: yes", "Answer: no")


def test_device_mask_equals_numpy_unpacking():
    rng = np.random.default_rng()
    V = 100
    words = rng.integers(0, 2**32, (3, -(-V // 32)), dtype=np.uint64).astype(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)
    np.testing.assert_array_equal(np.asarray(grammar_allows(jnp.asarray(words), V)), bits)


def test_choices_grammar_admits_exactly_the_choices(gen):
    choices = ["yes", "no (maybe)", "a.b*c"]
    backend = gen.engine.grammars()
    for text in choices:
        grammar = backend.compile("choices", choices)
        for token in gen.tokenizer.encode(text, add_special_tokens=False):
            assert _allowed(grammar, token), (text, token)
            grammar.advance(token)
        assert grammar.done
    grammar = backend.compile("choices", choices)
    assert not _allowed(grammar, gen.tokenizer.encode("maybe", add_special_tokens=False)[0])
    with pytest.raises(ValueError, match="choices"):
        backend.compile("choices", [])


def _allowed(grammar, token: int) -> bool:
    words = grammar.allowed_mask().view(np.uint32)
    return bool(words[token // 32] >> np.uint32(token % 32) & 1)


def test_jump_forward_with_logprobs_stop_strings_and_streaming(gen):
    prompt = _prompts(gen, "JSON schema", ["a city record"])[0]
    params = {"json_schema": json.dumps(LONG_KEYS), "temperature": 0.0, "max_new_tokens": 160}
    whole = gen.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
    meta = whole["meta_info"]
    forced = meta["jump_forward_tokens"]
    logprobs = meta["output_token_logprobs"]
    assert [t for _, t, _ in logprobs] == whole["output_ids"]
    # Forced tokens are marked: certain under the grammar, logprob exactly 0.
    assert sum(lp == 0.0 for lp, _, _ in logprobs) >= forced > 10
    # Streaming gives the same text, piece by piece.
    chunks = list(gen.generate(input_ids=prompt, sampling_params=params, stream=True))
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["token_ids"]] == whole["output_ids"]
    # A stop string inside the forced text ends the output there.
    stopped = gen.generate(input_ids=prompt, sampling_params={**params, "stop": ["country"]})
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": "country"}
    assert whole["text"].startswith(stopped["text"]) and "country" not in stopped["text"]
    assert gen.check_integrity() == {"running": 0, "waiting": 0}


def test_dummy_weights_take_a_tokenizer_for_constrained_output(tmp_path):
    """Random Llama-shaped weights with SmolLM2's tokenizer: how GPU benchmarks time grammars."""
    from tiny_models import make_tiny

    from jaxsgl.model.loader import resolve_model_path

    make_tiny("llama31_tied_gqa4", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 49152 + 64  # room beyond the tokenizer, never sampled under a mask
    (tmp_path / "config.json").write_text(json.dumps(config))
    with Generator(
        str(tmp_path),
        load_format="dummy",
        tokenizer_path=str(resolve_model_path(None)),
        warmup=False,
        progress=False,
    ) as g:
        out = g.generate("Pick:", {"regex": "(alpha|beta)-[0-9]{2}", "temperature": 1.0})
        assert re.fullmatch("(alpha|beta)-[0-9]{2}", out["text"])
    config["vocab_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        Generator(
            str(tmp_path),
            load_format="dummy",
            tokenizer_path=str(resolve_model_path(None)),
            warmup=False,
            progress=False,
        )


def test_concurrent_requests_for_one_grammar_compile_it_once(gen):
    """A burst of identical schemas (a server's common case) costs one compile; the rest wait
    for it and are cache hits; a burst of one invalid grammar gives every caller its error."""
    from concurrent.futures import ThreadPoolExecutor

    backend = gen.engine.grammars()
    schema = json.dumps({"type": "object", "properties": {"burst": {"type": "integer"}}})
    compiled, hits = backend.num_compiled, backend.num_cache_hits
    with ThreadPoolExecutor(8) as pool:
        grammars = list(pool.map(lambda _: backend.compile("json_schema", schema), range(8)))
    assert backend.num_compiled == compiled + 1
    assert backend.num_cache_hits == hits + 7
    assert backend.num_compiling == 0
    first = gen.tokenizer.encode("{", add_special_tokens=False)[0]
    assert all(_allowed(g, first) for g in grammars)
    grammars[0].advance(first)  # every caller owns its state: advancing one moves no other
    assert not grammars[1].done and _allowed(grammars[1], first)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(backend.compile, "regex", "(unclosed") for _ in range(4)]
    for f in futures:
        with pytest.raises(ValueError, match="regex"):
            f.result()
    assert backend.num_compiling == 0
