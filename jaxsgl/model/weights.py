"""Checkpoint tensors (HF names, HF layouts) → the model's stacked parameters.

Every checkpoint source — a safetensors folder, a GGUF file — offers the same small interface
(`path`, `hf_config()`, `names()`, `get(name)`), with tensors under their Hugging Face names and
in Hugging Face layouts (linear weights `[out, in]`). `PARAM_SOURCES` is the one table saying
which HF tensor fills which parameter and how it is reshaped.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors import safe_open

from jaxsgl.config import ModelConfig


class CheckpointSource(Protocol):
    path: Path

    def hf_config(self) -> dict: ...

    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsFolder:
    """An HF model folder: config.json and one or many `*.safetensors` files."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.config_path = self.path / "config.json"
        if not self.config_path.is_file():
            raise ValueError(f"{self.path}: no config.json in this folder")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted({self.path / f for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.path}: no *.safetensors weights in this folder")
        self._file_of: dict[str, Path] = {}
        for f in files:
            for name in _safetensors_names(f):
                self._file_of[name] = f

    def hf_config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path / 'config.json'}: not valid JSON ({e})") from None

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> np.ndarray:
        with safe_open(self._file_of[name], framework="numpy") as f:
            return f.get_tensor(name)


def _safetensors_names(file: Path) -> list[str]:
    """Tensor names of one file, after checking that the file holds every byte it declares."""
    if not file.is_file():
        raise ValueError(f"{file}: safetensors file not found")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(f"{file}: truncated safetensors file (header cut short)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end > size:
        raise ValueError(
            f"{file}: truncated safetensors file: tensors need {8 + header_len + end} bytes, "
            f"the file has {size}"
        )
    return list(header)


Transform = Callable[[np.ndarray, ModelConfig, int], np.ndarray]


def _same(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return w


def _t(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return w.T  # HF [out, in] -> [in, out]


def _q(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim)  # [D, N, H]


def _kv(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    w = w.T.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim)  # [D, K, H]
    return np.repeat(w, r, axis=1)  # kv heads [a b] -> [a a b b] when r = 2


def _o(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)  # [N, H, D]


def _bq(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return w.reshape(cfg.num_heads, cfg.head_dim)  # [N, H]


def _bkv(w: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    return np.repeat(w.reshape(cfg.num_kv_heads, cfg.head_dim), r, axis=0)  # [K, H]


_LAYER = "model.layers.{i}."
# param path -> (HF tensor name, transform); "{i}" marks a per-layer tensor stacked on axis 0.
PARAM_SOURCES: dict[tuple[str, ...], tuple[str, Transform]] = {
    ("embed",): ("model.embed_tokens.weight", _same),
    ("final_norm",): ("model.norm.weight", _same),
    ("lm_head",): ("lm_head.weight", _t),
    ("layers", "attn_norm"): (_LAYER + "input_layernorm.weight", _same),
    ("layers", "mlp_norm"): (_LAYER + "post_attention_layernorm.weight", _same),
    ("layers", "wq"): (_LAYER + "self_attn.q_proj.weight", _q),
    ("layers", "wk"): (_LAYER + "self_attn.k_proj.weight", _kv),
    ("layers", "wv"): (_LAYER + "self_attn.v_proj.weight", _kv),
    ("layers", "wo"): (_LAYER + "self_attn.o_proj.weight", _o),
    ("layers", "bq"): (_LAYER + "self_attn.q_proj.bias", _bq),
    ("layers", "bk"): (_LAYER + "self_attn.k_proj.bias", _bkv),
    ("layers", "bv"): (_LAYER + "self_attn.v_proj.bias", _bkv),
    ("layers", "w_gate"): (_LAYER + "mlp.gate_proj.weight", _t),
    ("layers", "w_up"): (_LAYER + "mlp.up_proj.weight", _t),
    ("layers", "w_down"): (_LAYER + "mlp.down_proj.weight", _t),
}


def host_params(
    source: CheckpointSource,
    cfg: ModelConfig,
    wanted: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
    kv_repeats: int,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield `(param path, host array)` for every wanted parameter, in the wanted shape/dtype.

    `cfg` is the checkpoint's own config (before kv-head replication); `wanted` maps each param
    path of the device model to its shape and dtype.
    """
    available = source.names()
    for path, (shape, dtype) in wanted.items():
        template, transform = PARAM_SOURCES[path]
        names = (
            [template.format(i=i) for i in range(cfg.num_layers)]
            if "{i}" in template
            else [template]
        )
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"{source.path}: tensor {missing[0]!r} is missing")
        parts = [transform(_as_float(source.get(n)), cfg, kv_repeats) for n in names]
        host = np.stack(parts) if "{i}" in template else parts[0]
        if host.shape != tuple(shape):
            raise ValueError(
                f"{source.path}: tensor {names[0]!r} has shape {source.get(names[0]).shape}, "
                f"which does not fit the config (expected {tuple(shape)} after layout)"
            )
        yield path, host.astype(dtype)


def _as_float(w: np.ndarray) -> np.ndarray:
    return w if w.dtype.kind == "f" or w.dtype.name == "bfloat16" else w.astype(np.float32)
