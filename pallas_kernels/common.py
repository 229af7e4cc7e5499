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


def check_pool(k_pool: jax.Array, v_pool: jax.Array, page_size: int, head_dim: int) -> None:
    """The paged pool is `[L, K, slots, H]` for keys and values alike."""
    if k_pool.ndim != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool {k_pool.shape} and v_pool {v_pool.shape} must both be [L, K, slots, H]"
        )
    if k_pool.shape[3] != head_dim:
        raise ValueError(f"pool head dim {k_pool.shape[3]} != query head dim {head_dim}")
    if page_size < 1 or k_pool.shape[2] % page_size:
        raise ValueError(f"pool of {k_pool.shape[2]} slots is not whole pages of {page_size}")
