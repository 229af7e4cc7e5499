"""Constrained decoding on llguidance: a grammar per request, a token bitmask per step.

A request with `regex`, `json_schema` or `ebnf` (or `choices`) gets a `Grammar`: an
llguidance matcher over the model's tokenizer. Before each sampled token the engine asks it for
the allowed tokens as a bitmask (`[W] int32`, bit v of word v // 32 set when token v may come
next; the end-of-sequence tokens only where the grammar may end); after it, the grammar consumes
the token. Where only one continuation is possible (`{"result": "` in a JSON schema) the grammar
reports it as forced tokens, which the engine appends without sampling (jump-forward).

Compiling a grammar can take a while for large schemas; `GrammarBackend.compile` runs in the
caller's thread (an HTTP handler's executor, the Generator's caller), never on the engine
thread, and keeps each compiled grammar by (kind, text), handing out copies.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("regex", "json_schema", "ebnf", "choices")
MAX_CACHED = 256
# JSON may put at most this much whitespace between tokens: a model cannot loop on spaces.
JSON_WHITESPACE = {"whitespace_flexible": False}


class Grammar:
    """One request's grammar state."""

    def __init__(self, matcher, eos_ids: Sequence[int], vocab_size: int):
        self._m = matcher
        self._eos = np.asarray(sorted(set(eos_ids)), np.int64)
        self.vocab_size = vocab_size

    def allowed_mask(self) -> np.ndarray:
        """`[W] int32` bitmask of the tokens that may come next (W = ceil(V / 32))."""
        import llguidance.numpy as lnp

        mask = lnp.allocate_token_bitmask(1, self.vocab_size)
        lnp.fill_next_token_bitmask(self._m, mask, 0)
        words = mask[0].view(np.uint32)
        # Every end-of-sequence id ends the output where the grammar's own eos may.
        eos = self._eos[self._eos < self.vocab_size]
        if len(eos):
            if self._m.is_accepting():
                words[eos // 32] |= np.uint32(1) << (eos % 32).astype(np.uint32)
            else:
                words[eos // 32] &= ~(np.uint32(1) << (eos % 32).astype(np.uint32))
        return mask[0]

    def advance(self, token: int) -> None:
        """Consume a sampled (or forced) token; an end-of-sequence id ends the grammar."""
        if token in self._eos:
            return
        if not self._m.consume_token(token):
            raise ValueError(f"token {token} violates the grammar: {self._m.get_error()}")

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows no alternative to, from here on (may be empty)."""
        return list(self._m.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """The grammar can take no further token: the output is complete."""
        return self._m.is_stopped()


class GrammarBackend:
    """Compiles grammars for one tokenizer and keeps them by (kind, text)."""

    def __init__(self, hf_tokenizer, eos_ids: Sequence[int], vocab_size: int):
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.eos_ids = tuple(eos_ids)
        self.vocab_size = vocab_size
        self._cache: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], concurrent.futures.Future] = {}
        self.num_compiled = 0
        self.num_cache_hits = 0
        self.compile_seconds: list[float] = []
        self.num_compiling = 0  # requests waiting for their grammar right now

    def compile(self, kind: str, spec: str | Sequence[str]) -> Grammar:
        """A fresh grammar state for `spec`; ValueError naming the problem if it is invalid.

        Requests that ask for the same grammar while it compiles wait for that one compile and
        count as cache hits, so a burst of identical schemas costs one compile, not one each.
        """
        key = (kind, spec if isinstance(spec, str) else json.dumps(list(spec)))
        with self._lock:
            template = self._cache.get(key)
            pending = self._pending.get(key)
            if template is None and pending is None:
                pending = self._pending[key] = concurrent.futures.Future()
                owner = True
            else:
                owner = False
            self.num_compiling += 1
        if not owner:
            try:
                if template is None:
                    template = pending.result()  # raises the owner's ValueError
            finally:
                with self._lock:
                    self.num_compiling -= 1
            with self._lock:  # one copy at a time out of the shared template
                self.num_cache_hits += 1
                matcher = template.deep_copy()
            return Grammar(matcher, self.eos_ids, self.vocab_size)
        try:
            t0 = time.perf_counter()
            matcher = self._build(kind, spec)
            seconds = time.perf_counter() - t0
        except BaseException as e:
            with self._lock:
                self.num_compiling -= 1
                del self._pending[key]
            pending.set_exception(e)
            raise
        template = matcher.deep_copy()
        with self._lock:
            self.num_compiling -= 1
            self.num_compiled += 1
            self.compile_seconds.append(seconds)
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = template
            del self._pending[key]
        pending.set_result(template)
        logger.info("compiled a %s grammar in %.1f ms", kind, seconds * 1e3)
        return Grammar(matcher, self.eos_ids, self.vocab_size)

    def _build(self, kind: str, spec: str | Sequence[str]):
        from llguidance import LLMatcher

        grammar = _grammar_text(kind, spec)
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(f"invalid {kind}: {error.strip()}")
        matcher = LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"invalid {kind}: {matcher.get_error()}")
        return matcher


def _grammar_text(kind: str, spec: str | Sequence[str]) -> str:
    """llguidance's grammar for a spec; ValueError for a spec that is not one."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if kind == "regex":
        return LLMatcher.grammar_from_regex(_text(kind, spec))
    if kind == "json_schema":
        text = _text(kind, spec)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid json_schema: not JSON ({e})") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("invalid json_schema: a schema is an object or a boolean")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_WHITESPACE)
    if kind == "ebnf":
        text = _text(kind, spec)
        try:  # SGLang's EBNF is GBNF (`root ::= ...`); anything else is taken as Lark
            lark = gbnf_to_lark(text) if "::=" in text else text
        except Exception as e:  # noqa: BLE001 - the converter raises bare Exceptions too
            raise ValueError(f"invalid ebnf: {e}") from None
        return LLMatcher.grammar_from_lark(lark)
    if kind == "choices":
        if isinstance(spec, str) or not spec or not all(isinstance(c, str) for c in spec):
            raise ValueError("choices must be a non-empty list of strings")
        return LLMatcher.grammar_from_regex("|".join(_escape(c) for c in spec))
    raise ValueError(f"unknown grammar kind {kind!r}; choose one of {KINDS}")


def _text(kind: str, spec) -> str:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{kind} must be a non-empty string")
    return spec


def _escape(text: str) -> str:
    """`text` as a regex matching exactly it."""
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)
