"""Ragged extend attention: runs of new query tokens over their sequences' paged context.

Letters: T tokens (ragged, back to back), S sequences, N q heads, K kv heads, R = N / K,
H head dim, L layers, G page size, P pages per sequence, Q the longest run of new tokens.

Sequence s has `q_lens[s]` new tokens in rows `q_start[s] :` of `q`, and a context of
`seq_lens[s]` tokens in the pool, its new tokens' keys and values already written: the first
`seq_lens - q_lens` are its cached prefix (empty for a plain prefill, long for a radix-cache
hit or a later prefill chunk). New token i sits at position `seq_lens - q_lens + i` and sees
the keys at or before it. One launch serves every sequence whatever its lengths.

One program per (work item, E q heads of one kv group); a work item is one block of BQ new
tokens of one sequence. The items are the sequences' query blocks back to back, so the grid
grows with the step's tokens (at most T / BQ + S items), not with its longest run times its
sequences: one compiled program serves any mix of lengths. Each program walks the keys from
position 0 to the last one its block sees, BK at a time, with an online softmax (flash
attention); the E heads share each key block it loads, so the tile has BQ·E rows. Key blocks
wholly before the first query need no causal mask and take a loop of their own. Items run
longest first: every sequence's last query block (which sees the most keys), then the blocks
before those, so the final wave on the GPU is short work rather than a few long programs.

Example, G = 4, BQ = 2: a sequence with prefix [a b c d e] in pages [7, 3] and new tokens
[f g] at rows 9, 10 is one block of queries at positions 5 and 6; its keys are slots
[28..31, 12, 13, 14] and g sees all seven, f the first six.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    LOG2_E,
    MASKED,
    cdiv,
    check_pool,
    check_runs,
    dot_precision,
    is_pow2,
    online_softmax,
    pow2_at_least,
    scores,
    widened_queries,
)


def _extend_kernel(
    layer_ref,  # [1] int32
    item_seq_ref,  # [W] int32, each work item's sequence (-1: no work)
    item_block_ref,  # [W] int32, each work item's query block within its sequence
    q_start_ref,  # [S] int32
    q_lens_ref,  # [S] int32
    seq_lens_ref,  # [S] int32
    page_table_ref,  # [S, P] int32
    q_ref,  # [T, N, H]
    k_ref,  # [L, K, slots, H]
    v_ref,  # [L, K, slots, H]
    o_init_ref,  # [T, N, H], aliased with o_ref
    o_ref,  # [T, N, H]
    *,
    page_size: int,
    block_q: int,
    block_k: int,
    group: int,
    heads: int,
    scale: float,
    precision,
):
    del o_init_ref  # only there so that rows no program writes keep their zeros
    # Grid (head blocks, work items), the first axis fastest: an item's head blocks run
    # together and share its keys in L2.
    hb, w = pl.program_id(0), pl.program_id(1)
    s = item_seq_ref[w]

    @pl.when(s >= 0)
    def _():
        G = page_size
        qb, q_len = item_block_ref[w], q_lens_ref[s]
        layer, seq_len = layer_ref[0], seq_lens_ref[s]
        prefix = seq_len - q_len
        local = qb * block_q + jnp.arange(block_q)  # [BQ] index among the new tokens
        valid = local < q_len
        rows = q_start_ref[s] + local  # [BQ], past the sequence (or T) where not valid
        head_ids = hb * heads + jnp.arange(heads)  # [E], all in kv head `kv_head`'s group
        kv_head = hb * heads // group
        # The tile's rows are (token, head) pairs, token-major: [BQ·E, H]. Heads of one group
        # share every key and value the program loads.
        q = q_ref[jnp.minimum(rows, q_start_ref[s] + q_len - 1)[:, None], head_ids[None, :], :]
        H = q.shape[-1]
        q = q.reshape(block_q * heads, H)  # [BQ·E, H]
        # Scores in base 2: exp2(q·k · scale · log2 e) = exp(q·k · scale); folding the factor
        # into q saves a multiply per score.
        q = (q.astype(jnp.float32) * (scale * LOG2_E)).astype(q.dtype)
        q_pos = jnp.broadcast_to((prefix + local)[:, None], (block_q, heads)).reshape(-1)
        j = jnp.arange(block_k)

        def body(b, carry, masked: bool):  # carry: running max [M], sum [M], output [M, H]
            key_pos = b * block_k + j  # [BK]
            slots = page_table_ref[s, key_pos // G] * G + key_pos % G  # [BK]
            k = k_ref[layer, kv_head, slots, :].astype(q.dtype)  # [BK, H]; an 8-bit pool widened
            v = v_ref[layer, kv_head, slots, :].astype(q.dtype)
            x = scores(q, k, precision)  # [M, BK]
            if masked:
                # Keys past the context may be stale or scratch slots: zero them so 0 · v is 0.
                v = jnp.where((key_pos < seq_len)[:, None], v, jnp.zeros_like(v))
                x = jnp.where(key_pos[None, :] <= q_pos[:, None], x, MASKED)
            return online_softmax(carry, x, v, precision, exp=jnp.exp2)

        M = block_q * heads
        init = (
            jnp.full((M,), MASKED, jnp.float32),
            jnp.zeros((M,), jnp.float32),
            jnp.zeros((M, H), jnp.float32),
        )
        # Key blocks wholly at or before the block's first query need no mask; the rest, up
        # to the last key its last query sees, do.
        num_full = (prefix + qb * block_q + 1) // block_k
        kv_end = jnp.minimum(seq_len, prefix + (qb + 1) * block_q)
        carry = jax.lax.fori_loop(0, num_full, functools.partial(body, masked=False), init)
        carry = jax.lax.fori_loop(
            num_full, cdiv(kv_end, block_k), functools.partial(body, masked=True), carry
        )
        _, l, acc = carry
        out = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
        out = out.reshape(block_q, heads, H)
        # Indices on every axis: a masked store of a gathered row set. The rows are distinct,
        # so lanes that are masked off never collide with one that writes.
        idx = (rows[:, None, None], head_ids[None, :, None], jnp.arange(H)[None, None, :])
        mask = jnp.broadcast_to(valid[:, None, None], out.shape)
        plgpu.store(o_ref.at[idx], out, mask=mask)


def ragged_extend_attention(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [L, K, slots, H]
    v_pool: jax.Array,  # [L, K, slots, H]
    layer: jax.Array | int,  # [] int32
    q_start: jax.Array,  # [S] int32
    q_lens: jax.Array,  # [S] int32
    seq_lens: jax.Array,  # [S] int32
    page_table: jax.Array,  # [S, P] int32
    *,
    max_q_len: int,
    page_size: int,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of each sequence's new tokens over its context; `[T, N, H]`.

    `max_q_len` (static) bounds every `q_lens[s]`; rows of `q` that belong to no sequence
    come back as zeros. A program takes `block_q` tokens of `heads_per_program` q heads of one
    kv group (default: the whole group when its size is a power of two, else one head).
    Block sizes left out are the best of `benchmarks/kernel_bench.py`'s sweep on an H200:
    tiles of 128 (token, head) rows, 128 keys a block (64 in float32), eight warps.
    """
    T, N, H = q.shape
    K = check_pool(k_pool, v_pool, page_size, q)
    S = check_runs(q_start, q_lens, seq_lens, page_table)
    if max_q_len < 1:
        raise ValueError(f"max_q_len must be positive, got {max_q_len}")
    R = N // K
    E = heads_per_program or (R if is_pow2(R) else 1)
    if not is_pow2(E) or R % E:
        raise ValueError(f"heads_per_program {E} must be a power of two dividing {R}")
    if block_q is None:
        block_q = min(max(16, 128 // E), pow2_at_least(max_q_len, 16))
    if block_k is None:
        block_k = 64 if q.dtype == jnp.float32 else 128
    num_warps = 8 if num_warps is None else num_warps
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or not is_pow2(size):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    P = page_table.shape[1]
    # Key blocks never run past the table: pad it to whole blocks (the extra pages are masked).
    P_pad = cdiv(cdiv(P * page_size, block_k) * block_k, page_size)
    page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, P_pad - P)))

    item_seq, item_block = work_items(q_lens, block_q, max_q_len, T)
    qw = widened_queries(q, k_pool.dtype)
    kernel = functools.partial(
        _extend_kernel,
        page_size=page_size,
        block_q=block_q,
        block_k=block_k,
        group=R,
        heads=E,
        scale=scale,
        precision=dot_precision(qw.dtype),
    )
    full = lambda shape: pl.BlockSpec(shape, lambda n, w: (0,) * len(shape))
    out = pl.pallas_call(
        kernel,
        grid=(N // E, item_seq.shape[0]),
        in_specs=[
            full((1,)),
            full(item_seq.shape),
            full(item_block.shape),
            full((S,)),
            full((S,)),
            full((S,)),
            full(page_table.shape),
            full(q.shape),
            full(k_pool.shape),
            full(v_pool.shape),
            full(q.shape),
        ],
        out_specs=full(q.shape),
        out_shape=jax.ShapeDtypeStruct(q.shape, qw.dtype),
        input_output_aliases={10: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_extend_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        item_seq,
        item_block,
        q_start.astype(jnp.int32),
        q_lens.astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        page_table,
        qw,
        k_pool,
        v_pool,
        jnp.zeros_like(qw),
    )
    return out.astype(q.dtype)


def work_items(
    q_lens: jax.Array, block_q: int, max_q_len: int, num_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """The grid's work items, longest first: `(sequence [W], query block [W])`, sequence -1
    for the items past the step's work. W bounds the blocks any lengths within `max_q_len`
    and `num_tokens` can make.

    Example, BQ = 16, q_lens [40, 0, 5], max_q_len 40, T = 48: 3 blocks and 1 (W = min(3 · 3,
    3 + 3) = 6); the last blocks first, then the rest: sequences [0, 2, 0, 0, -1, -1], blocks
    [2, 0, 1, 0, 0, 0].
    """
    S = q_lens.shape[0]
    W = min(S * cdiv(max_q_len, block_q), cdiv(num_tokens, block_q) + S)
    blocks = (q_lens.astype(jnp.int32) + block_q - 1) // block_q  # [S]
    ends = jnp.cumsum(blocks)  # [S]
    i = jnp.arange(W, dtype=jnp.int32)
    seq = jnp.minimum(jnp.sum(i[:, None] >= ends[None, :], axis=1), S - 1)  # [W]
    valid = i < ends[-1]
    block = i - (ends - blocks)[seq]
    from_end = blocks[seq] - 1 - block  # 0: the sequence's last block
    order = jnp.argsort(jnp.where(valid, from_end * S + seq, S * W), stable=True)
    return (
        jnp.where(valid[order], seq[order], -1).astype(jnp.int32),
        jnp.where(valid[order], block[order], 0).astype(jnp.int32),
    )


def ragged_extend_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [L, K, slots, H]
    v_pool: jax.Array,
    layer: int,
    q_start: jax.Array,  # [S]
    q_lens: jax.Array,  # [S]
    seq_lens: jax.Array,  # [S]
    page_table: jax.Array,  # [S, P]
    *,
    page_size: int,
    scale: float,
) -> jax.Array:
    """The same function in plain JAX, float32, one token at a time over its whole table."""
    T, N, H = q.shape
    K = k_pool.shape[1]
    S, P = page_table.shape
    C = P * page_size
    slots = (page_table[:, :, None] * page_size + jnp.arange(page_size)).reshape(S, C)
    t = jnp.arange(T)
    # The sequence of each row; rows outside every sequence are zeroed at the end.
    owner = (t[:, None] >= q_start[None, :]) & (t[:, None] < (q_start + q_lens)[None, :])  # [T, S]
    seq = jnp.argmax(owner, axis=1)  # [T]
    pos = seq_lens[seq] - q_lens[seq] + t - q_start[seq]  # [T]
    k = k_pool[layer][:, slots[seq]].astype(jnp.float32)  # [K, T, C, H]
    v = v_pool[layer][:, slots[seq]].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(T, K, N // K, H)
    scores = jnp.einsum("TKRH,KTCH->TKRC", qg, k) * scale
    visible = jnp.arange(C)[None, :] <= pos[:, None]  # [T, C]
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    out = jnp.einsum("TKRC,KTCH->TKRH", jax.nn.softmax(scores, axis=-1), v).reshape(T, N, H)
    return jnp.where(owner.any(axis=1)[:, None, None], out, 0.0)
