"""What the router reads from a request: its text (for the cache-aware policy) and the features
routing rules look at (model, prompt length, requested output length, headers).

The router forwards the client's bytes unchanged; it only peeks at these fields. Text is taken
from whichever field the route uses:

    /generate             {"text": "Hi"}                       -> "Hi"
                          {"input_ids": [[1, 2], [3]]}         -> "1 2\\n3"
    /v1/completions       {"prompt": ["a", "b"]}               -> "a\\nb"
    /v1/chat/completions  {"messages": [{"content": "sys"},
                           {"content": [{"type": "text", "text": "hi"}]}]}  -> "sys\\nhi"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestFeatures:
    """The parts of one request that routing depends on."""

    text: str = ""  # the routing text; prompt length is its length in characters
    model: str | None = None  # the `model` field, if a string
    max_tokens: int | None = None  # max_tokens / max_completion_tokens / max_new_tokens
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # lower-case names

    @property
    def prompt_chars(self) -> int:
        return len(self.text)


def request_features(body: Mapping[str, Any], headers: Mapping[str, str]) -> RequestFeatures:
    """The routing features of a parsed JSON request body and its HTTP headers."""
    model = body.get("model")
    return RequestFeatures(
        text=routing_text(body),
        model=model if isinstance(model, str) else None,
        max_tokens=requested_tokens(body),
        headers={k.lower(): v for k, v in headers.items()},
    )


def routing_text(body: Mapping[str, Any]) -> str:
    """The request's text: `text`, `prompt` or the messages' contents; token ids as digits."""
    if body.get("messages") is not None:
        return _messages_text(body["messages"])
    for key in ("text", "prompt", "input_ids"):
        if body.get(key) is not None:
            return _as_text(body[key])
    return ""


def requested_tokens(body: Mapping[str, Any]) -> int | None:
    """The output length the request asks for, if it states one."""
    params = body.get("sampling_params")
    per_request = params if isinstance(params, list) else [params]  # a batch: the longest
    candidates = [body.get("max_tokens"), body.get("max_completion_tokens")]
    candidates += [p.get("max_new_tokens") for p in per_request if isinstance(p, dict)]
    found = [_int(c) for c in candidates if _int(c) >= 0]
    return max(found) if found else None


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image"...}]
            texts = (p.get("text") for p in content if isinstance(p, dict))
            parts.extend(t for t in texts if isinstance(t, str))
    return "\n".join(parts)


def _as_text(value: Any) -> str:
    """A string, token ids (`[1, 2]` -> "1 2"), or a batch of either joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return " ".join(map(str, value))
        return "\n".join(_as_text(v) for v in value)
    return ""


def _int(value: Any) -> int:
    """`value` if it is a non-negative integer (not a bool), else -1."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1
