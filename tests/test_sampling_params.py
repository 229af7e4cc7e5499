"""SamplingParams: SGLang defaults, API parsing, type and range errors that name the field."""

import dataclasses

import pytest

from jaxsgl.sampling_params import SamplingParams

VOCAB = 100


def test_defaults_are_sglangs():
    p = SamplingParams()
    assert (p.max_new_tokens, p.min_new_tokens, p.n) == (128, 0, 1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids is None and p.logit_bias is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.no_stop_trim
    assert p.sampling_seed is None and p.regex is p.json_schema is p.ebnf is None
    p.validate(VOCAB)


def test_from_dict_reads_every_field():
    d = {
        "max_new_tokens": 16,
        "min_new_tokens": 2,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.1,
        "stop": "\n\n",
        "stop_token_ids": [7, 8],
        "ignore_eos": True,
        "n": 2,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "logit_bias": {"5": -100, 6: 2.5},
        "sampling_seed": 42,
        "regex": "[a-z]+",
        "no_stop_trim": True,
    }
    p = SamplingParams.from_dict(d)
    p.validate(VOCAB)
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.stop == ["\n\n"]
    assert p.logit_bias == {5: -100.0, 6: 2.5}
    assert p.stop_token_ids == [7, 8] and p.sampling_seed == 42 and p.regex == "[a-z]+"
    assert dataclasses.asdict(p)["top_k"] == 40


def test_stop_list_kept_and_params_frozen():
    p = SamplingParams(stop=["a", "b"])
    assert p.stop == ["a", "b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams.from_dict({"max_tokens": 5, "temperature": 0.5})


def test_non_dict_rejected():
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([("temperature", 1.0)])


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("temperature", None),
        ("top_p", float("nan")),
        ("min_p", float("inf")),
        ("frequency_penalty", [0.1]),
        ("repetition_penalty", True),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", None),
        ("min_new_tokens", "3"),
        ("top_k", 2.0),
        ("n", True),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("stop_token_ids", 3),
        ("stop_token_ids", [1, "2"]),
        ("logit_bias", [1, 2]),
        ("logit_bias", {"abc": 1.0}),
        ("logit_bias", {"1": "x"}),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
        ("no_stop_trim", None),
        ("regex", 5),
        ("json_schema", {"type": "object"}),
        ("ebnf", 1),
        ("sampling_seed", 1.0),
    ],
)
def test_wrong_type_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("temperature", -0.1, "-0.1"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.01, "1.01"),
        ("top_k", 0, "0"),
        ("top_k", -2, "-2"),
        ("min_p", -0.01, "-0.01"),
        ("min_p", 1.5, "1.5"),
        ("frequency_penalty", 2.1, "2.1"),
        ("frequency_penalty", -2.1, "-2.1"),
        ("presence_penalty", 2.5, "2.5"),
        ("presence_penalty", -3, "-3"),
        ("repetition_penalty", 0.0, "0.0"),
        ("repetition_penalty", 2.01, "2.01"),
        ("max_new_tokens", -1, "-1"),
        ("min_new_tokens", -1, "-1"),
        ("min_new_tokens", 129, "129"),
        ("n", 0, "0"),
        ("logit_bias", {VOCAB: 1.0}, str(VOCAB)),
        ("logit_bias", {"-1": 1.0}, "-1"),
        ("stop_token_ids", [3, VOCAB], str(VOCAB)),
        ("stop_token_ids", [-1], "-1"),
    ],
)
def test_out_of_range_names_the_field_and_value(field, value, shown):
    p = SamplingParams.from_dict({field: value})
    with pytest.raises(ValueError, match=field) as err:
        p.validate(VOCAB)
    assert shown in str(err.value)


@pytest.mark.parametrize(
    "d",
    [
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_k": 1},
        {"top_k": VOCAB * 10},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"frequency_penalty": -2.0, "presence_penalty": 2.0},
        {"repetition_penalty": 2.0},
        {"max_new_tokens": 0},
        {"min_new_tokens": 5, "max_new_tokens": 5},
        {"logit_bias": {"0": 1.0, VOCAB - 1: -1.0}},
        {"stop_token_ids": [0, VOCAB - 1]},
        {"sampling_seed": -5},
        {"sampling_seed": 2**40},
    ],
)
def test_range_edges_accepted(d):
    SamplingParams.from_dict(d).validate(VOCAB)


def test_only_one_grammar():
    p = SamplingParams(regex="a+", json_schema="{}")
    with pytest.raises(ValueError, match="regex"):
        p.validate(VOCAB)


@pytest.mark.parametrize(
    "d, greedy",
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-7}, True),
        ({"temperature": 1e-6}, False),
        ({"temperature": 0.7}, False),
        ({"temperature": 0.7, "top_k": 1}, True),
        ({"temperature": 0.7, "top_k": 2}, False),
    ],
)
def test_is_greedy(d, greedy):
    assert SamplingParams.from_dict(d).is_greedy is greedy
