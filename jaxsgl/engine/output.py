"""After each step: append a request's new token, stream its text, decide whether it stops.

Stop strings are matched on the detokenized text, so they are found across token boundaries,
and trimmed from the output. While a request runs, the last `max_stop_len - 1` characters are
held back from the stream: they could still turn out to start a stop string.
"""

from __future__ import annotations

import time
from typing import Any

from jaxsgl.detokenizer import IncrementalDetokenizer
from jaxsgl.engine.request import Request
from jaxsgl.tokenizer import Tokenizer


class OutputState:
    """Per request: its detokenizer and how much text was already streamed."""

    def __init__(self, req: Request, tokenizer: Tokenizer | None):
        self.req = req
        p = req.params
        self.detok = (
            IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self.stops = [s for s in (p.stop or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # final text so far (stop string trimmed once finished)
        self.streamed = 0  # characters of `text` already sent
        self.streamed_ids = 0  # output ids already sent
        self.checked = 0  # characters of `text` already searched for stop strings
        self.prev_token_time: float | None = None

    def add_token(self, token: int, context_length: int, eos_ids: tuple[int, ...]) -> None:
        """Record one generated token and finish the request if it stops here."""
        req, p = self.req, self.req.params
        now = time.perf_counter()
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        req.output_ids.append(token)
        n = len(req.output_ids)
        if self.detok is not None:
            self.text += self.detok.add(token)
        if n > p.min_new_tokens or n == p.max_new_tokens:
            if (token in eos_ids and not p.ignore_eos) or token in (p.stop_token_ids or ()):
                self._finish({"type": "stop", "matched": token})
                return
            if self.stops and self._match_stop():
                return
        if n >= p.max_new_tokens or req.num_tokens >= context_length:
            self._finish({"type": "length", "length": n})

    def _match_stop(self) -> bool:
        # Only the tail can hold a new match: text before it was checked at earlier tokens.
        offset = max(0, self.checked - self.hold)
        window = self.text[offset:]
        self.checked = len(self.text)
        found = [(window.find(s), s) for s in self.stops if s in window]
        if not found:
            return False
        at, stop = min(found)
        if not self.req.params.no_stop_trim:
            self.text = self.text[: offset + at]
        self._finish({"type": "stop", "matched": stop}, flush=False)
        return True

    def _finish(self, reason: dict[str, Any], flush: bool = True) -> None:
        if flush and self.detok is not None:
            self.text += self.detok.flush()
        self.req.finish_reason = reason

    def grammar_complete(self) -> None:
        """The grammar admits no further token: the output is whole."""
        self._finish({"type": "stop", "matched": None})

    def abort(self, message: str) -> None:
        self.req.finish_reason = {"type": "abort", "message": message}

    def delta(self, finished: bool) -> tuple[str, list[int]]:
        """Text and ids not yet streamed; text that may still start a stop string waits."""
        end = len(self.text) if finished else max(self.streamed, len(self.text) - self.hold)
        text = self.text[self.streamed : end]
        self.streamed = end
        ids = self.req.output_ids[self.streamed_ids :]
        self.streamed_ids = len(self.req.output_ids)
        return text, ids
