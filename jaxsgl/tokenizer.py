"""Tokenizers from a GGUF file or an HF folder, and chat templates.

`load_tokenizer` returns a `Tokenizer`, a thin wrapper over a `PreTrainedTokenizerFast` (`.hf`).
A GGUF file carries no `tokenizer.json`; its vocabulary, merges and special ids live in
`tokenizer.ggml.*` metadata, which transformers' GGUF tables rename and convert. Only modules that
do not import torch are used, so the serving process stays torch-free.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from collections.abc import Iterable
from pathlib import Path

import jinja2
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Turn-closing markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma). Models emit these
# to end a reply, often instead of their tokenizer's eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# GGUF special-token id keys, and the `PreTrainedTokenizerFast` argument each becomes.
_GGUF_SPECIAL_TOKENS = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "unk_token_id": "unk_token",
    "pad_token_id": "pad_token",
}


class Tokenizer:
    """Text <-> ids for one model, plus its chat template.

    Decoding never applies `clean_up_tokenization_spaces`: that heuristic rewrites text across
    token boundaries (" ." -> "."), so a stream decoded piece by piece could not reproduce it.
    """

    def __init__(self, hf: PreTrainedTokenizerFast) -> None:
        self.hf = hf

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; `add_special_tokens` adds the bos/eos the tokenizer is set to add."""
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}: {text!r:.80}")
        return self.hf.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not (yet) valid UTF-8 decode to U+FFFD."""
        ids = check_token_ids(ids, self.vocab_size)
        return self.hf.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (`[{"role": ..., "content": ...}, ...]`)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.hf.name_or_path!r} has no chat template")
        _check_messages(messages)
        try:
            return self.hf.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. str + list content
            raise ValueError(f"chat template rejected the messages: {e}") from e

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt ids for `messages`. The template writes any bos itself, so none is added."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be padded)."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @functools.cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the eos token, then every `END_OF_TURN_TOKENS` marker that
        is a token of this vocabulary and appears in the chat template."""
        ids = [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]
        template = self.chat_template or ""
        vocab = self.hf.get_vocab()
        for marker in END_OF_TURN_TOKENS:
            if marker in template and marker in vocab and vocab[marker] not in ids:
                ids.append(vocab[marker])
        return tuple(ids)

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
            template = template.get("default")
        return template or None

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of `<0xNN>` byte-fallback tokens (empty for byte-level BPE vocabularies)."""
        return frozenset(
            i for token, i in self.hf.get_vocab().items() if _BYTE_TOKEN.fullmatch(token)
        )

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        added = self.hf.backend_tokenizer.get_added_tokens_decoder()
        return frozenset(i for i, token in added.items() if token.special)


def check_token_ids(ids: Iterable[int] | int, vocab_size: int) -> list[int]:
    """`ids` as a list of ints in `[0, vocab_size)`, or `ValueError` naming the bad one."""
    if isinstance(ids, str):
        raise ValueError(f"token ids must be integers, got the string {ids!r:.80}")
    items = [ids] if not isinstance(ids, Iterable) else list(ids)
    try:
        ids = [operator.index(i) for i in items]
    except TypeError as e:
        raise ValueError(f"token ids must be integers, got {items!r:.120}") from e
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r:.120}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] needs a str 'role', got {message!r:.120}")
        if not isinstance(message.get("content", ""), str | list | None) or (
            "content" not in message and "tool_calls" not in message
        ):
            raise ValueError(f"messages[{i}] needs a str or list 'content', got {message!r:.120}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in a `.gguf` file or in an HF model folder holding `tokenizer.json`."""
    path = Path(path)
    if path.is_dir():
        hf = _load_hf_folder(path)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{str(path)!r} is a file but not a .gguf; pass a GGUF or a folder")
        hf = _load_gguf(path)
    else:
        raise ValueError(f"tokenizer path {str(path)!r} does not exist")
    logger.info("loaded tokenizer from %s (%d tokens)", path, len(hf))
    return Tokenizer(hf)


def _load_hf_folder(folder: Path) -> PreTrainedTokenizerFast:
    # PreTrainedTokenizerFast rather than AutoTokenizer: AutoTokenizer reads the model config,
    # which imports torch. tokenizer.json alone fully describes a fast tokenizer.
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer folder {str(folder)!r} has no tokenizer.json")
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer in {str(folder)!r}: {e}") from e


def _load_gguf(path: Path) -> PreTrainedTokenizerFast:
    # Only GGUF files need these (and transformers moved its GGUF mapping between releases).
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    from jaxsgl.model.gguf_file import read_gguf

    try:
        _, fields = read_gguf(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as GGUF: {e}") from e
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"GGUF {str(path)!r} has no tokenizer (no tokenizer.ggml.tokens)")
    tokenizer_dict = _renamed_fields(fields, "tokenizer")  # {"tokens": [...], "merges": ...}
    config = _renamed_fields(fields, "tokenizer_config")  # {"chat_template": ..., ...}
    # As transformers' own GGUF loader: llama.cpp adds bos to a sentencepiece ("llama")
    # vocabulary whose file does not say otherwise.
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for id_key, token_key in _GGUF_SPECIAL_TOKENS.items():
        token_id = tokenizer_dict.get(id_key)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"GGUF {str(path)!r}: {id_key} {token_id} is not a token id")
        config[token_key] = tokens[token_id]
    architecture = fields.get("general.architecture", "llama")
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot build the tokenizer of GGUF {str(path)!r}: {e}") from e
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(path), **config, **extra
    )


def _renamed_fields(fields: dict, group: str) -> dict:
    """The `tokenizer.*` GGUF fields of one transformers group, under transformers' names."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    renames = GGUF_TOKENIZER_MAPPING[group]  # {"ggml.tokens": "tokens", ...}
    return {
        new: fields[f"tokenizer.{old}"]
        for old, new in renames.items()
        if f"tokenizer.{old}" in fields
    }
