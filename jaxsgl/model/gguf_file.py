"""GGUF checkpoints (llama.cpp's single-file format) as HF-named float32 numpy tensors.

The file's header, metadata and tensor table are parsed here; tensors stay memory-mapped and
dequantize with the `gguf` package's numpy code, so serving a GGUF needs no torch. Two things a
GGUF does differently from an HF checkpoint are undone here:

- names: llama.cpp's `blk.{i}.attn_q.weight` becomes `model.layers.{i}.self_attn.q_proj.weight`;
- llama's q/k projections are stored with each head's rows interleaved for llama.cpp's rotary
  kernel; they are put back in HF's half-split order (see `_unpermute_rows`).

Metadata becomes an HF `config.json`-style dict for `jaxsgl.config.ModelConfig.from_hf_dict`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from math import prod
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

logger = logging.getLogger(__name__)

_T = GGMLQuantizationType
_FLOAT_TYPES = {_T.F32: "float32", _T.F16: "float16", _T.BF16: "bfloat16"}

# Every type here dequantizes through `gguf.quants` bit-for-bit like transformers' independent
# torch dequantizer (Q5_0/Q5_1, which it lacks, like a port of ggml's C reference); the tests check.
SUPPORTED_GGUF_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {
        *_FLOAT_TYPES,
        _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
        _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
    }
)  # fmt: skip

# GGUF `general.architecture` -> HF `architectures` entry.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp's convert permutes q/k for these only; its Qwen2 converter writes them as HF does.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def dequantize(
    tensor_data: np.ndarray, ggml_type: GGMLQuantizationType | int, shape: tuple[int, ...]
) -> np.ndarray:
    """One tensor's stored data -> float32 values of `shape`.

    `tensor_data` is a `GGUFTensor`'s data (block bytes for quantized types); `shape` is
    the numpy (row-major) shape, i.e. the GGUF dims reversed: `[out_features, in_features]` for a
    linear weight.
    """
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in SUPPORTED_GGUF_TYPES:
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported")
    values = gguf.quants.dequantize(tensor_data, qtype)
    if values.size != prod(shape):
        raise ValueError(
            f"GGUF {qtype.name} data holds {values.size} values, not {prod(shape)} for {shape}"
        )
    if qtype == _T.F32:
        # F32 comes back as a view of the read-only memory map; hand out memory of our own.
        values = values.copy()
    return values.reshape(shape)


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q/k weight `[N*H, D]` or bias `[N*H]`.

    HF rotates the pair (row j, row j + H/2) of each head; llama.cpp's converter interleaves each
    head's rows so the pair sits side by side (its `permute`: reshape `[N, 2, H/2]`, swap the last
    two axes). For H=4, a head's HF rows [a0 a1 b0 b1] are stored [a0 b0 a1 b1]; reading the
    stored rows as `[N, H/2, 2]` and swapping back gives [a0 a1 b0 b1].
    """
    half = w.shape[0] // num_heads // 2
    assert half * 2 * num_heads == w.shape[0], (w.shape, num_heads)
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: its GGUF name and type, its dims in GGUF order (fastest-moving
    first) and its data, a read-only view of the file: elements for F32/F16 (numpy shape, the
    dims reversed), block bytes for other types (the last axis in bytes), as `dequantize` takes."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class ByteOrderError(ValueError):
    """The file was written for the other byte order (`gguf.quants` reads the host's)."""


def read_gguf(path: str | os.PathLike[str]) -> tuple[list[GGUFTensor], dict[str, Any]]:
    """The file at `path` parsed: its tensors (memory-mapped) and its metadata values.

    Both the model and its tokenizer read the file, and every engine of a process opens it
    again, so the parse is kept per file, keyed by its path, size, inode and modification time.
    Lists are copied for each caller, which may change its own.
    """
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_ino, st.st_mtime_ns)
    tensors, fields = _parsed(*key)
    return tensors, {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, inode: int, mtime_ns: int) -> tuple[list[GGUFTensor], dict]:
    with open(path, "rb") as f:
        if size == 0:
            raise ValueError("the file is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _GGUFParser(mm).parse()
    except (struct.error, RecursionError) as e:  # a count or a nesting the bytes do not hold
        raise ValueError(f"damaged GGUF data ({type(e).__name__}: {e})") from None


# Metadata value types of fixed size: their format character (for `struct` and numpy alike).
_V = GGUFValueType
_SCALARS = {
    _V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
    _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d",
}  # fmt: skip
# Tensor types stored as plain elements; every other type is stored as block bytes.
_ELEMENT_TYPES = {_T.F32: np.float32, _T.F16: np.float16}
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml's
# The fewest bytes an entry can take, to refuse a count the rest of the file cannot hold before
# reading entry by entry: a key-value (key length, type, one byte), a tensor entry (name length,
# dims count, type, offset), an array item of a type of variable size (string, array).
_MIN_FIELD_BYTES, _MIN_TENSOR_BYTES = 13, 24
_MIN_ITEM_BYTES = {_V.STRING: 8, _V.ARRAY: 12}


class _GGUFParser:
    """GGUF v2/v3, little-endian, in one pass over the memory map: the header, the metadata,
    the tensor table. Strings and numbers are read with `struct` straight from the map (the
    `gguf` package's reader makes a numpy view of every element of the vocabulary's arrays: 3.56
    s for SmolLM2's 98k strings, against 0.15 s here)."""

    def __init__(self, mm: mmap.mmap):
        self.mm, self.offset = mm, 0

    def parse(self) -> tuple[list[GGUFTensor], dict[str, Any]]:
        if self._read("<I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic number")
        version = self._read("<I")
        if version not in (2, 3):
            if version and version & 0xFFFF == 0:  # a small number in the other byte order
                raise ByteOrderError("GGUF byte order differs from this machine's")
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        num_tensors, num_fields = self._read("<Q"), self._read("<Q")
        self._check_count(num_fields, _MIN_FIELD_BYTES, "metadata entries")
        fields: dict[str, Any] = {}
        for _ in range(num_fields):
            key = self._string()
            if key in fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            kind = _V(self._read("<I"))
            if key == "general.alignment" and kind != _V.UINT32:
                raise ValueError(f"general.alignment is {kind.name}, not UINT32")
            value = self._value(kind)
            if kind == _V.FLOAT32:
                # Stored as float32: its shortest decimal is what the converter wrote (1e-05,
                # not 9.999999747378752e-06).
                value = float(str(np.float32(value)))
            fields[key] = value
        self._check_count(num_tensors, _MIN_TENSOR_BYTES, "tensor entries")
        entries = [self._tensor_entry() for _ in range(num_tensors)]
        alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
        start = -(-self.offset // alignment) * alignment
        names = set()
        tensors = []
        for name, shape, qtype, offset in entries:
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            if offset % alignment:
                raise ValueError(f"tensor {name!r} starts off the file's {alignment}-byte grid")
            names.add(name)
            tensors.append(self._tensor(name, shape, qtype, start + offset))
        return tensors, fields

    def _check_count(self, count: int, min_bytes: int, what: str) -> None:
        if count * min_bytes > len(self.mm) - self.offset:
            raise ValueError(f"{count} {what} cannot fit in the rest of the file")

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.mm, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        self._check_count(n, 1, "string bytes")
        text = self.mm[self.offset : self.offset + n].decode("utf-8")
        self.offset += n
        return text

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == _V.STRING:
            return self._string()
        if kind == _V.ARRAY:
            item = _V(self._read("<I"))
            count = self._read("<Q")
            if item in _SCALARS:  # numbers in one read
                dtype = np.dtype(_SCALARS[item]).newbyteorder("<")
                self._check_count(count, dtype.itemsize, f"{item.name} values")
                values = np.frombuffer(self.mm, dtype, count, self.offset)
                self.offset += count * dtype.itemsize
                return values.tolist()
            self._check_count(count, _MIN_ITEM_BYTES[item], f"{item.name} values")
            return [self._value(item) for _ in range(count)]
        return self._read("<" + _SCALARS[kind])

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        num_dims = self._read("<I")
        if num_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {num_dims} dims (at most {_MAX_DIMS})")
        dims = tuple(self._read("<Q") for _ in range(num_dims))
        return name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")

    def _tensor(self, name: str, shape: tuple[int, ...], qtype, offset: int) -> GGUFTensor:
        np_shape = tuple(reversed(shape))
        if qtype in _ELEMENT_TYPES:
            dtype = np.dtype(_ELEMENT_TYPES[qtype])
            count = prod(shape)
        else:
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            if not np_shape or np_shape[-1] % block:
                raise ValueError(f"tensor {name!r} ({qtype.name}, {shape}): rows of partial blocks")
            np_shape = (*np_shape[:-1], np_shape[-1] // block * block_bytes)
            dtype, count = np.dtype(np.uint8), prod(np_shape)
        if offset + count * dtype.itemsize > len(self.mm):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self.mm, dtype, count, offset).reshape(np_shape)
        return GGUFTensor(name, qtype, shape, data)


class GGUFCheckpoint:
    """A memory-mapped GGUF file of a llama or qwen2 model, validated on open.

    Opening checks the architecture, every tensor's type and name, and the config metadata, so a
    file we cannot serve fails here with a `ValueError` naming it, not midway through loading.
    Tensors are read (and dequantized) one at a time by `iter_tensors`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: GGUF file not found")
        try:
            tensors, self.metadata = read_gguf(self.path)
        except ByteOrderError as e:
            raise ValueError(f"{self.path}: {e}") from None
        except Exception as e:  # bad bytes surface as whatever struct, numpy or utf-8 raised
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.architecture: str = self.metadata.get("general.architecture", "")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path} has architecture {self.architecture!r}; "
                f"jaxsgl loads {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._tensors = self._map_tensors(tensors)
        try:
            self._config = self._build_config()
        except TypeError as e:  # int() or float() of an array where a number belongs
            raise ValueError(f"{self.path}: unexpected metadata value ({e})") from None
        logger.info(
            "%s: %s, %d tensors of types %s",
            self.path,
            self.architecture,
            self.num_tensors,
            sorted({t.tensor_type.name for t in self._tensors.values()}),
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFCheckpoint:
        """Open and validate the GGUF file at `path`."""
        return cls(path)

    @property
    def num_tensors(self) -> int:
        """How many tensors `iter_tensors` yields."""
        return len(self._tensors)

    def tensor_names(self) -> list[str]:
        """The HF names of the file's tensors, in file order."""
        return list(self._tensors)

    def hf_config(self) -> dict[str, Any]:
        """The model's config as an HF `config.json`-style dict."""
        return dict(self._config)

    def names(self) -> set[str]:
        """The HF names of the file's tensors, as a set (the loader's `CheckpointSource`)."""
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (an HF name) as float32 in HF layout, read from the file now."""
        if name not in self._tensors:
            raise ValueError(f"{self.path}: no tensor {name!r}")
        t = self._tensors[name]
        shape = tuple(reversed(t.shape))  # GGUF lists dims fastest-moving first
        w = dequantize(t.data, t.tensor_type, shape)
        proj = name.rsplit(".", 2)[-2]  # "model.layers.0.self_attn.q_proj.weight" -> "q_proj"
        if self.architecture in _PERMUTED_QK_ARCHITECTURES and proj in ("q_proj", "k_proj"):
            key = "num_attention_heads" if proj == "q_proj" else "num_key_value_heads"
            heads = self._config[key]
            if w.shape[0] % (2 * heads):
                raise ValueError(f"{self.path}: {t.name} has {w.shape[0]} rows for {heads} heads")
            w = _unpermute_rows(w, heads)
        return w

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array in HF layout)` for each tensor, in file order."""
        for name in self._tensors:
            yield name, self.get(name)

    def _map_tensors(self, tensors: list[GGUFTensor]) -> dict[str, GGUFTensor]:
        by_name = {}
        for t in tensors:
            if t.name == "rope_freqs.weight":
                raise ValueError(
                    f"{self.path} has rope_freqs.weight (llama3-style rope scaling); "
                    "llama3-scaled GGUF is not supported yet"
                )
            hf_name = _hf_name(t.name)
            if hf_name is None:
                raise ValueError(
                    f"{self.path}: tensor {t.name!r} has no place in a {self.architecture} model"
                )
            if t.tensor_type not in SUPPORTED_GGUF_TYPES:
                supported = ", ".join(sorted(q.name for q in SUPPORTED_GGUF_TYPES))
                raise ValueError(
                    f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}; "
                    f"jaxsgl loads {supported}"
                )
            by_name[hf_name] = t
        return by_name

    def _meta(self, key: str, default: Any = None) -> Any:
        """`{arch}.key` from the metadata; `default`, or a ValueError if it is None."""
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if value is None:
            raise ValueError(f"{self.path}: metadata has no {self.architecture}.{key}")
        return value

    def _build_config(self) -> dict[str, Any]:
        scaling = self._meta("rope.scaling.type", "none")
        if scaling != "none":
            raise ValueError(f"{self.path}: rope scaling {scaling!r} is not supported")
        hidden = int(self._meta("embedding_length"))
        heads = int(self._meta("attention.head_count"))
        head_dim = self._meta("attention.key_length", self._meta("rope.dimension_count", 0))
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ValueError(f"{self.path}: no token_embd.weight tensor")
        # The token list is the older files' only record of the vocabulary size.
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        # embed.shape is in GGUF order, [D, V].
        vocab = self._meta("vocab_size", len(tokens) if tokens else int(embed.shape[-1]))
        config = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("feed_forward_length")),
            "num_hidden_layers": int(self._meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta("attention.head_count_kv", heads)),
            "head_dim": int(head_dim) or hidden // heads,
            "rms_norm_eps": float(self._meta("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._meta("context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "torch_dtype": self._checkpoint_dtype(),
        }
        for key in ("bos_token_id", "eos_token_id"):
            if (token := self.metadata.get(f"tokenizer.ggml.{key}")) is not None:
                config[key] = int(token)
        return config

    def _checkpoint_dtype(self) -> str:
        """The checkpoint's dtype name: "quantized" if any matrix is, else the matrices' type."""
        # Only matrices count: norms are F32 even in an F16 or BF16 file.
        types = {t.tensor_type for t in self._tensors.values() if len(t.shape) == 2}
        if not types <= set(_FLOAT_TYPES):
            return "quantized"
        for qtype in (_T.BF16, _T.F16):
            if qtype in types:
                return _FLOAT_TYPES[qtype]
        return "float32"
