"""`RuntimeEndpoint`: programs on a jaxsgl server, through its native HTTP API.

    set_default_backend(RuntimeEndpoint("http://localhost:30000", api_key="..."))

Uses `/generate` (whole and streamed), `/tokenize`, `/pin_prefix`, `/unpin_prefix` and
`/model_info` (for the chat template, rendered here). Standard library HTTP only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from jaxsgl.lang.backend import PREFILL, Backend
from jaxsgl.lang.chat import TemplateRenderer


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        """Connects at once (reads `/model_info`); ValueError if nothing answers there."""
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.model_info = self._request("GET", "/model_info")
        template = self.model_info.get("chat_template")
        if template:
            info = self.model_info
            self.renderer = TemplateRenderer(template, info.get("bos_token"), info.get("eos_token"))

    def generate(self, text: str, params: dict, namespace: str) -> dict:
        body = {"text": text, "sampling_params": params, "namespace": namespace}
        return self._request("POST", "/generate", body)

    def stream(self, text: str, params: dict, namespace: str) -> Iterator[tuple[str, dict | None]]:
        body = {"text": text, "sampling_params": params, "namespace": namespace, "stream": True}
        sent, meta = "", None
        with self._open("POST", "/generate", body) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data:"))
                if "error" in chunk:
                    raise ValueError(f"generation failed: {chunk['error'].get('message')}")
                yield chunk["text"][len(sent) :], None
                sent, meta = chunk["text"], chunk["meta_info"]
        if meta is None:
            raise ValueError("the stream ended without a result")
        yield "", meta

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        body = {"text": text, "add_special_tokens": add_special_tokens}
        return self._request("POST", "/tokenize", body)["tokens"]

    def prompt_logprobs(self, prompts: list[list[int]], start: int, namespace: str) -> list[dict]:
        body = {
            "input_ids": prompts,
            "sampling_params": PREFILL,
            "return_logprob": True,
            "logprob_start_len": start,
            "namespace": namespace,
        }
        return [out["meta_info"] for out in self._request("POST", "/generate", body)]

    def pin(self, text: str, namespace: str) -> int:
        body = {"text": text, "namespace": namespace}
        return self._request("POST", "/pin_prefix", body)["pinned_tokens"]

    def unpin(self, text: str, namespace: str) -> None:
        self._request("POST", "/unpin_prefix", {"text": text, "namespace": namespace})

    def _open(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, headers=self.headers, method=method
        )
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ValueError(f"{method} {path} failed with {e.code}: {_message(e)}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {self.base_url}: {e.reason}") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())


def _message(error: urllib.error.HTTPError) -> str:
    raw = error.read()
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:300]
