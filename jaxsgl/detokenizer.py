"""Streaming detokenization: generated ids to text as they arrive, holding back the tail while
it may still change (an incomplete UTF-8 character split across byte tokens)."""

from __future__ import annotations

from jaxsgl.tokenizer import Tokenizer, check_token_ids


class IncrementalDetokenizer:
    """Streams the text of generated ids: `add()` returns only text that is final.

    Each step decodes a window `ids[prefix_offset:]` and emits what it adds beyond
    `decode(ids[prefix_offset:read_offset])`, the text already emitted from that window. Taking
    this difference, rather than decoding new tokens alone, keeps text that depends on the
    neighbours right: a sentencepiece decoder strips the leading space of whatever it decodes,
    so `decode(["▁world"])` is "world" though it follows "hello" as " world".

    The tail is held back while it may still change:
    - it ends with U+FFFD: an incomplete UTF-8 character (byte-level BPE splits one anywhere);
    - the last token is a `<0xNN>` byte-fallback token: the `ByteFallback` decoder turns a whole
      run of byte tokens into U+FFFDs, one per token, when the run is not valid UTF-8, so an
      emitted "€" would turn into "\\ufffd\\ufffd\\ufffd\\ufffd" once a lone lead byte follows.

    Invariant: `text` is a prefix of `tokenizer.decode(token_ids)` (so it has no U+FFFD the
    full decode lacks there), and after `flush()` equal to it.

    To keep each step O(max_held_tokens), holding has limits. Past `max_held_tokens` held tokens
    text is emitted at any complete character, even inside a byte-fallback run; past twice that
    (only invalid UTF-8 gets there) everything is emitted. Only beyond these limits can the
    invariant break: a long byte run cut there and then left invalid (generation stopping
    mid-character), or invalid bytes whose last few complete a character after all.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, *, max_held_tokens: int = 32
    ) -> None:
        if max_held_tokens < 1:
            raise ValueError(f"max_held_tokens must be >= 1, got {max_held_tokens}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_held_tokens = max_held_tokens
        self.token_ids: list[int] = []
        self._chunks: list[str] = []  # emitted text, joined on demand
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are emitted
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: list[int] | int) -> str:
        """Append generated ids; return the text that became final (often "")."""
        if self._flushed:
            raise ValueError("add() after flush(): the stream has ended")
        new_ids = check_token_ids(token_ids, self.tokenizer.vocab_size)
        if not new_ids:
            return ""
        self.token_ids.extend(new_ids)
        window_text = self._decode(self.token_ids[self._prefix_offset :])
        if not self._is_final(window_text):
            return ""
        delta = window_text[len(self._prefix_text) :]
        self._advance(window_text)
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """End the stream: return the held-back text, so that `text == decode(token_ids)`."""
        if self._flushed:
            return ""
        self._flushed = True
        if self._read_offset == len(self.token_ids):
            return ""
        window_text = self._decode(self.token_ids[self._prefix_offset :])
        delta = window_text[len(self._prefix_text) :]
        self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _is_final(self, window_text: str) -> bool:
        held = len(self.token_ids) - self._read_offset
        complete = not window_text.endswith("\ufffd")
        if held > 2 * self.max_held_tokens:
            return True
        if held > self.max_held_tokens:
            return complete
        return complete and not self._ends_in_byte_token()

    def _ends_in_byte_token(self) -> bool:
        # A skipped special token does not end a byte run: the decoder never sees it.
        skipped = self.tokenizer.special_token_ids if self.skip_special_tokens else frozenset()
        for i in reversed(range(self._prefix_offset, len(self.token_ids))):
            if self.token_ids[i] not in skipped:
                return self.token_ids[i] in self.tokenizer.byte_token_ids
        # No effective token in the window: the one before it ended a strict-mode emission, so
        # it was not a byte token (after a forced emission the guarantee is gone anyway).
        return False

    def _advance(self, window_text: str) -> None:
        """Everything is emitted: the held tokens become the next window's prefix."""
        held_text = self._decode(self.token_ids[self._read_offset :])
        # The prefix must decode to some text, or the decoder strips the leading space of the
        # first new token instead of the prefix's own (e.g. a skipped special token as prefix).
        if held_text or self._read_offset - self._prefix_offset > 2 * self.max_held_tokens:
            self._prefix_offset = self._read_offset
            self._prefix_text = held_text
        else:
            self._prefix_text = window_text
        self._read_offset = len(self.token_ids)
