"""The servers a benchmark can call: jaxsgl's (or SGLang's) native `/generate`, and any
OpenAI-compatible `/v1/completions` or `/v1/chat/completions`. Every request streams, so the
arrival time of each chunk that brings output is known (TTFT and inter-token latencies).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from jaxsgl.bench_serving.datasets import Prompt

BACKENDS = ("jaxsgl", "openai", "openai-chat")


@dataclasses.dataclass
class Reply:
    """What one streamed request brought back; times are `time.perf_counter()` readings."""

    start: float
    end: float = 0.0
    ok: bool = False
    error: str = ""
    text: str = ""
    output_ids: list[int] | None = None  # native target only
    token_times: list[float] = dataclasses.field(default_factory=list)  # chunks with output
    prompt_tokens: int | None = None  # None: the server did not say
    output_tokens: int | None = None
    cached_tokens: int = 0


class Target:
    """One server route: the request body for a prompt and how to read its stream chunks."""

    path = ""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        temperature: float = 0.0,
        ignore_eos: bool = True,
        api_key: str | None = None,
    ):
        self.url = base_url.rstrip("/") + self.path
        self.model = model
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def payload(self, prompt: Prompt) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, chunk: dict[str, Any], reply: Reply, now: float) -> None:
        raise NotImplementedError


class NativeTarget(Target):
    """`POST /generate` with `stream: true`; each chunk holds the whole output so far."""

    path = "/generate"

    def payload(self, prompt: Prompt) -> dict[str, Any]:
        params = {"max_new_tokens": prompt.output_len, "temperature": self.temperature}
        if self.ignore_eos:
            params["ignore_eos"] = True
        body: dict[str, Any] = {"sampling_params": params, "stream": True}
        if prompt.ids is not None:
            body["input_ids"] = prompt.ids
        else:
            body["text"] = prompt.text
        return body

    def read(self, chunk: dict[str, Any], reply: Reply, now: float) -> None:
        if "error" in chunk:
            reply.error = _error_message(chunk)
            return
        ids, text = chunk.get("output_ids"), chunk.get("text") or ""
        if ids is not None:
            grew = len(ids) > len(reply.output_ids or ())
            reply.output_ids = ids
        else:
            grew = len(text) > len(reply.text)
        if grew:
            reply.token_times.append(now)
        reply.text = text
        meta = chunk.get("meta_info") or {}
        reply.prompt_tokens = meta.get("prompt_tokens", reply.prompt_tokens)
        reply.output_tokens = meta.get("completion_tokens", reply.output_tokens)
        reply.cached_tokens = meta.get("cached_tokens", reply.cached_tokens) or 0


class CompletionsTarget(Target):
    """`POST /v1/completions`, streaming with a final usage chunk."""

    path = "/v1/completions"
    chat = False

    def payload(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": prompt.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = prompt.chat()
        else:
            body["prompt"] = prompt.text
        if self.model is not None:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True  # an extension SGLang and vLLM accept
        return body

    def read(self, chunk: dict[str, Any], reply: Reply, now: float) -> None:
        if "error" in chunk:
            reply.error = _error_message(chunk)
            return
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if piece:
                reply.token_times.append(now)
                reply.text += piece
        usage = chunk.get("usage")
        if usage:
            reply.prompt_tokens = usage.get("prompt_tokens")
            reply.output_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            reply.cached_tokens = details.get("cached_tokens") or 0


class ChatTarget(CompletionsTarget):
    """`POST /v1/chat/completions`: the prompt as chat messages."""

    path = "/v1/chat/completions"
    chat = True


TARGETS: dict[str, type[Target]] = {
    "jaxsgl": NativeTarget,
    "openai": CompletionsTarget,
    "openai-chat": ChatTarget,
}


async def send(http: aiohttp.ClientSession, target: Target, prompt: Prompt) -> Reply:
    """Send one prompt and read its stream to the end; failures are recorded, not raised."""
    reply = Reply(start=time.perf_counter())
    try:
        async with http.post(target.url, json=target.payload(prompt), headers=target.headers) as r:
            if r.status != 200:
                reply.error = f"HTTP {r.status}: {(await r.text())[:300]}"
            else:
                async for data in sse_data(r):
                    target.read(json.loads(data), reply, time.perf_counter())
                    if reply.error:
                        break
                reply.ok = not reply.error
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        reply.error = f"{type(e).__name__}: {e}"
    reply.end = time.perf_counter()
    return reply


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The payloads of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    pending = b""
    async for piece in response.content.iter_any():
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield data


async def fetch_json(
    http: aiohttp.ClientSession, url: str, method: str = "GET", headers: dict | None = None
) -> Any | None:
    """A route's JSON body, or None when it fails or answers something else."""
    try:
        async with http.request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
        ) as r:
            if r.status != 200:
                return None
            return await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
        return None


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk["error"]
    return str(error.get("message", error) if isinstance(error, dict) else error)
