"""Attention over the paged KV pool, in plain JAX (the `native` backend).

One function serves prefill, chunked prefill, radix-cache hits and decode: each sequence's new
queries attend causally to its whole context, read from the pool through its page table.
Queries are padded per sequence to Q rows, so the work is S·Q·C per head; decode is Q = 1.
The Pallas kernels implement the same contract without the padding.

The context is read a few pages at a time with an online softmax (as flash attention does):
nothing of size C is materialised, and the loop stops after the last page any sequence of the
step uses, so the pages that only pad the page table to its bucket cost nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsgl.model.forward_batch import ForwardBatch

# Finite, so that a masked score minus a running max that is still masked is 0, not inf - inf.
_MASKED = -1e30

# Pages read per loop step: the context in at most MAX_LOOP_STEPS steps, of at least
# MIN_STEP_SLOTS each. Short steps keep a step's keys and values in cache and stop close to the
# end of the longest context; few steps keep the loop's fixed cost per step small (and suit
# GPUs, where each step is a few kernel launches). Decode reads little per slot and takes the
# shorter steps. Measured on a 2-core CPU (SmolLM2 shapes, contexts of 150 and 2000 tokens).
MAX_LOOP_STEPS = 8
MIN_STEP_SLOTS = {"decode": 32, "extend": 64}

# Gathers pool[layer, :, page·G : page·G + G, :] for every (layer, page·G) start. The pool keeps
# its one shape: with a paged view of it (a reshape) beside the in-place write of a 1-token
# step, XLA copies the whole pool.
_PAGE_GATHER = jax.lax.GatherDimensionNumbers(
    offset_dims=(2, 3, 4), collapsed_slice_dims=(0,), start_index_map=(0, 2)
)


def write_kv(pool: jax.Array, layer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Store `new [T, K, H]` at `slots [T]` of layer `layer` of the pool `[L, K, slots, H]`.
    Only the T rows are written: with the pool donated this is an in-place scatter."""
    # pool[layer, :, slots] indexes as [T, K, H]: the advanced indices' dimension comes first.
    if pool.dtype == jnp.float8_e4m3fn:  # no infinity: past its largest value a cast is NaN
        new = jnp.clip(new, -448.0, 448.0)
    return pool.at[layer, :, slots].set(new.astype(pool.dtype))


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [L, K, P_total * G, H], new tokens of this step already written
    v_pool: jax.Array,  # [L, K, P_total * G, H]
    layer: jax.Array,  # [] int32
    batch: ForwardBatch,
    *,
    scale: float,
) -> jax.Array:
    """Causal attention of every new token over its sequence's paged context in layer
    `layer`; `[T, N, H]`.

    The whole pool comes in, not `pool[layer]`: that slice would be a copy of the layer's pool
    (a kernel's or a loop's operand must be a buffer), where only the step's pages are read.
    """
    T, N, H = q.shape
    K = k_pool.shape[1]
    S, P = batch.page_table.shape
    G, Q = batch.page_size, batch.max_q_len
    R = N // K  # q heads per kv head
    min_slots = MIN_STEP_SLOTS["decode" if Q == 1 else "extend"]
    n = max(1, min_slots // G, -(-P // MAX_LOOP_STEPS))  # pages per loop step
    c = n * G  # slots per loop step

    # A whole number of loop steps: the extra columns point at the scratch page and are masked.
    pad = -P % n
    page_table = jnp.pad(batch.page_table, ((0, 0), (0, pad)))  # [S, P + pad]

    # Pad each sequence's queries to Q rows: rows[s, i] = q_start[s] + i.
    i = jnp.arange(Q)
    rows = jnp.clip(batch.q_start[:, None] + i[None, :], 0, T - 1)  # [S, Q]
    q_seq = q[rows].reshape(S, Q, K, R, H).transpose(2, 0, 3, 1, 4)  # [K, S, R, Q, H]
    # (kv head, sequence) pairs are the one batch axis of the loop's matmuls: XLA:CPU runs a
    # matmul with one batch axis ~1.6x faster than the same one with two.
    q_seq = q_seq.reshape(K * S, R * Q, H)
    # Query i of sequence s sits at position seq_lens - q_lens + i and sees keys at or before it.
    q_pos = (batch.seq_lens - batch.q_lens)[:, None] + i[None, :]  # [S, Q]

    def step(j, carry):
        m, l, acc = carry  # running max and sum [K·S, R·Q], output [K·S, R·Q, H]
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * n, n, axis=1)  # [S, n]
        # An 8-bit pool's values are widened to the queries' type for the matmuls.
        k_ctx = _read_pages(k_pool, layer, pages, G).astype(q.dtype)  # [K·S, c, H]
        v_ctx = _read_pages(v_pool, layer, pages, G).astype(q.dtype)
        # The context as the left operand: with few query rows (R·Q = 3 in a SmolLM2 decode)
        # XLA:CPU's matmul streams it once against them, ~1.7x faster than q·kᵀ (which is
        # ~1.4x faster at prefill, where this matmul is a small part of the step).
        scores = _batched_dot(k_ctx, q_seq, 2, 2).transpose(0, 2, 1)  # [K·S, R·Q, c]
        key_pos = j * c + jnp.arange(c)  # [c]
        visible = key_pos[None, None, :] <= q_pos[:, :, None]  # [S, Q, c]
        visible = jnp.broadcast_to(visible[None, :, None], (K, S, R, Q, c))
        scores = jnp.where(visible.reshape(K * S, R * Q, c), scores * scale, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])  # [K·S, R·Q, c]
        rescale = jnp.exp(m - m_new)
        pv = _batched_dot(p.astype(v_ctx.dtype), v_ctx, 2, 1)  # [K·S, R·Q, H]
        return m_new, l * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

    # Every query sees key 0, which lies in the first loop step: after it, l > 0 on every row.
    num_steps = jnp.maximum(1, -(-jnp.max(batch.seq_lens) // c))
    init = (
        jnp.full((K * S, R * Q), _MASKED, jnp.float32),
        jnp.zeros((K * S, R * Q), jnp.float32),
        jnp.zeros((K * S, R * Q, H), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_steps, step, init)
    out = (acc / l[..., None]).astype(q.dtype).reshape(K, S, R, Q, H)
    out = out.transpose(1, 3, 0, 2, 4).reshape(S * Q, N, H)  # [S·Q, N, H]

    # Back to token-major rows: token t is query (t - q_start) of its sequence.
    s = batch.token_seq
    src = s * Q + jnp.clip(jnp.arange(T) - batch.q_start[s], 0, Q - 1)  # [T]
    return out[src]


def _read_pages(pool: jax.Array, layer: jax.Array, pages: jax.Array, G: int) -> jax.Array:
    """Pages `[S, n]` of layer `layer` of the pool `[L, K, slots, H]` as `[K·S, n·G, H]`."""
    (S, n), (_, K, _, H) = pages.shape, pool.shape
    starts = jnp.stack([jnp.full_like(pages, layer), pages * G], axis=-1)  # [S, n, 2]
    ctx = jax.lax.gather(pool, starts, _PAGE_GATHER, (1, K, G, H), mode="clip")
    return ctx.transpose(2, 0, 1, 3, 4).reshape(K * S, n * G, H)  # from [S, n, K, G, H]


def _batched_dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """`a [X, ...]` times `b [X, ...]` for each index of the leading axis X, contracting
    `a_axis` with `b_axis`; float32. The result is `[X, a's free axis, b's free axis]`."""
    dims = (((a_axis,), (b_axis,)), ((0,), (0,)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
