"""Flax NNX Llama family (Llama 2/3/3.1, Mistral-shaped, Qwen2 with q/k/v bias).

Dimension letters, used in shape comments, einsum strings and logical axis names:
  T tokens (ragged, all sequences of a step packed back to back)   S sequences
  D model dim   N q heads   K kv heads   R q heads per kv head   H head dim   F ffn dim
  V vocab   L layers   P pages   G page size   C context slots (P·G)   Q queries per sequence
  J one kv group's projections (R q heads, then k, then v: R + 2)   A gate/up pair (2)

Activations are token-major: a step carries `[T, D]` whatever mix of sequences it holds, so the
engine can batch requests of different lengths in one call. Layer weights are stacked on a
leading L axis and run under `lax.scan`, which keeps compile time flat in depth.

Projections that read the same input are fused when the weights load: q/k/v are one weight
`[L, D, K, J, H]` and gate/up one `[L, D, A, F]`, so a layer runs one GEMM for each on every card.
The axis tensor parallelism splits (K, F) stays an axis of its own, so each card's shard is a
fused weight in itself: q, k and v of its kv groups, gate and up of its slice of F. (Fusing at
run time, XLA's dot merger, copies the weights every layer and step: see `jaxsgl.xla_flags`.)

Every parameter carries `logical_axes` metadata; `jaxsgl.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsgl.config import ModelConfig
from jaxsgl.model import attention
from jaxsgl.model.attention_backend import AttentionBackend
from jaxsgl.model.forward_batch import ForwardBatch, KVPool

# The version of the parameters' names and layouts. Converted checkpoints record it; one saved
# in another version has to be converted again. 2: q/k/v and gate/up fused.
PARAMS_VERSION = 2


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, fan_in: int
) -> nnx.Param:
    w = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
    return nnx.Param(w.astype(dtype), logical_axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


class LlamaLayers(nnx.Module):
    """All decoder layers, each weight stacked as `[L, ...]`."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        L, D, N, K, H, F = (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        self.attn_norm = _ones((L, D), ("layers", "embed"), dtype)
        # Kv group g: its R query heads (HF heads g·R … g·R+R-1), then its key, then its value.
        # K counts the device model's kv heads: where `sharded_config` replicates them, each
        # copy's group holds its share of the original group's query heads
        # (`weights.repeat_kv_heads`).
        R = N // K
        self.w_qkv = _param(
            rngs,
            (L, D, K, R + 2, H),
            ("layers", "embed", "kv_heads", None, "head_dim"),
            dtype,
            D,
        )
        self.wo = _param(
            rngs, (L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), dtype, N * H
        )
        if cfg.attention_bias:
            self.b_qkv = _param(
                rngs, (L, K, R + 2, H), ("layers", "kv_heads", None, "head_dim"), dtype, D
            )
        self.mlp_norm = _ones((L, D), ("layers", "embed"), dtype)
        # A: 0 gate, 1 up. Split over F, a shard holds gate and up of its slice of F.
        self.w_gate_up = _param(rngs, (L, D, 2, F), ("layers", "embed", None, "mlp"), dtype, D)
        self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), dtype, F)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        # Static: part of the graphdef, so each backend is its own compiled program.
        self.attention = AttentionBackend()
        # Layers under `lax.scan` (compile time flat in depth) or unrolled (each layer reads
        # its weights in place, where a scan may copy each layer's slice before a matmul).
        self.unroll_layers = False
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), dtype, 1)
        self.layers = LlamaLayers(cfg, dtype, rngs)
        self.final_norm = _ones((D,), ("embed",), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dtype, D)

    def __call__(self, batch: ForwardBatch, kv: KVPool) -> tuple[jax.Array, KVPool]:
        """Writes the step's K/V into `kv` and returns next-token logits `[R, V]` (float32) at
        `batch.logits_indices`, with the updated pool."""
        cfg, attend = self.cfg, self.attention
        x = self.embed[...][batch.tokens]  # [T, D]
        cos, sin = rope_tables(cfg, batch.positions)  # [T, H/2] each
        weights = nnx.to_pure_dict(nnx.state(self.layers))

        # The pool rides in the carry, so each layer's writes update it in place.
        def layer(carry, xs):
            x, kv = carry
            w, l = xs
            return decoder_layer(cfg, attend, w, x, cos, sin, batch, kv, l), None

        if self.unroll_layers:
            for l in range(cfg.num_layers):
                w = jax.tree.map(lambda a, l=l: a[l], weights)
                (x, kv), _ = layer((x, kv), (w, jnp.int32(l)))
        else:
            layer_ids = jnp.arange(cfg.num_layers)
            (x, kv), _ = jax.lax.scan(layer, (x, kv), (weights, layer_ids))
        x = x[batch.logits_indices]  # [R, D]: the LM head only where logits are wanted
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("RD,VD->RV", x, self.embed[...])
        else:
            logits = jnp.einsum("RD,DV->RV", x, self.lm_head[...])
        return logits.astype(jnp.float32), kv


def decoder_layer(
    cfg: ModelConfig,
    attend: AttentionBackend,
    w: dict[str, jax.Array],
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    batch: ForwardBatch,
    kv: KVPool,
    l: jax.Array,
) -> tuple[jax.Array, KVPool]:
    """Layer `l` on `x [T, D]`; `w` is its slice of the stacked weights. The step's K/V go
    into the whole pool (only T rows written), which is returned."""
    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    R = cfg.num_heads // cfg.num_kv_heads
    qkv = jnp.einsum("TD,DKJH->TKJH", h, w["w_qkv"])  # [T, K, J, H]
    if "b_qkv" in w:
        qkv = qkv + w["b_qkv"]
    q = qkv[:, :, :R].reshape(x.shape[0], cfg.num_heads, cfg.head_dim)  # [T, N, H], HF order
    k, v = qkv[:, :, R], qkv[:, :, R + 1]  # [T, K, H] each
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv = KVPool(
        k=attention.write_kv(kv.k, l, k, batch.write_slots),
        v=attention.write_kv(kv.v, l, v, batch.write_slots),
    )
    o = attend(q, kv.k, kv.v, l, batch, scale=cfg.head_dim**-0.5)  # [T, N, H]
    x = x + jnp.einsum("TNH,NHD->TD", o, w["wo"])

    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate_up = jnp.einsum("TD,DAF->TAF", h, w["w_gate_up"])  # [T, 2, F]
    act = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]  # [T, F]
    return x + jnp.einsum("TF,FD->TD", act, w["w_down"]), kv


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Normalise in float32 and cast back before the weight multiply, as the reference does.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[H/2]` (float32), with Llama-3.1 `llama3` scaling if configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    old = rs.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / rs.low_freq_factor, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= old / rs.high_freq_factor) & (wavelen <= old / rs.low_freq_factor)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # [T, H/2]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `x [T, heads, H]`: pairs are (i, i + H/2), the HF layout."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [T, heads, H/2] each
    c, s = cos[:, None, :], sin[:, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)
