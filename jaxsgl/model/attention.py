"""Attention over the paged KV pool, in plain JAX (the `native` backend).

One function serves prefill, chunked prefill, radix-cache hits and decode: each sequence's new
queries attend causally to its whole context, gathered from the pool through its page table.
Queries are padded per sequence to Q rows, so the work is S·Q·C per head; decode is Q = 1.
The Pallas kernels implement the same contract without the padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsgl.model.forward_batch import ForwardBatch

# Finite, so a padding sequence with no visible key gets a harmless uniform softmax, not NaN.
_MASKED = -1e30


def write_kv(pool: jax.Array, layer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Store `new [T, K, H]` at `slots [T]` of layer `layer` of the pool `[L, K, slots, H]`.
    Only the T rows are written: with the pool donated this is an in-place scatter."""
    # pool[layer, :, slots] indexes as [T, K, H]: the advanced indices' dimension comes first.
    return pool.at[layer, :, slots].set(new.astype(pool.dtype))


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [K, P_total * G, H], this layer, new tokens already written
    v_pool: jax.Array,  # [K, P_total * G, H]
    batch: ForwardBatch,
    *,
    scale: float,
) -> jax.Array:
    """Causal attention of every new token over its sequence's paged context; `[T, N, H]`."""
    T, N, H = q.shape
    K = k_pool.shape[0]
    S, P = batch.page_table.shape
    G, Q = batch.page_size, batch.max_q_len
    C = P * G

    # Gather each sequence's context: pool pages -> [K, S, C, H].
    k_ctx = k_pool.reshape(K, -1, G, H)[:, batch.page_table].reshape(K, S, C, H)
    v_ctx = v_pool.reshape(K, -1, G, H)[:, batch.page_table].reshape(K, S, C, H)

    # Pad each sequence's queries to Q rows: rows[s, i] = q_start[s] + i.
    i = jnp.arange(Q)
    rows = jnp.clip(batch.q_start[:, None] + i[None, :], 0, T - 1)  # [S, Q]
    q_seq = q[rows].reshape(S, Q, K, N // K, H)  # [S, Q, K, R, H], R q heads per kv head

    scores = jnp.einsum("SQKRH,KSCH->SKRQC", q_seq, k_ctx, preferred_element_type=jnp.float32)
    # Query i of sequence s sits at position seq_lens - q_lens + i and sees keys at or before it.
    q_pos = (batch.seq_lens - batch.q_lens)[:, None] + i[None, :]  # [S, Q]
    visible = jnp.arange(C)[None, None, :] <= q_pos[:, :, None]  # [S, Q, C]
    scores = jnp.where(visible[:, None, None], scores * scale, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_ctx.dtype)
    out = jnp.einsum("SKRQC,KSCH->SQKRH", probs, v_ctx).reshape(S * Q, N, H)

    # Back to token-major rows: token t is query (t - q_start) of its sequence.
    s = batch.token_seq
    src = s * Q + jnp.clip(jnp.arange(T) - batch.q_start[s], 0, Q - 1)  # [T]
    return out[src]
