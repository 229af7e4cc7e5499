"""The router's grading rules, the request features they read, and its flags."""

from __future__ import annotations

import json

import pytest

from jaxsgl.router.__main__ import build, build_parser
from jaxsgl.router.app import ROUTER
from jaxsgl.router.features import RequestFeatures, request_features, routing_text
from jaxsgl.router.rules import Rules, load_rules, parse_rules

RULES = parse_rules(
    {
        "default_pool": "main",
        "rules": [
            {"pool": "big", "when": {"model": ["llama-3-70b", "qwen-72b"]}},
            {"pool": "batch", "when": {"header": {"X-Request-Class": "batch"}}},
            {"pool": "light", "when": {"max_prompt_chars": 20, "max_tokens_at_most": 16}},
            {"pool": "long", "when": {"min_prompt_chars": 100, "max_tokens_at_least": 1000}},
        ],
    }
)


def pool(body: dict, headers: dict | None = None) -> str:
    return RULES.pool_for(request_features(body, headers or {}))


def test_first_matching_rule_names_the_pool():
    assert pool({"model": "llama-3-70b", "prompt": "hi", "max_tokens": 4}) == "big"
    assert pool({"model": "qwen-72b", "messages": []}) == "big"
    # the model rule comes first, the header rule second
    assert pool({"model": "qwen-72b"}, {"X-Request-Class": "batch"}) == "big"
    assert pool({"model": "small"}, {"x-request-class": "batch"}) == "batch"
    assert pool({"model": "small"}, {"X-Request-Class": "interactive"}) == "main"


def test_length_conditions_bound_both_prompt_and_output():
    assert pool({"prompt": "a" * 20, "max_tokens": 16}) == "light"
    assert pool({"prompt": "a" * 21, "max_tokens": 16}) == "main"  # prompt too long
    assert pool({"prompt": "a" * 20, "max_tokens": 17}) == "main"  # output too long
    assert pool({"text": "short", "sampling_params": {"max_new_tokens": 8}}) == "light"
    # no stated output length matches neither bound on it
    assert pool({"text": "short"}) == "main"
    assert pool({"prompt": "x" * 100, "max_completion_tokens": 1000}) == "long"
    assert pool({"prompt": "x" * 99, "max_completion_tokens": 1000}) == "main"
    # a batch counts its longest member
    batch = {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 4}, {"max_new_tokens": 64}]}
    assert pool(batch) == "main"


def test_routing_text_of_each_route():
    assert routing_text({"text": "Hi"}) == "Hi"
    assert routing_text({"text": ["a", "b"]}) == "a\nb"
    assert routing_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert routing_text({"input_ids": [[1, 2], [3]]}) == "1 2\n3"
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
    ]
    assert routing_text({"messages": messages, "prompt": "ignored"}) == "sys\nhi"
    assert routing_text({"messages": "not a list"}) == ""
    assert routing_text({}) == ""


def test_odd_field_types_are_not_features():
    f = request_features({"model": 7, "max_tokens": True, "prompt": {"a": 1}}, {})
    assert f == RequestFeatures(text="", model=None, max_tokens=None, headers={})
    assert request_features({"max_tokens": -3}, {}).max_tokens is None


def test_a_rule_without_conditions_matches_everything_and_pools_are_listed():
    rules = parse_rules([{"pool": "a", "when": {"model": "m"}}, {"pool": "b", "when": {}}])
    assert rules.default_pool == "default"
    assert rules.pools == {"a", "b", "default"}
    assert rules.pool_for(RequestFeatures(text="anything")) == "b"
    assert Rules().pool_for(RequestFeatures()) == "default"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rules", "must be a list of rules"),
        ({"rules": [], "pools": {}}, "unknown keys in rules: pools"),
        ({"rules": {}}, "'rules' must be a list"),
        ({"default_pool": ""}, "default_pool must be a non-empty string"),
        ([{"when": {}}], "rule 0 must be an object with 'pool'"),
        ([{"pool": "a", "when": {}, "extra": 1}], "rule 0 must be an object"),
        ([{"pool": "a"}, {"pool": 3}], "rule 1 pool must be a non-empty string"),
        ([{"pool": "a", "when": []}], "'when' must be an object"),
        ([{"pool": "a", "when": {"max_chars": 3}}], "unknown conditions ['max_chars']"),
        ([{"pool": "a", "when": {"max_prompt_chars": -1}}], "max_prompt_chars must be a non-neg"),
        ([{"pool": "a", "when": {"max_tokens_at_most": "8"}}], "max_tokens_at_most must be"),
        ([{"pool": "a", "when": {"min_prompt_chars": True}}], "min_prompt_chars must be"),
        ([{"pool": "a", "when": {"model": []}}], "model must be a string or a non-empty list"),
        ([{"pool": "a", "when": {"header": "X-A"}}], "header must be an object"),
        ([{"pool": "a", "when": {"header": {"X-A": 1}}}], "header X-A must be a string"),
    ],
)
def test_bad_rules_are_value_errors_that_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as e:
        parse_rules(spec)
    assert message in str(e.value)


def test_load_rules_from_a_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([{"pool": "x", "when": {"header": {"X-A": ["1", "2"]}}}]))
    rules = load_rules(path)
    assert rules.pool_for(RequestFeatures(headers={"x-a": "2"})) == "x"
    assert rules.pool_for(RequestFeatures(headers={"x-a": "3"})) == "default"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read rules file"):
        load_rules(path)
    with pytest.raises(ValueError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pool-workers", "light"], "wants POOL=URL"),
        (["--worker-urls", "localhost:30000"], "http:// or https://"),
        (["--worker-urls", "http://a:1", "http://a:1/"], "already registered"),
        (["--rules", "/nonexistent/rules.json"], "cannot read rules file"),
        (["--health-check-interval", "0"], "must be positive"),
        (["--max-retries", "-1"], "--max-retries >= 0"),
    ],
)
def test_bad_router_flags_are_value_errors(flags, message):
    with pytest.raises(ValueError) as e:
        build(build_parser().parse_args(flags))
    assert message in str(e.value)


def test_router_flags_put_workers_in_pools(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"default_pool": "main", "rules": []}))
    args = ["--worker-urls", "http://a:1/", "--pool-workers", "x=http://b:1,http://c:1"]
    app = build(build_parser().parse_args([*args, "--rules", str(rules)]))
    workers = app[ROUTER].workers
    assert {u: w.pool for u, w in workers.workers.items()} == {
        "http://a:1": "main",
        "http://b:1": "x",
        "http://c:1": "x",
    }
