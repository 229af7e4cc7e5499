"""Checkpoint tensors (HF names, HF layouts) → the model's stacked parameters.

Every checkpoint source — a safetensors folder, a GGUF file — offers the same small interface
(`path`, `hf_config()`, `names()`, `get(name)`), with tensors under their Hugging Face names and
in Hugging Face layouts (linear weights `[out, in]`). `PARAM_SOURCES` is the one table saying
which HF tensors fill which parameter and how they are laid out: q/k/v and gate/up are fused
into one parameter each (see `jaxsgl.model.llama`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import jax.numpy as jnp
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


# (config, kv-head repeats, the HF tensors in table order) -> the parameter of one layer.
Transform = Callable[..., np.ndarray]


def _same(cfg: ModelConfig, r: int, w: np.ndarray) -> np.ndarray:
    return w


def _t(cfg: ModelConfig, r: int, w: np.ndarray) -> np.ndarray:
    return w.T  # HF [out, in] -> [in, out]


def _o(cfg: ModelConfig, r: int, w: np.ndarray) -> np.ndarray:
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)  # [N, H, D]


def _fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: ModelConfig, r: int) -> np.ndarray:
    """q `[..., N·H]`, k and v `[..., K·H]` (HF heads on the last axis) -> `[..., K·r, J, H]`:
    each kv group its query heads in HF order, then its key, then its value; kv heads then
    repeated r times (`repeat_kv_heads`)."""
    lead, K, H = q.shape[:-1], cfg.num_kv_heads, cfg.head_dim
    groups = [q.reshape(*lead, K, -1, H), k.reshape(*lead, K, 1, H), v.reshape(*lead, K, 1, H)]
    return repeat_kv_heads(np.concatenate(groups, axis=-2), r)


def repeat_kv_heads(qkv, r: int):
    """A fused q/k/v parameter `[..., K, J, H]` (numpy or JAX) with each kv head repeated r
    times (`sharding.kv_head_repeats`): `[..., K·r, R/r + 2, H]`, every copy's group holding
    the next R/r of its kv head's query heads.

    HF query head n reads kv head n // R; here it sits in the group of copy n // (R/r), a copy
    of that kv head. Example, 8 q heads over kv heads a and b, r = 2: groups [q0 q1 ka va]
    [q2 q3 ka va] [q4 q5 kb vb] [q6 q7 kb vb]; with r = 1, [q0..q3 ka va] [q4..q7 kb vb].
    Shard s of a split over K then holds the same query heads as shard s of a split over N,
    with the kv head they read.
    """
    if r == 1:
        return qkv
    xp = np if isinstance(qkv, np.ndarray) else jnp
    *lead, K, J, H = qkv.shape
    R = J - 2
    q = qkv[..., :R, :].reshape(*lead, K * r, R // r, H)
    kv = xp.repeat(qkv[..., R:, :], r, axis=-3)  # [..., K·r, 2, H]: kv heads [a b] -> [a a b b]
    return xp.concatenate([q, kv], axis=-2)


def _qkv(cfg: ModelConfig, r: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _fuse_qkv(q.T, k.T, v.T, cfg, r)  # [D, K, J, H]


def _b_qkv(cfg: ModelConfig, r: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _fuse_qkv(q, k, v, cfg, r)  # [K, J, H]


def _gate_up(cfg: ModelConfig, r: int, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.stack([gate.T, up.T], axis=1)  # [D, 2, F]


_LAYER = "model.layers.{i}."
_ATTN, _MLP = _LAYER + "self_attn.", _LAYER + "mlp."
# param path -> (HF tensor names, transform taking those tensors in that order); "{i}" marks
# per-layer tensors, each layer's parameter stacked on axis 0.
PARAM_SOURCES: dict[tuple[str, ...], tuple[tuple[str, ...], Transform]] = {
    ("embed",): (("model.embed_tokens.weight",), _same),
    ("final_norm",): (("model.norm.weight",), _same),
    ("lm_head",): (("lm_head.weight",), _t),
    ("layers", "attn_norm"): ((_LAYER + "input_layernorm.weight",), _same),
    ("layers", "mlp_norm"): ((_LAYER + "post_attention_layernorm.weight",), _same),
    ("layers", "w_qkv"): (
        (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"),
        _qkv,
    ),
    ("layers", "b_qkv"): (
        (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),
        _b_qkv,
    ),
    ("layers", "wo"): ((_ATTN + "o_proj.weight",), _o),
    ("layers", "w_gate_up"): ((_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), _gate_up),
    ("layers", "w_down"): ((_MLP + "down_proj.weight",), _t),
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
        templates, transform = PARAM_SOURCES[path]
        stacked = "{i}" in templates[0]
        assert all(("{i}" in t) == stacked for t in templates), templates
        layers = range(cfg.num_layers) if stacked else [0]
        groups = [[t.format(i=i) for t in templates] for i in layers]
        missing = [n for names in groups for n in names if n not in available]
        if missing:
            raise ValueError(f"{source.path}: tensor {missing[0]!r} is missing")
        one = tuple(shape[1:] if stacked else shape)
        parts = [_laid_out(source, names, transform, cfg, kv_repeats, one) for names in groups]
        host = np.stack(parts) if stacked else parts[0]
        yield path, host.astype(dtype)


def _laid_out(
    source: CheckpointSource,
    names: list[str],
    transform: Transform,
    cfg: ModelConfig,
    kv_repeats: int,
    shape: tuple[int, ...],
) -> np.ndarray:
    """One layer's parameter (or a global one) from its HF tensors, checked against `shape`."""
    tensors = [_as_float(source.get(n)) for n in names]
    try:
        host = transform(cfg, kv_repeats, *tensors)
    except ValueError:  # a reshape or concatenation that the tensors' shapes do not allow
        host = None
    if host is None or host.shape != shape:
        if len(names) == 1:
            found = f"tensor {names[0]!r} has shape {tensors[0].shape}, which does"
        else:
            shapes = zip(names, tensors, strict=True)
            found = "tensors " + ", ".join(f"{n!r} {t.shape}" for n, t in shapes) + " do"
        raise ValueError(
            f"{source.path}: {found} not fit the config (expected {shape} after layout)"
        )
    return host


def _as_float(w: np.ndarray) -> np.ndarray:
    return w if w.dtype.kind == "f" or w.dtype.name == "bfloat16" else w.astype(np.float32)
