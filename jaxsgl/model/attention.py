"""Attention over token-major ragged batches.

`ragged_dense_attention` is the plain-JAX path with no KV cache: every sequence of the step is
present in full (prefill or full recompute). The paged-KV variants share its signature shape:
q/k/v token-major, metadata describing which tokens belong together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_dense_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    segment_ids: jax.Array,  # [T]
    positions: jax.Array,  # [T]
    *,
    scale: float,
) -> jax.Array:
    """Causal attention within each segment of a packed batch; returns `[T, N, H]`.

    Token i sees token j iff they share a segment and `positions[j] <= positions[i]`.
    Example: segments [0 0 0 1 1], positions [0 1 2 0 1] -> token 4 sees tokens 3 and 4 only.
    Padding (segment -1) only sees other padding, so its softmax is never empty.
    """
    T, N, H = q.shape
    K = k.shape[1]
    qg = q.reshape(T, K, N // K, H)  # [T, K, N/K, H]: query heads grouped by their kv head
    scores = jnp.einsum("TKGH,SKH->KGTS", qg, k, preferred_element_type=jnp.float32) * scale
    visible = (segment_ids[:, None] == segment_ids[None, :]) & (
        positions[None, :] <= positions[:, None]
    )  # [T, S]
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("KGTS,SKH->TKGH", probs, v)  # [T, K, N/K, H]
    return out.reshape(T, N, H)
