"""`/v1/completions`, `/v1/chat/completions` and `/v1/models`, as OpenAI's clients expect them."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from jaxsgl.engine.request import Request
from serving import openai_params as op
from serving.errors import HTTPError, error_body, json_body
from serving.server_state import STATE, ServerState
from serving.sse import SSEWriter

FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    created = int(state.started)
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "jaxsgl",
                    "root": state.model_name,
                    "max_model_len": state.generator.engine.context_length,
                }
            ],
        }
    )


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    op.check_model(body, state.served_names)
    stream, include_usage = op.check_stream(body)
    if body.get("echo"):
        raise HTTPError(400, "echo is not supported")
    want_logprobs, top = op.logprob_options(body, chat=False)
    prompt = body.get("prompt")
    texts, ids = _split_prompt(prompt)
    params = op.sampling_params(body, ("max_tokens",), 16)
    reqs, _ = await state.make_requests(texts, ids, params, want_logprobs, top)
    builder = _Builder(state, "text_completion", reqs, want_logprobs, chat=False)
    if stream:
        return await _stream(request, state, reqs, builder, include_usage)
    await _run(state, reqs, builder)
    return web.json_response(builder.final())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    op.check_model(body, state.served_names)
    stream, include_usage = op.check_stream(body)
    want_logprobs, top = op.logprob_options(body, chat=True)
    messages = op.chat_messages(body)
    ids = state.generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    room = state.generator.engine.context_length - len(ids)
    params = op.sampling_params(body, ("max_completion_tokens", "max_tokens"), max(room, 1))
    params.update(op.response_format(body, params))
    reqs, _ = await state.make_requests(None, ids, params, want_logprobs, top)
    builder = _Builder(state, "chat.completion", reqs, want_logprobs, chat=True)
    if stream:
        return await _stream(request, state, reqs, builder, include_usage)
    await _run(state, reqs, builder)
    return web.json_response(builder.final())


def _split_prompt(prompt: Any) -> tuple[Any, Any]:
    """(text prompts, token-id prompts): exactly one is set."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt, None
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return None, prompt
        if all(
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        ):
            return None, prompt
    raise HTTPError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
    )


async def _run(state: ServerState, reqs: list[Request], builder: _Builder) -> None:
    async for ev in state.events(reqs):
        builder.add(ev)


async def _stream(request, state, reqs, builder: _Builder, include_usage: bool):
    sse = SSEWriter()
    await sse.start(request)
    if builder.chat:
        for i in range(len(reqs)):
            await sse.send(builder.chunk(i, {"role": "assistant", "content": ""}, None))
    try:
        async for ev in state.events(reqs):
            delta = builder.add(ev)
            if delta is not None:
                await sse.send(delta)
        if include_usage:
            await sse.send({**builder.header("chunk"), "choices": [], "usage": builder.usage()})
    except HTTPError as e:  # aborted mid-stream: the status is sent, so the error is an event
        await sse.send(error_body(e.status, e.message, e.type))
    await sse.done()
    return sse.response


class _Builder:
    """Accumulates engine events into OpenAI responses (whole, or as stream chunks)."""

    def __init__(
        self, state: ServerState, kind: str, reqs: list[Request], logprobs: bool, chat: bool
    ):
        self.state, self.kind, self.reqs, self.logprobs, self.chat = (
            state,
            kind,
            reqs,
            logprobs,
            chat,
        )
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.index = {r.rid: i for i, r in enumerate(reqs)}
        self.text = [""] * len(reqs)
        self.meta: list[dict | None] = [None] * len(reqs)
        self.sent_logprobs = [0] * len(reqs)

    def header(self, suffix: str = "") -> dict[str, Any]:
        kind = f"{self.kind}.{suffix}" if suffix and self.chat else self.kind
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.model_name,
        }

    def add(self, ev: dict) -> dict | None:
        """Record one event; returns the stream chunk it makes (None if it adds nothing)."""
        i = self.index[ev["rid"]]
        self.text[i] += ev["text"]
        self.meta[i] = ev["meta_info"]
        finish = FINISH[ev["meta_info"]["finish_reason"]["type"]] if ev["finished"] else None
        logprobs = self._logprobs(i, ev["meta_info"], new_only=True)
        if not ev["text"] and finish is None and logprobs is None:
            return None
        delta = {"content": ev["text"]} if self.chat else ev["text"]
        return self.chunk(i, delta, finish, logprobs)

    def chunk(self, i: int, delta, finish: str | None, logprobs=None) -> dict:
        if self.chat:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.header("chunk"), "choices": [choice]}

    def _logprobs(self, i: int, meta: dict, new_only: bool) -> dict | None:
        if not self.logprobs:
            return None
        entries = meta.get("output_token_logprobs", [])
        tops = meta.get("output_top_logprobs") or [None] * len(entries)
        start = self.sent_logprobs[i] if new_only else 0
        self.sent_logprobs[i] = len(entries)
        if new_only and start == len(entries):
            return None
        decode = self.state.token_text
        rows = list(zip(entries[start:], tops[start:], strict=True))
        if self.chat:
            return {
                "content": [
                    {
                        "token": decode(t),
                        "logprob": lp,
                        "bytes": list(decode(t).encode()),
                        "top_logprobs": [
                            {"token": decode(tt), "logprob": tl, "bytes": list(decode(tt).encode())}
                            for tl, tt, _ in top or []
                        ],
                    }
                    for (lp, t, _), top in rows
                ]
            }
        return {
            "tokens": [decode(t) for (_, t, _), _ in rows],
            "token_logprobs": [lp for (lp, _, _), _ in rows],
            "top_logprobs": [{decode(tt): tl for tl, tt, _ in top or []} for _, top in rows],
            "text_offset": [],
        }

    def usage(self) -> dict[str, int]:
        n = max(r.params.n for r in self.reqs)
        firsts = [m for k, m in enumerate(self.meta) if k % n == 0 and m]
        prompt = sum(m["prompt_tokens"] for m in firsts)
        cached = sum(m["cached_tokens"] for m in firsts)
        completion = sum(m["completion_tokens"] for m in self.meta if m)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def final(self) -> dict[str, Any]:
        choices = []
        for i, meta in enumerate(self.meta):
            finish = FINISH[meta["finish_reason"]["type"]]
            self.sent_logprobs[i] = 0
            logprobs = self._logprobs(i, meta, new_only=False)
            if self.chat:
                message = {"role": "assistant", "content": self.text[i]}
                choices.append(
                    {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": self.text[i],
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }
                )
        return {**self.header(), "choices": choices, "usage": self.usage()}
