"""What both attention kernels share: input checks, padding helpers, the mask value."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a masked score minus a running max that is still masked is 0, not inf - inf.
MASKED = -1e30
LOG2_E = 1.4426950408889634


def cdiv(a, b):
    return (a + b - 1) // b


def pow2_at_least(n: int, minimum: int) -> int:
    """The smallest power of two that is >= n and >= minimum."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    """`x` zero-padded along `axis` to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def dot_precision(dtype) -> jax.lax.Precision:
    """float32 inputs get full float32 products (not tf32); 16-bit ones the native rate."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def widened_queries(q: jax.Array, pool_dtype) -> jax.Array:
    """The queries in the type a kernel multiplies in. Over an 8-bit pool, 16-bit queries go
    to float16: an 8-bit key or value widens to float16 in one conversion (to bfloat16 in
    several, which made the 8-bit decode kernel no faster than the 16-bit one), and float16
    keeps more of each probability's bits. Queries past float16's range are clipped to it."""
    if jnp.dtype(pool_dtype).itemsize != 1 or q.dtype == jnp.float32:
        return q
    f16_max = float(jnp.finfo(jnp.float16).max)  # not a bfloat16: clip in float32
    return jnp.clip(q.astype(jnp.float32), -f16_max, f16_max).astype(jnp.float16)


def scores(q: jax.Array, k: jax.Array, precision) -> jax.Array:
    """`q [M, H]` · `k [BK, H]`ᵀ in float32: `[M, BK]`."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(q, k, dims, precision=precision, preferred_element_type=jnp.float32)


def online_softmax(carry, s: jax.Array, v: jax.Array, precision, exp=jnp.exp):
    """Fold one block of scores `s [M, BK]` and values `v [BK, H]` into the running
    (max `[M]`, sum `[M]`, unnormalised output `[M, H]`) of a flash-attention loop. `exp` is
    `jnp.exp2` where the scores are in base 2."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    p = exp(s - m_new[:, None])  # [M, BK]
    rescale = exp(m - m_new)
    dims = (((1,), (0,)), ((), ()))
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, dims, precision=precision, preferred_element_type=jnp.float32
    )  # [M, H]
    return m_new, l * rescale + p.sum(axis=1), acc * rescale[:, None] + pv


def check_pool(k_pool: jax.Array, v_pool: jax.Array, page_size: int, q: jax.Array) -> int:
    """The paged pool is `[L, K, slots, H]` for keys and values alike, and fits the queries
    `q [..., N, H]` (N a multiple of K). Returns K."""
    *_, num_heads, head_dim = q.shape
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool {k_pool.shape} and v_pool {v_pool.shape} must both be [L, K, slots, H]"
        )
    if k_pool.shape[3] != head_dim:
        raise ValueError(f"pool head dim {k_pool.shape[3]} != query head dim {head_dim}")
    if page_size < 1 or k_pool.shape[2] % page_size:
        raise ValueError(f"pool of {k_pool.shape[2]} slots is not whole pages of {page_size}")
    K = k_pool.shape[1]
    if num_heads % K:
        raise ValueError(f"{num_heads} query heads are not a multiple of {K} kv heads")
    return K


def check_runs(q_start: jax.Array, q_lens: jax.Array, seq_lens: jax.Array, page_table) -> int:
    """An extend's runs: `q_start`, `q_lens` and `seq_lens` all `[S]`, `page_table [S, P]`.
    Returns S."""
    S = q_start.shape[0]
    if q_lens.shape != (S,) or seq_lens.shape != (S,) or page_table.ndim != 2:
        raise ValueError(
            f"q_start {q_start.shape}, q_lens {q_lens.shape}, seq_lens {seq_lens.shape} must "
            f"all be [S] and page_table {page_table.shape} [S, P]"
        )
    return S
