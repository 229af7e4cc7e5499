"""Where programs run: the in-process `Generator`, or a server (`RuntimeEndpoint`).

A backend answers a few calls — generate (whole or streamed), prefill, token logprobs of
prompts, tokenize, pin and unpin — each for one cache namespace. Choice scoring for
`select` is built on those, so every backend scores the same way.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

# `max_new_tokens` 0: compute (and cache) the prompt; the one token sampled is ignored.
PREFILL = {"max_new_tokens": 0, "temperature": 0.0}


class Backend:
    """The calls a program makes; subclasses implement the underscored ones."""

    renderer: Callable[[list[dict]], str] | None = None  # a conversation's template text

    def render_chat(self, messages: list[dict]) -> str:
        if self.renderer is None:
            raise ValueError("this backend's model has no chat template: roles are unavailable")
        return self.renderer(messages)

    def generate(self, text: str, params: dict, namespace: str) -> dict:
        """`{"text", "meta_info"}` of one generation after `text`."""
        raise NotImplementedError

    def stream(self, text: str, params: dict, namespace: str) -> Iterator[tuple[str, dict | None]]:
        """(new text, None) pieces, then ("", meta_info) when the generation finished."""
        raise NotImplementedError

    def prefill(self, text: str, namespace: str) -> dict:
        """Compute `text` so that it is cached; its meta_info (`prompt_tokens`, ...)."""
        return self.generate(text, PREFILL, namespace)["meta_info"]

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    def prompt_logprobs(self, prompts: list[list[int]], start: int, namespace: str) -> list[dict]:
        """meta_info of each prompt with `input_token_logprobs` from position `start` on."""
        raise NotImplementedError

    def pin(self, text: str, namespace: str) -> int:
        """Cache and pin `text`'s whole pages; the pinned tokens."""
        raise NotImplementedError

    def unpin(self, text: str, namespace: str) -> None:
        raise NotImplementedError

    def score(self, prefix: str, choices: tuple[str, ...], namespace: str) -> list[list[float]]:
        """Each choice's token logprobs after `prefix`. The prompts are `prefix`'s ids then the
        choice's own ids, so every choice is scored on exactly its tokens; the batch shares
        the prefix, which is computed once and hit by the others."""
        prefix_ids = self.tokenize(prefix, True)
        prompts = [prefix_ids + self.tokenize(c, False) for c in choices]
        metas = self.prompt_logprobs(prompts, len(prefix_ids), namespace)
        return [[lp for lp, _, _ in m["input_token_logprobs"]] for m in metas]


class GeneratorBackend(Backend):
    """Programs on an in-process `Generator` (`set_default_backend(generator)` wraps it)."""

    def __init__(self, generator: Any):
        self.generator = generator
        tok = generator.tokenizer
        if tok is not None and tok.chat_template is not None:  # the model's own rendering
            self.renderer = functools.partial(tok.render_chat, add_generation_prompt=False)

    def generate(self, text: str, params: dict, namespace: str) -> dict:
        return self.generator.generate(text, params, namespace=namespace)

    def stream(self, text: str, params: dict, namespace: str) -> Iterator[tuple[str, dict | None]]:
        for ev in self.generator.generate(text, params, stream=True, namespace=namespace):
            yield ev["text"], None
            if ev["finished"]:
                yield "", ev["meta_info"]

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.generator.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.generator.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def prompt_logprobs(self, prompts: list[list[int]], start: int, namespace: str) -> list[dict]:
        outs = self.generator.generate(
            input_ids=prompts,
            sampling_params=PREFILL,
            return_logprob=True,
            logprob_start_len=start,
            namespace=namespace,
        )
        return [o["meta_info"] for o in outs]

    def pin(self, text: str, namespace: str) -> int:
        return self.generator.pin_prefix(text, namespace=namespace)

    def unpin(self, text: str, namespace: str) -> None:
        self.generator.unpin_prefix(text, namespace=namespace)


_default: Backend | None = None
_default_lock = threading.Lock()


def as_backend(backend: Any) -> Backend:
    """A `Backend` as is; a `Generator` wrapped in a `GeneratorBackend`."""
    if isinstance(backend, Backend):
        return backend
    if hasattr(backend, "generate") and hasattr(backend, "pin_prefix"):
        return GeneratorBackend(backend)
    raise ValueError(f"not a backend (a Generator or RuntimeEndpoint): {backend!r:.80}")


def set_default_backend(backend: Any) -> Backend:
    """The backend programs run on when `run` is given none; returns it (wrapped)."""
    global _default
    with _default_lock:
        _default = as_backend(backend)
        return _default


def get_default_backend() -> Backend | None:
    return _default


def resolve_backend(backend: Any = None) -> Backend:
    if backend is not None:
        return as_backend(backend)
    if _default is None:
        raise ValueError("no backend: pass backend=... or call set_default_backend(...)")
    return _default
