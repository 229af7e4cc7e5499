"""Routes for programs that steer the prefix cache: pin and unpin a prefix, tokenize text;
and the `--warmup-prompts` file, whose prompts are cached and pinned before serving.

    POST /pin_prefix    {"text": "...", "namespace": "finance"}  -> {"pinned_tokens": 48}
    POST /unpin_prefix  {"input_ids": [...]}                     -> {"success": true}
    POST /tokenize      {"text": "...", "add_special_tokens": true} -> {"tokens": [...], "count": n}
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from aiohttp import web

from jaxsgl.generator import Generator
from serving.errors import HTTPError, json_body
from serving.server_state import STATE

logger = logging.getLogger(__name__)

_PREFIX_KEYS = {"text", "input_ids", "namespace"}


async def _prefix_args(request: web.Request) -> dict:
    """`text` or `input_ids` (one prompt) and `namespace` from the body, checked."""
    body = await json_body(request)
    unknown = sorted(set(body) - _PREFIX_KEYS)
    if unknown:
        raise HTTPError(400, f"unknown fields: {', '.join(unknown)}")
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None and not isinstance(text, str):
        raise HTTPError(400, "text must be a string")
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
        raise HTTPError(400, "input_ids must be a list of token ids")
    namespace = body.get("namespace") or ""
    if not isinstance(namespace, str):
        raise HTTPError(400, "namespace must be a string")
    return {"prompt": text, "input_ids": ids, "namespace": namespace}


async def pin_prefix(request: web.Request) -> web.Response:
    """Cache the prompt (computing it if needed) and keep its pages until unpinned."""
    state = request.app[STATE]
    args = await _prefix_args(request)
    state.admit({})
    pinned = await asyncio.to_thread(state.generator.pin_prefix, **args)
    return web.json_response({"pinned_tokens": pinned})


async def unpin_prefix(request: web.Request) -> web.Response:
    state = request.app[STATE]
    args = await _prefix_args(request)
    await asyncio.to_thread(state.generator.unpin_prefix, **args)
    return web.json_response({"success": True})


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    text, special = body.get("text"), body.get("add_special_tokens", True)
    if not isinstance(text, str) or not isinstance(special, bool):
        raise HTTPError(400, "tokenize takes a string `text` and a boolean `add_special_tokens`")
    if state.generator.tokenizer is None:
        raise HTTPError(400, "this model has no tokenizer")
    tokens = state.generator.tokenizer.encode(text, add_special_tokens=special)
    return web.json_response({"tokens": tokens, "count": len(tokens)})


def load_warmup_prompts(path: str | Path) -> list[dict]:
    """The prompts of a `--warmup-prompts` file: a JSON list whose items are strings or
    `{"text": ..., "namespace": ...}` objects. ValueError naming what is wrong."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read warm-up prompts from {path}: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: warm-up prompts must be a JSON list")
    prompts = []
    for i, item in enumerate(items):
        item = {"text": item} if isinstance(item, str) else item
        ok = isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"]
        if not ok or not isinstance(item.get("namespace", ""), str) or set(item) - _PREFIX_KEYS:
            raise ValueError(f"{path}: item {i} is not a prompt or {{text, namespace}}: {item!r}")
        prompts.append({"text": item["text"], "namespace": item.get("namespace", "")})
    return prompts


def warm_up(generator: Generator, prompts: list[dict]) -> int:
    """Compute and pin every prompt; returns the pinned tokens in all."""
    total = 0
    for p in prompts:
        total += generator.pin_prefix(p["text"], namespace=p["namespace"])
    logger.info("warm-up: %d prompts, %d tokens pinned", len(prompts), total)
    return total
