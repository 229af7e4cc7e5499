"""Paged decode attention: one new query token per sequence over its paged KV context.

Letters: S sequences, N q heads, K kv heads, R = N / K q heads per kv head, H head dim,
L layers, G page size, P pages per sequence in the page table, X splits of the context.

One program per (sequence, kv head, split). It holds the R query heads of its kv head as the
rows of one matrix, so each page of keys and values is read once for the whole group, and
walks its share of the sequence's pages a block at a time with an online softmax. Long
contexts over few sequences split the pages X ways (split-K); a combine step merges the
partial results by their log-sum-exp.

Example, G = 4, pages_per_block 2: a sequence of 10 tokens in pages [7, 3, 5] reads slots
[28..31, 12..15] in its first block and [20..23, scratch 0..3] in its second, where keys at
positions 10 and up are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    MASKED,
    cdiv,
    check_pool,
    dot_precision,
    is_pow2,
    online_softmax,
    pad_to,
    pow2_at_least,
    scores,
    widened_queries,
)


def _decode_kernel(
    layer_ref,  # [1] int32
    seq_lens_ref,  # [S] int32
    page_table_ref,  # [P'] int32, this program's sequence
    q_ref,  # [Rp, H], this program's query heads (rows R.. are padding)
    k_ref,  # [L, K, slots, H]
    v_ref,  # [L, K, slots, H]
    o_ref,  # [Rp, H] float32, normalised over this split
    lse_ref,  # [Rp] float32, log-sum-exp of this split's scores
    *,
    page_size: int,
    pages_per_block: int,
    pages_per_split: int,
    scale: float,
    precision,
):
    s, h, x = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    G = page_size
    BK = pages_per_block * G  # keys per block
    layer, seq_len = layer_ref[0], seq_lens_ref[s]
    q = q_ref[...]  # [Rp, H]
    Rp, H = q.shape

    first = x * pages_per_split
    end = jnp.minimum(first + pages_per_split, cdiv(seq_len, G))
    num_blocks = cdiv(jnp.maximum(end - first, 0), pages_per_block)
    i = jnp.arange(BK)

    def body(b, carry):  # carry: running max [Rp], sum [Rp], output [Rp, H]
        start = (first + b * pages_per_block) * G  # position of the block's first key
        pages = page_table_ref[start // G + i // G]  # [BK]
        slots = pages * G + i % G  # [BK]
        visible = start + i < seq_len  # [BK]
        k = k_ref[layer, h, slots, :].astype(q.dtype)  # [BK, H]; an 8-bit pool widened (float16)
        v = v_ref[layer, h, slots, :].astype(q.dtype)  # [BK, H]
        # Masked keys may sit in stale or scratch slots: zero their values so 0 · v is 0.
        v = jnp.where(visible[:, None], v, jnp.zeros_like(v))
        s = jnp.where(visible[None, :], scores(q, k, precision) * scale, MASKED)  # [Rp, BK]
        return online_softmax(carry, s, v, precision)

    init = (
        jnp.full((Rp,), MASKED, jnp.float32),
        jnp.zeros((Rp,), jnp.float32),
        jnp.zeros((Rp, H), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    nonempty = l > 0
    o_ref[...] = acc / jnp.where(nonempty, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), MASKED)


def paged_decode_attention(
    q: jax.Array,  # [S, N, H]
    k_pool: jax.Array,  # [L, K, slots, H]
    v_pool: jax.Array,  # [L, K, slots, H]
    layer: jax.Array | int,  # [] int32
    page_table: jax.Array,  # [S, P] int32
    seq_lens: jax.Array,  # [S] int32, context length including the new token
    *,
    page_size: int,
    scale: float,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Attention of each sequence's one new query over its first `seq_lens[s]` keys; `[S, N, H]`.

    The new token's key and value must already be in the pool. A sequence with `seq_lens` 0
    (padding) gets zeros. `num_splits` (split-K) defaults to enough programs to fill a GPU.
    """
    S, N, H = q.shape
    K = check_pool(k_pool, v_pool, page_size, q)
    if page_table.ndim != 2 or page_table.shape[0] != S or seq_lens.shape != (S,):
        raise ValueError(
            f"page_table {page_table.shape} and seq_lens {seq_lens.shape} must be [{S}, P] and "
            f"[{S}] for {S} sequences"
        )
    P = page_table.shape[1]
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    if not is_pow2(pages_per_block * page_size):
        raise ValueError(
            f"pages_per_block · page_size must be a power of two, got "
            f"{pages_per_block} · {page_size}"
        )
    blocks = cdiv(P, pages_per_block)
    if num_splits is None:
        # About four programs per SM of an H100: B=4, 8 kv heads, 16k context took 16 splits.
        num_splits = max(1, min(blocks, 512 // (S * K)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    pages_per_split = cdiv(blocks, num_splits) * pages_per_block
    page_table = pad_to(page_table, 1, pages_per_split * num_splits)  # [S, P']

    R = N // K
    Rp = pow2_at_least(R, 16)  # a matmul needs at least 16 rows
    qw = widened_queries(q, k_pool.dtype)
    q_groups = pad_to(qw.reshape(S, K, R, H), 2, Rp)  # [S, K, Rp, H]
    kernel = functools.partial(
        _decode_kernel,
        page_size=page_size,
        pages_per_block=pages_per_block,
        pages_per_split=pages_per_split,
        scale=scale,
        precision=dot_precision(qw.dtype),
    )
    full = lambda shape: pl.BlockSpec(shape, lambda s, h, x: (0,) * len(shape))
    o, lse = pl.pallas_call(
        kernel,
        grid=(S, K, num_splits),
        in_specs=[
            full((1,)),
            full((S,)),
            pl.BlockSpec((None, page_table.shape[1]), lambda s, h, x: (s, 0)),
            pl.BlockSpec((None, None, Rp, H), lambda s, h, x: (s, h, 0, 0)),
            full(k_pool.shape),
            full(v_pool.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Rp, H), lambda s, h, x: (x, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, Rp), lambda s, h, x: (x, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, S, K, Rp, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, S, K, Rp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        seq_lens.astype(jnp.int32),
        page_table.astype(jnp.int32),
        q_groups,
        k_pool,
        v_pool,
    )
    out = combine_splits(o, lse)  # [S, K, Rp, H]
    return out[:, :, :R].reshape(S, N, H).astype(q.dtype)


def combine_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split results `o [X, ..., H]` (each normalised over its split) weighted by
    their split's share of the softmax mass, `exp(lse)`."""
    if o.shape[0] == 1:
        return o[0]
    weight = jnp.exp(lse - lse.max(axis=0))  # [X, ...], 1 for the heaviest split
    return (o * weight[..., None]).sum(axis=0) / weight.sum(axis=0)[..., None]


def paged_decode_attention_reference(
    q: jax.Array,  # [S, N, H]
    k_pool: jax.Array,  # [L, K, slots, H]
    v_pool: jax.Array,
    layer: int,
    page_table: jax.Array,  # [S, P]
    seq_lens: jax.Array,  # [S]
    *,
    page_size: int,
    scale: float,
) -> jax.Array:
    """The same function in plain JAX, float32, gathering every page of the table."""
    S, N, H = q.shape
    K = k_pool.shape[1]
    P = page_table.shape[1]
    slots = (page_table[:, :, None] * page_size + jnp.arange(page_size)).reshape(S, P * page_size)
    k = k_pool[layer][:, slots].astype(jnp.float32)  # [K, S, C, H]
    v = v_pool[layer][:, slots].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(S, K, N // K, H)
    scores = jnp.einsum("SKRH,KSCH->SKRC", qg, k) * scale
    visible = jnp.arange(P * page_size)[None, :] < seq_lens[:, None]  # [S, C]
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(seq_lens[:, None, None, None] > 0, probs, 0.0)
    out = jnp.einsum("SKRC,KSCH->SKRH", probs, v)
    return out.reshape(S, N, H)
