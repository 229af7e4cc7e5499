"""The OpenAPI 3 description of the public routes, served at `/openapi.json`.

It is what clients and fuzzers read: request bodies are described as the handlers accept them
(extra fields allowed where OpenAI clients send them), every route lists its 400.
"""

from __future__ import annotations

from typing import Any

_num = {"type": "number"}
_int = {"type": "integer"}
_bool = {"type": "boolean"}
_str = {"type": "string"}
_stop = {"oneOf": [_str, {"type": "array", "items": _str, "maxItems": 4}]}
_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_prompt = {"type": "string", "minLength": 1}  # a prompt needs at least one token
_prompt_ids = {**_ids, "minItems": 1}
_top_k = {"oneOf": [{"type": "integer", "enum": [-1]}, {"type": "integer", "minimum": 1}]}

_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    "top_k": _top_k,
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 4},
    "stop": _stop,
    "seed": _int,
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 2},
    "ignore_eos": _bool,
    "stream": _bool,
    "stream_options": {"type": "object", "properties": {"include_usage": _bool}},
    "regex": _str,
    "json_schema": {"oneOf": [_str, {"type": "object"}]},
    "ebnf": _str,
}

_COMPLETION = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "model": _str,
        "prompt": {
            "oneOf": [_prompt, {"type": "array", "items": _prompt, "minItems": 1}, _prompt_ids]
        },
        "max_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_SAMPLING,
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": _str,
    },
}

_CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": _str,
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": _bool,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "properties": {"name": _str, "schema": {"type": "object"}, "strict": _bool},
                },
            },
        },
        **_SAMPLING,
    },
}

_NATIVE_SAMPLING = {
    "type": "object",
    "properties": {
        "max_new_tokens": {"type": "integer", "minimum": 0},
        "min_new_tokens": {"type": "integer", "minimum": 0},
        "temperature": _SAMPLING["temperature"],
        "top_p": _SAMPLING["top_p"],
        "top_k": _top_k,
        "min_p": _SAMPLING["min_p"],
        "stop": _stop,
        "stop_token_ids": _ids,
        "ignore_eos": _bool,
        "n": _SAMPLING["n"],
        "sampling_seed": _int,
        "regex": _str,
        "json_schema": _str,
        "ebnf": _str,
    },
    "additionalProperties": False,
}

_GENERATE = {
    "type": "object",
    "oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}],
    "properties": {
        "text": {"oneOf": [_prompt, {"type": "array", "items": _prompt, "minItems": 1}]},
        "input_ids": _prompt_ids,
        "sampling_params": _NATIVE_SAMPLING,
        "stream": _bool,
        "return_logprob": _bool,
        "logprob_start_len": {"type": "integer", "minimum": -1},
        "top_logprobs_num": {"type": "integer", "minimum": 0, "maximum": 20},
        "rid": _str,
    },
    "additionalProperties": False,
}

_ERROR = {
    "description": "bad input: an OpenAI-style error body",
    "content": {"application/json": {"schema": {"type": "object", "required": ["error"]}}},
}
_OK_JSON = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}


def _post(schema: dict, summary: str, streams: bool) -> dict[str, Any]:
    ok = dict(_OK_JSON)
    if streams:
        ok = {
            "description": "ok (text/event-stream when stream is true)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": _str},
            },
        }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": ok, "400": _ERROR, "401": _ERROR},
        }
    }


def _get(summary: str, content_type: str = "application/json") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "ok", "content": {content_type: {"schema": {}}}}},
        }
    }


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "jaxsgl",
            "version": "1",
            "description": "OpenAI-compatible and SGLang-native LLM serving on JAX.",
        },
        "paths": {
            "/v1/completions": _post(_COMPLETION, "OpenAI text completion", True),
            "/v1/chat/completions": _post(_CHAT, "OpenAI chat completion", True),
            "/generate": _post(_GENERATE, "SGLang native generation", True),
            "/v1/models": _get("served models"),
            "/health": _get("liveness", "text/plain"),
            "/health_generate": _get("one real generation", "text/plain"),
            "/model_info": _get("model information"),
            "/get_model_info": _get("model information (alias)"),
            "/server_info": _get("options, counters and page accounting"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            "/flush_cache": {
                "post": {
                    "summary": "drop the prefix cache (refused while busy)",
                    "responses": {"200": {"description": "flushed"}, "400": _ERROR},
                }
            },
            "/start_profile": {
                "post": {
                    "summary": "start a JAX profiler trace ({output_dir, num_steps}, optional)",
                    "responses": {"200": {"description": "started"}, "400": _ERROR},
                }
            },
            "/stop_profile": {
                "post": {
                    "summary": "stop the running trace and write it",
                    "responses": {"200": {"description": "written"}, "400": _ERROR},
                }
            },
        },
    }
