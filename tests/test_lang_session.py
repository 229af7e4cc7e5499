"""Warm-up: a session pins the prefixes its programs produced. On a deliberately small KV pool a
flood of unrelated requests forces eviction; the pinned prefix survives it, and after the
session closes the next flood evicts it. `--warmup-prompts` files pin the same way."""

from __future__ import annotations

import json

import pytest

import jaxsgl as sgl
from jaxsgl.generator import Generator
from serving.cache_api import load_warmup_prompts, warm_up

pytestmark = pytest.mark.slow

PAGE = 16
SYSTEM = (
    "You are the support assistant of a small bookshop. Answer in one sentence, be polite, "
    "never invent prices, and point customers to the opening hours: nine to six on weekdays."
)


@pytest.fixture(scope="module")
def small_gen():
    # 40 pages of 16 tokens: a handful of prompts fill it.
    with Generator(max_total_tokens=640, context_length=512, warmup=False, progress=False) as gen:
        yield gen
        assert gen.check_integrity() == {"running": 0, "waiting": 0}


@sgl.function
def system_prompt(s):
    s += sgl.system(SYSTEM)


def flood(gen: Generator, tag: str) -> None:
    """Twelve unrelated prompts of about 100 tokens: more than the pool holds."""
    filler = "the quick brown fox jumps over the lazy dog while it rains " * 8
    prompts = [f"{tag} {i}: {filler}" for i in range(12)]
    gen.generate(prompts, {"max_new_tokens": 0})


def cached_tokens(gen: Generator, ids: list[int]) -> int:
    cache = gen.engine.scheduler.kv.cache
    return gen._on_engine(lambda: cache.match_prefix(ids, "").num_tokens)


def test_pinned_prefix_survives_a_flood_and_is_evicted_after_unpinning(small_gen):
    with sgl.session(small_gen) as session:
        state = session.run(system_prompt)
        ids = small_gen.tokenizer.encode(state.text(), add_special_tokens=True)
        [(_, _, pinned)] = session.pins
        assert pinned == len(ids) // PAGE * PAGE >= 2 * PAGE
        evicted = small_gen.engine.scheduler.kv.num_evicted_pages
        flood(small_gen, "first flood")
        assert small_gen.engine.scheduler.kv.num_evicted_pages > evicted  # eviction happened
        assert cached_tokens(small_gen, ids) == pinned
        small_gen.check_integrity()
    assert not session.pins
    flood(small_gen, "second flood")
    assert cached_tokens(small_gen, ids) < pinned
    small_gen.check_integrity()


def test_warmup_prompts_file_pins_each_prompt(small_gen, tmp_path):
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps([SYSTEM, {"text": SYSTEM, "namespace": "shop"}]))
    prompts = load_warmup_prompts(path)
    assert prompts == [{"text": SYSTEM, "namespace": ""}, {"text": SYSTEM, "namespace": "shop"}]
    total = warm_up(small_gen, prompts)
    ids = small_gen.tokenizer.encode(SYSTEM, add_special_tokens=True)
    assert total == 2 * (len(ids) // PAGE * PAGE) > 0
    flood(small_gen, "warm flood")
    assert cached_tokens(small_gen, ids) == total // 2
    for p in prompts:
        small_gen.unpin_prefix(p["text"], namespace=p["namespace"])
    with pytest.raises(ValueError, match="no pinned prefix"):
        small_gen.unpin_prefix(SYSTEM)


@pytest.mark.parametrize(
    "content, message",
    [("{", "cannot read"), ('{"a": 1}', "JSON list"), ('[{"text": ""}]', "item 0")],
)
def test_warmup_prompts_file_errors_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_warmup_prompts(path)


def test_server_refuses_an_unreadable_warmup_file_before_loading_the_model(tmp_path, capsys):
    from serving.launch_server import main

    assert main(["--warmup-prompts", str(tmp_path / "missing.json")]) == 2
    assert "cannot read warm-up prompts" in capsys.readouterr().err
