"""Bytes and FLOPs of a Llama forward step, from the config alone (no weights loaded).

For Llama-3-8B in bf16: 8.03e9 parameters (16.06 GB), 7.50e9 of them in matmuls (the LM head
included, the embedding gather not), 131,072 KV bytes per token (2 · 32 layers · 8 KV heads ·
128 dims · 2 bytes) and 524,288 attention FLOPs per (query, key) pair (4 · 32 · 32 · 128).
"""

from __future__ import annotations

import dataclasses

from jaxsgl.config import ModelConfig

# Bytes per element of the weight dtypes a model loads in (the names `--dtype` takes), and of
# the 8-bit KV cache types.
ITEMSIZE = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
KV_ITEMSIZE = {"float8_e5m2": 1, "float8_e4m3fn": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCost:
    """Bytes and FLOPs of the model, per token and per step."""

    weight_bytes: int  # every parameter
    step_weight_bytes: int  # read by every forward step: all but an untied embedding table
    matmul_params: int  # in a matmul per token: all but the embedding gather (a tied head counts)
    head_params: int  # the LM head's share of matmul_params (V·D), used only for logits rows
    kv_bytes_per_token: int  # K and V of all layers
    attn_flops_per_key: int  # QKᵀ and PV over all layers, per (query, key) pair

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, dtype: str = "bfloat16", kv_dtype: str | None = None
    ) -> ModelCost:
        """The cost of `cfg` with weights in `dtype` (a name such as "bfloat16") and the KV
        cache in `kv_dtype` (default: `dtype`; also "float8_e5m2" or "float8_e4m3fn")."""
        if dtype not in ITEMSIZE:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(ITEMSIZE)}")
        kv_sizes = {**ITEMSIZE, **KV_ITEMSIZE}
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in kv_sizes:
            raise ValueError(f"unknown KV dtype {kv_dtype!r}; choose one of {', '.join(kv_sizes)}")
        itemsize = ITEMSIZE[dtype]
        params = cfg.num_params
        embed = cfg.vocab_size * cfg.hidden_size
        # A tied LM head reuses the embedding: it still costs a matmul per logits row.
        matmul = params - embed + (embed if cfg.tie_word_embeddings else 0)
        L, N, K, H = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        return cls(
            weight_bytes=params * itemsize,
            step_weight_bytes=matmul * itemsize,
            matmul_params=matmul,
            head_params=embed,
            kv_bytes_per_token=2 * L * K * H * kv_sizes[kv_dtype],
            attn_flops_per_key=4 * L * N * H,
        )

    def prefill(self, batch: int, input_len: int) -> tuple[float, float]:
        """(bytes, FLOPs) of a causal prefill of `batch` prompts of `input_len` tokens."""
        tokens = batch * input_len
        pairs = batch * input_len * (input_len + 1) / 2
        return (
            self.weight_bytes + tokens * self.kv_bytes_per_token,
            2 * self.matmul_params * tokens + self.attn_flops_per_key * pairs,
        )

    def decode(self, batch: int, context: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one decode step of `batch` sequences of `context` tokens."""
        return (
            self.weight_bytes + batch * (context + 1) * self.kv_bytes_per_token,
            2 * self.matmul_params * batch + self.attn_flops_per_key * batch * context,
        )
