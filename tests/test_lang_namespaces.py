"""Cache namespaces from programs: identical prompts in two namespaces share no page, within one
they do; the server counts prompt and cached tokens per namespace; pins over HTTP."""

from __future__ import annotations

import pytest
from server_fixture import scrape

import jaxsgl as sgl
from serving.launch_server import build_parser, options_from_args

pytest_plugins = ["server_fixture", "lang_fixtures"]
pytestmark = pytest.mark.slow

PAGE = 16
NOTICE = (
    "Notice to all readers of the quarterly report: figures below are unaudited, rounded to "
    "the nearest thousand and subject to revision in the annual filing. Summary:"
)


@sgl.function(namespace="finance")
def report(s, topic):
    s += NOTICE + f" {topic}" + sgl.gen("summary", max_tokens=1)


def cached_pages(gen, ids: list[int], namespace: str) -> list[int]:
    """The cached pages of `ids` in `namespace`, read on the engine thread."""
    cache = gen.engine.scheduler.kv.cache
    return gen._on_engine(lambda: cache.match_prefix(ids, namespace).pages)


def test_namespaces_keep_identical_prompts_apart(backends, lang_generator):
    backend = backends["generator"]
    first = report.run(topic="revenue", temperature=0, backend=backend)
    other = report.run(topic="revenue", temperature=0, backend=backend, namespace="legal")
    again = report.run(topic="revenue", temperature=0, backend=backend)
    prompt = lang_generator.tokenizer.encode(NOTICE + " revenue", add_special_tokens=True)
    whole = (len(prompt) - 1) // PAGE * PAGE  # the last token is always computed
    assert first.get_meta_info("summary")["cached_tokens"] == 0
    assert other.get_meta_info("summary")["cached_tokens"] == 0  # not finance's pages
    assert again.get_meta_info("summary")["cached_tokens"] == whole > 0
    finance = cached_pages(lang_generator, prompt, "finance")
    legal = cached_pages(lang_generator, prompt, "legal")
    assert len(finance) == len(legal) >= whole // PAGE
    assert not set(finance) & set(legal)
    assert lang_generator.check_integrity() == {"running": 0, "waiting": 0}


def test_server_counts_tokens_per_namespace(backends, server):
    backend = backends["endpoint"]
    for namespace in ("ns-a", "ns-b", "ns-a"):
        report.run(topic="costs", temperature=0, backend=backend, namespace=namespace)
    samples = scrape(server)
    cached = {s[0]["namespace"]: s[1] for s in samples["sglang:namespace_cached_tokens_total"]}
    prompt = {s[0]["namespace"]: s[1] for s in samples["sglang:namespace_prompt_tokens_total"]}
    assert cached["ns-b"] == 0 and cached["ns-a"] >= 2 * PAGE
    assert prompt["ns-a"] == 2 * prompt["ns-b"] > 0
    server.wait_idle()


def test_pin_and_unpin_over_http(backends):
    backend = backends["endpoint"]
    text = NOTICE + " pinned over HTTP"
    pinned = backend.pin(text, "pins")
    assert pinned >= 2 * PAGE and pinned % PAGE == 0
    backend.unpin(text, "pins")
    with pytest.raises(ValueError, match="no pinned prefix"):
        backend.unpin(text, "pins")


def test_namespace_max_running_flag():
    parse = lambda *flags: options_from_args(build_parser().parse_args(list(flags)))
    options = parse("--namespace-max-running", "finance=2", "--namespace-max-running", "a=b=1")
    assert options.namespace_max_running == (("finance", 2), ("a=b", 1))
    with pytest.raises(ValueError, match="NAME=N"):
        parse("--namespace-max-running", "finance")
