"""OpenAI request bodies → jaxsgl sampling parameters, with a clear error for anything wrong."""

from __future__ import annotations

import json
from typing import Any

from serving.errors import HTTPError

ROLES = ("system", "developer", "user", "assistant", "tool")

# OpenAI name -> SGLang sampling-parameter name, for fields passed through as they are.
_DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "stop": "stop",
    "seed": "sampling_seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    # SGLang's extras on the OpenAI routes
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_new_tokens",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf",
}


def sampling_params(
    body: dict[str, Any], max_tokens_keys: tuple[str, ...], default_max_tokens: int
) -> dict[str, Any]:
    """The SGLang `sampling_params` dict for an OpenAI body (values validated later)."""
    params = {
        ours: body[theirs] for theirs, ours in _DIRECT.items() if body.get(theirs) is not None
    }
    max_tokens = next((body[k] for k in max_tokens_keys if body.get(k) is not None), None)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise HTTPError(400, f"{max_tokens_keys[0]} must be a positive integer, got {max_tokens!r}")
    params["max_new_tokens"] = max_tokens
    if isinstance(params.get("json_schema"), dict):  # SGLang takes the schema as a string
        params["json_schema"] = json.dumps(params["json_schema"])
    return params


def check_model(body: dict[str, Any], served: set[str]) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str) or model not in served:
        raise HTTPError(
            404 if isinstance(model, str) else 400,
            f"the model {model!r} does not exist; this server has {sorted(served)}",
            "model_not_found" if isinstance(model, str) else "invalid_request_error",
        )


def check_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"stream must be a boolean, got {stream!r}")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise HTTPError(400, "stream_options must be an object")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise HTTPError(400, "stream_options.include_usage must be a boolean")
    return stream, include


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Messages with plain-text content, checked: a non-empty list of known roles."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HTTPError(400, f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise HTTPError(400, f"messages[{i}].role {role!r} is not one of {list(ROLES)}")
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _text(m.get("content"), i),
            }
        )
    return out


def _text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise HTTPError(400, f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise HTTPError(400, f"messages[{i}].content must be a string or a list of text parts")


def response_format(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The sampling params that OpenAI's `response_format` asks for: a JSON schema
    (`json_object`: any JSON object), or nothing for `text`."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise HTTPError(400, "response_format.type must be text, json_object or json_schema")
    if fmt["type"] == "text":
        return {}
    if any(params.get(k) is not None for k in ("regex", "json_schema", "ebnf")):
        raise HTTPError(400, "response_format cannot be combined with regex, json_schema or ebnf")
    if fmt["type"] == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
        raise HTTPError(400, "response_format.json_schema.schema must be a JSON schema object")
    return {"json_schema": json.dumps(spec["schema"])}


def logprob_options(body: dict[str, Any], chat: bool) -> tuple[bool, int]:
    """(return logprobs, how many alternatives per token)."""
    if chat:
        want, top = body.get("logprobs") or False, body.get("top_logprobs") or 0
        if not isinstance(want, bool):
            raise HTTPError(400, f"logprobs must be a boolean, got {want!r}")
    else:
        top = body.get("logprobs")
        want, top = top is not None, top or 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise HTTPError(400, f"top_logprobs must be an integer in [0, 20], got {top!r}")
    if top and not want:
        raise HTTPError(400, "top_logprobs needs logprobs=true")
    return want, top
