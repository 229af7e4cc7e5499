"""GGUF reading: every supported tensor type, llama's q/k un-permutation, config, bad files.

The real-model tests compare against transformers' own GGUF loader (torch, test-only) on the
embedded SmolLM2-135M Q4_1 file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

from jaxsgl.config import ModelConfig
from jaxsgl.model import gguf_file
from jaxsgl.model.gguf_file import SUPPORTED_GGUF_TYPES, GGUFCheckpoint, dequantize

# Types `gguf.quants.quantize` can write, with the largest error we accept relative to max |x|:
# round-to-nearest gives at most half a step, and a step is about max|x| / levels.
QUANTIZABLE = {
    T.F32: 0.0,
    T.F16: 1e-3,
    T.BF16: 4e-3,
    T.Q8_0: 1 / 100,
    T.Q5_0: 1 / 15,
    T.Q5_1: 1 / 15,
    T.Q4_0: 1 / 7,
    T.Q4_1: 1 / 7,
}
# Types gguf cannot quantize: byte offsets of each block's float16 scales (d, and dmin where the
# type has one), from the block layouts in gguf/quants.py. Every other byte may be random.
K_QUANT_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
Q5_SCALES = {T.Q5_0: (0,), T.Q5_1: (0, 2)}

# [out, in]: not square, so a transposed read changes the shape; 512 = two K-quant blocks a row.
SHAPE = (6, 512)


def write_gguf(path: Path, tensors: dict, arch: str = "llama", **meta) -> Path:
    """A small GGUF: `tensors` maps a GGUF name to an array, or to (raw bytes, ggml type)."""
    w = gguf.GGUFWriter(str(path), arch, endianess=meta.pop("endianess", gguf.GGUFEndian.LITTLE))
    w.add_block_count(meta.pop("layers", 1))
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(meta.pop("heads", 4))
    w.add_head_count_kv(meta.pop("kv_heads", 2))
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    if (vocab := meta.pop("vocab", 8)) is not None:
        w.add_vocab_size(vocab)
    if (alignment := meta.pop("alignment", None)) is not None:
        w.add_custom_alignment(alignment)  # the data's alignment, and its general.alignment
    for key, value in meta.items():
        w.add_key_value(key, value[0], value[1])
    tensors = {"token_embd.weight": np.zeros((8, 64), np.float32), **tensors}
    for name, value in tensors.items():
        data, raw_dtype = value if isinstance(value, tuple) else (value, None)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(qtype: T, scales: tuple[int, ...], rows: int, seed: int = 0) -> np.ndarray:
    """Random block bytes `[rows, bytes per row]` with finite float16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * SHAPE[1] // block_size, type_size), dtype=np.uint8)
    for offset in scales:
        d = rng.uniform(-0.05, 0.05, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def open_one_tensor_file(tmp_path: Path, raw: np.ndarray, qtype: T) -> GGUFCheckpoint:
    """A GGUF holding `raw` as `blk.0.ffn_up.weight` of type `qtype`, opened."""
    return GGUFCheckpoint.open(
        write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (raw, qtype)})
    )


def type_name(qtype: T) -> str:
    return qtype.name


def test_supported_types():
    assert set(QUANTIZABLE) | set(K_QUANT_SCALES) == SUPPORTED_GGUF_TYPES


@pytest.mark.parametrize("qtype", list(QUANTIZABLE), ids=type_name)
def test_quantized_tensor_roundtrip(tmp_path, qtype):
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ckpt = open_one_tensor_file(tmp_path, raw, qtype)
    w = dict(ckpt.iter_tensors())["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == np.float32 and w.shape == SHAPE
    np.testing.assert_array_equal(w, gguf.quants.dequantize(raw, qtype).reshape(SHAPE))
    assert np.abs(w - x).max() <= QUANTIZABLE[qtype] * np.abs(x).max()


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES), ids=type_name)
def test_k_quant_tensor_matches_gguf_dequantize(tmp_path, qtype):
    raw = random_blocks(qtype, K_QUANT_SCALES[qtype], SHAPE[0])
    ckpt = open_one_tensor_file(tmp_path, raw, qtype)
    w = ckpt.get("model.layers.0.mlp.up_proj.weight")
    assert w.shape == SHAPE
    np.testing.assert_array_equal(w, gguf.quants.dequantize(raw, qtype).reshape(SHAPE))
    assert ckpt.hf_config()["torch_dtype"] == "quantized"


TORCH_DEQUANTIZED = [*K_QUANT_SCALES, T.Q8_0, T.Q4_0, T.Q4_1]


@pytest.mark.parametrize("qtype", TORCH_DEQUANTIZED, ids=type_name)
def test_numpy_dequantizer_agrees_with_transformers_torch(qtype):
    scales = K_QUANT_SCALES.get(qtype, (0, 2) if qtype == T.Q4_1 else (0,))
    raw = random_blocks(qtype, scales, SHAPE[0], seed=2)
    expected = torch_dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).numpy()
    np.testing.assert_array_equal(dequantize(raw, qtype, SHAPE), expected.reshape(SHAPE))


def ggml_q5_reference(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1, transcribed element by element."""
    out = []
    for block in raw.reshape(-1, GGML_QUANT_SIZES[T.Q5_1 if with_min else T.Q5_0][1]):
        d = float(block[0:2].view(np.float16)[0])
        m = float(block[2:4].view(np.float16)[0]) if with_min else 0.0
        start = 4 if with_min else 2
        qh = int(block[start : start + 4].view(np.uint32)[0])
        qs = block[start + 4 :]
        y = np.zeros(32, np.float32)
        for j in range(16):
            x0 = (int(qs[j]) & 0x0F) | (((qh >> j) << 4) & 0x10)
            x1 = (int(qs[j]) >> 4) | ((qh >> (j + 12)) & 0x10)
            offset = 0 if with_min else 16
            y[j], y[j + 16] = (x0 - offset) * d + m, (x1 - offset) * d + m
        out.append(y)
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", list(Q5_SCALES), ids=type_name)
def test_numpy_q5_dequantizer_agrees_with_ggml_reference(qtype):
    raw = random_blocks(qtype, Q5_SCALES[qtype], 2, seed=3)
    expected = ggml_q5_reference(raw, with_min=qtype == T.Q5_1)
    np.testing.assert_array_equal(dequantize(raw, qtype, (2, SHAPE[1])).reshape(-1), expected)


def test_dequantize_rejects_wrong_shape():
    with pytest.raises(ValueError, match="holds 512 values"):
        dequantize(np.zeros(512, np.float32), T.F32, (4, 64))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute`, what a GGUF stores for q/k."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_qk_unpermuted_for_llama_only(tmp_path, arch):
    rng = np.random.default_rng(4)
    # HF layout, 4 q heads and 2 kv heads of head_dim 16.
    hf = {
        "q.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "k.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "q.bias": rng.standard_normal(64).astype(np.float32),
        "k.bias": rng.standard_normal(32).astype(np.float32),
    }
    heads = {"q": 4, "k": 2}
    stored = {
        f"blk.0.attn_{n}": llama_cpp_permute(w, heads[n[0]]) if arch == "llama" else w
        for n, w in hf.items()
    }
    ckpt = GGUFCheckpoint.open(write_gguf(tmp_path / "m.gguf", stored, arch=arch))
    for n, w in hf.items():
        proj, kind = n.split(".")
        got = ckpt.get(f"model.layers.0.self_attn.{proj}_proj.{kind}")
        np.testing.assert_array_equal(got, w)
    assert ckpt.hf_config()["attention_bias"] is True


def test_hf_config_from_metadata(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf",
        {
            "blk.0.ffn_up.weight": np.ones((96, 64), np.float16),
            "output.weight": np.ones((8, 64), np.float16),
        },
        arch="qwen2",
        vocab=None,
        **{
            "qwen2.attention.key_length": (32, gguf.GGUFValueType.UINT32),
            "tokenizer.ggml.tokens": (list("abcdefghij"), gguf.GGUFValueType.ARRAY),
            "tokenizer.ggml.bos_token_id": (3, gguf.GGUFValueType.UINT32),
            "tokenizer.ggml.eos_token_id": (4, gguf.GGUFValueType.UINT32),
        },
    )
    ckpt = GGUFCheckpoint.open(path)
    assert ckpt.architecture == "qwen2" and ckpt.metadata["tokenizer.ggml.tokens"][1] == "b"
    d = ckpt.hf_config()
    assert d["architectures"] == ["Qwen2ForCausalLM"]
    assert d["vocab_size"] == 10  # from the token list, as the file has no qwen2.vocab_size
    assert d["head_dim"] == 32 and d["rms_norm_eps"] == 1e-6 and d["rope_theta"] == 500000.0
    assert d["tie_word_embeddings"] is False and d["attention_bias"] is False
    assert d["torch_dtype"] == "float16"
    assert (d["bos_token_id"], d["eos_token_id"]) == (3, 4)
    cfg = ModelConfig.from_hf_dict(d, str(path))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (64, 96, 1)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.max_position_embeddings) == (4, 2, 128)
    assert ckpt.num_tensors == 3
    assert ckpt.tensor_names() == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    ]


def test_a_file_is_parsed_once_until_it_changes(tmp_path):
    """The model and its tokenizer, and every engine of a process, share one parse of a file;
    a file written again is parsed again, and a caller's lists are its own."""
    tokens = ("tokenizer.ggml.tokens", (list("abcdefgh"), gguf.GGUFValueType.ARRAY))
    path = write_gguf(tmp_path / "m.gguf", {}, **dict([tokens]))
    before = gguf_file._parsed.cache_info()
    first = GGUFCheckpoint.open(path)
    first.metadata["tokenizer.ggml.tokens"].append("mine")
    second = GGUFCheckpoint.open(path)
    after = gguf_file._parsed.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert second.metadata["tokenizer.ggml.tokens"] == list("abcdefgh")

    path.unlink()
    name = ("general.name", ("again", gguf.GGUFValueType.STRING))
    write_gguf(path, {}, heads=8, kv_heads=4, **dict([tokens, name]))
    third = GGUFCheckpoint.open(path)
    assert gguf_file._parsed.cache_info().misses - after.misses == 1
    assert third.hf_config()["num_attention_heads"] == 8
    assert first.hf_config()["num_attention_heads"] == 4


def reference_parse(path: Path) -> tuple[list, dict]:
    """The `gguf` package's reader's view of a file: its tensors and metadata values (float32
    scalars as their shortest decimal, as jaxsgl keeps them)."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the header's counts, not metadata
            continue
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        fields[name] = value
    return reader.tensors, fields


def test_parse_agrees_with_the_gguf_package(tmp_path):
    """Every metadata value type, arrays of numbers, strings, bools and arrays, and tensors of
    element and block types at an alignment other than the default (256: the header's end
    rounds up to another offset than at 32): the same values, tensor entries and data views as
    the `gguf` package's own reader gives."""
    V = gguf.GGUFValueType
    meta = {
        "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16),
        "t.i16": (-30000, V.INT16), "t.i32": (-(2**31), V.INT32), "t.u64": (2**63 + 5, V.UINT64),
        "t.i64": (-(2**62), V.INT64), "t.f64": (0.1, V.FLOAT64), "t.bool": (True, V.BOOL),
        "t.str": ("héllo, wörld", V.STRING), "t.empty": ("", V.STRING),
        "t.floats": ([1e-5, -2.5, 3.0], V.ARRAY), "t.ints": ([1, -2, 3], V.ARRAY),
        "t.strs": (["a", "", "ü" * 300], V.ARRAY), "t.bools": ([True, False], V.ARRAY),
        "t.nested": ([[1, 2], [3]], V.ARRAY),
    }  # fmt: skip
    rng = np.random.default_rng(3)
    tensors = {
        "blk.0.ffn_up.weight": (random_blocks(T.Q4_K, K_QUANT_SCALES[T.Q4_K], SHAPE[0]), T.Q4_K),
        "blk.0.ffn_down.weight": rng.standard_normal(SHAPE).astype(np.float16),
        "blk.0.attn_norm.weight": rng.standard_normal(64).astype(np.float32),
        "blk.0.attn_q.weight": (gguf.quants.quantize(np.ones(SHAPE, np.float32), T.BF16), T.BF16),
    }
    path = write_gguf(tmp_path / "all.gguf", tensors, alignment=256, **meta)
    ours, fields = gguf_file.read_gguf(path)
    assert fields["general.alignment"] == 256
    ref_tensors, ref_fields = reference_parse(path)
    # The gguf package flattens an array of arrays ([1, 2, 3]); the file holds two arrays.
    assert fields.pop("t.nested") == [[1, 2], [3]]
    assert fields == {k: v for k, v in ref_fields.items() if k != "t.nested"}
    assert fields["llama.attention.layer_norm_rms_epsilon"] == 1e-6  # shortest decimal
    assert [t.name for t in ours] == [t.name for t in ref_tensors]
    for t, ref in zip(ours, ref_tensors, strict=True):
        assert (t.tensor_type, t.shape) == (ref.tensor_type, tuple(ref.shape.tolist())), t.name
        assert (t.data.dtype, t.data.shape) == (ref.data.dtype, ref.data.shape), t.name
        np.testing.assert_array_equal(t.data, ref.data)
        assert not t.data.flags.writeable


def test_smollm2_parse_agrees_with_the_gguf_package(smollm2_path):
    ours, fields = gguf_file.read_gguf(smollm2_path)
    ref_tensors, ref_fields = reference_parse(smollm2_path)
    assert fields == ref_fields
    assert len(fields["tokenizer.ggml.tokens"]) == 49152
    assert [(t.name, t.shape) for t in ours] == [
        (t.name, tuple(t.shape.tolist())) for t in ref_tensors
    ]
    for t, ref in zip(ours, ref_tensors, strict=True):
        np.testing.assert_array_equal(t.data, ref.data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "GGUF version 1 is not supported"),
        (lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "GGUF byte order differs"),
        (lambda b: b"GGUF", "not a readable GGUF file"),
        (lambda b: b"", "not a readable GGUF file .*empty"),
    ],
)
def test_damaged_headers(tmp_path, damage, message):
    path = write_gguf(tmp_path / "bad.gguf", {})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        GGUFCheckpoint.open(path)


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def _u64(v: int) -> bytes:
    return int(v).to_bytes(8, "little")


def _crafted(path: Path, kv: bytes = b"", tensors: bytes = b"", counts=(0, 1), tail=1 << 20):
    """A GGUF v3 header of our own bytes: `counts` (tensors, key-values), the key-value and
    tensor-entry bytes as given, then `tail` zero bytes (a file's data region)."""
    head = b"GGUF" + _u32(3) + _u64(counts[0]) + _u64(counts[1])
    path.write_bytes(head + kv + tensors + bytes(tail))
    return path


def _kv(key: str, kind: int, value: bytes) -> bytes:
    return _u64(len(key)) + key.encode() + _u32(kind) + value


@pytest.mark.parametrize(
    "case, message",
    [
        # An array header claiming 2**62 strings (or arrays) over a zero-filled region.
        ("strings", "cannot fit"),
        ("arrays", "cannot fit"),
        ("tensors", "cannot fit"),
        ("dims", "has 2147483648 dims"),
        ("nesting", "damaged GGUF data"),
        ("alignment_bool", "general.alignment is BOOL"),
        ("alignment_48", "general.alignment 48 is not a power of two"),
    ],
)
def test_corrupt_counts_fail_at_once(tmp_path, case, message):
    """Counts the file cannot hold are refused before anything is read entry by entry (a 1 MiB
    tail of zeros would otherwise be walked 8 bytes at a time), and through the tokenizer's
    path too, as a ValueError."""
    V = gguf.GGUFValueType
    path = tmp_path / f"{case}.gguf"
    if case in ("strings", "arrays"):
        item = V.STRING if case == "strings" else V.ARRAY
        _crafted(path, _kv("a", V.ARRAY, _u32(item) + _u64(2**62)))
    elif case == "tensors":
        _crafted(path, counts=(2**62, 0))
    elif case == "dims":
        _crafted(path, tensors=_u64(1) + b"t" + _u32(2**31), counts=(1, 0))
    elif case == "nesting":
        depth = 100_000
        _crafted(
            path, _kv("n", V.ARRAY, (_u32(V.ARRAY) + _u64(1)) * depth + _u32(V.UINT8) + _u64(0))
        )
    elif case == "alignment_bool":
        _crafted(path, _kv("general.alignment", V.BOOL, b"\x01"))
    else:
        _crafted(path, _kv("general.alignment", V.UINT32, _u32(48)))
    with pytest.raises(ValueError, match=message):
        GGUFCheckpoint.open(path)
    with pytest.raises(ValueError, match=message):
        gguf_file.read_gguf(path)


# --- the real SmolLM2 GGUF against transformers' loader ---------------------------------------


@pytest.fixture(scope="module")
def reference_state_dict(hf_smollm2) -> dict[str, torch.Tensor]:
    return hf_smollm2.state_dict()


def test_smollm2_tensors_equal_transformers(smollm2_path, reference_state_dict):
    ckpt = GGUFCheckpoint.open(smollm2_path)
    ref = reference_state_dict
    assert ckpt.names() == set(ref) - {"lm_head.weight"}  # tied: the file has no output.weight
    assert ckpt.num_tensors == len(ckpt.tensor_names()) == 272
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in (0, 29):
        names += [n for n in ref if n.startswith(f"model.layers.{layer}.")]
    assert len(names) == 2 + 2 * 9
    for name in names:
        ours, theirs = ckpt.get(name), ref[name].numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)  # bit-exact


def test_smollm2_config(smollm2_path):
    d = GGUFCheckpoint.open(smollm2_path).hf_config()
    cfg = ModelConfig.from_hf_dict(d, str(smollm2_path))
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.checkpoint_dtype) == (1, (2,), "quantized")


# --- files we refuse ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.gguf: GGUF file not found"):
        GGUFCheckpoint.open(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"random\.gguf: not a readable GGUF file"):
        GGUFCheckpoint.open(path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_gguf(tmp_path, keep):
    raw = gguf.quants.quantize(np.ones(SHAPE, np.float32), T.Q8_0)
    path = write_gguf(tmp_path / "cut.gguf", {"blk.0.ffn_up.weight": (raw, T.Q8_0)})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file"):
        GGUFCheckpoint.open(path)


def test_other_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt.gguf", {}, arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt\.gguf has architecture 'gpt2'; jaxsgl loads llama"):
        GGUFCheckpoint.open(path)


def test_unsupported_tensor_type(tmp_path):
    raw = random_blocks(T.IQ4_NL, (0,), SHAPE[0])
    path = write_gguf(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (raw, T.IQ4_NL)})
    with pytest.raises(ValueError, match=r"iq\.gguf: tensor 'blk.0.ffn_up.weight' has type IQ4_NL"):
        GGUFCheckpoint.open(path)


def test_llama3_rope_freqs_refused(tmp_path):
    path = write_gguf(tmp_path / "l3.gguf", {"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"l3\.gguf .*llama3-scaled GGUF is not supported"):
        GGUFCheckpoint.open(path)


def test_rope_scaling_refused(tmp_path):
    scaling = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING)}
    path = write_gguf(tmp_path / "lin.gguf", {}, **scaling)
    with pytest.raises(ValueError, match=r"lin\.gguf: rope scaling 'linear' is not supported"):
        GGUFCheckpoint.open(path)


def test_unknown_tensor_refused(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(ValueError, match=r"x\.gguf: tensor 'blk.0.attn_q_norm.weight'"):
        GGUFCheckpoint.open(path)


def test_big_endian_refused(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", {}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match=r"be\.gguf: GGUF byte order differs"):
        GGUFCheckpoint.open(path)


def test_array_where_a_number_belongs(tmp_path):
    path = write_gguf(tmp_path / "arr.gguf", {}, heads=[4, 4])
    with pytest.raises(ValueError, match=r"arr\.gguf: unexpected metadata value"):
        GGUFCheckpoint.open(path)
