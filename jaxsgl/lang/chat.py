"""Chat roles as text: the markers a model's chat template puts around each message.

A role's prefix and suffix are read off the template itself: render the conversation so far
plus a message whose content is a marker, drop the rendering of the conversation so far, and
split at the marker. For ChatML (SmolLM2) a first `user` message gives
prefix "<|im_start|>system\\n<default system prompt><|im_end|>\\n<|im_start|>user\\n" and
suffix "<|im_end|>\\n", exactly what the template writes for a whole conversation.
"""

from __future__ import annotations

import functools
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_MARK = "\x00content\x00"


def role_affixes(render, history: list[dict], role: str) -> tuple[str, str]:
    """(prefix, suffix) of a `role` message after `history`; `render(messages)` is the
    template's text for a conversation (no generation prompt)."""
    full = render([*history, {"role": role, "content": _MARK}])
    before = render(history) if history else ""
    common = len(os.path.commonprefix([before, full]))
    if _MARK not in full[common:]:
        raise ValueError(f"the chat template does not write the content of a {role} message")
    prefix, suffix = full[common:].split(_MARK, 1)
    return prefix, suffix


class TemplateRenderer:
    """A Jinja chat template rendered as transformers renders it (sandboxed, blocks trimmed),
    for clients without the model's tokenizer."""

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None):
        self.template = _compile(template)
        self.tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
        )


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
