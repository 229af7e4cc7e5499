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

# Finite, so a padding sequence with no visible key gets a harmless uniform softmax, not NaN.
_MASKED = -1e30

# Context slots read per loop step. Small enough that a step's keys and values stay in cache
# (decode at S = 64 reads 2·K·S·64·H floats, ~3 MB for SmolLM2), large enough that the loop's
# fixed cost per step is small next to its work.
CHUNK_SLOTS = 64

# Gathers pool[layer, :, page·G : page·G + G, :] for every (layer, page·G) start. The pool keeps
# its one shape: a paged view of it (a reshape) next to the in-place write makes XLA copy it.
_PAGE_GATHER = jax.lax.GatherDimensionNumbers(
    offset_dims=(2, 3, 4), collapsed_slice_dims=(0,), start_index_map=(0, 2)
)


def write_kv(pool: jax.Array, layer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Store `new [T, K, H]` at `slots [T]` of layer `layer` of the pool `[L, K, slots, H]`.
    Only the T rows are written: with the pool donated this is an in-place scatter."""
    # pool[layer, :, slots] indexes as [T, K, H]: the advanced indices' dimension comes first.
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
    L, K = k_pool.shape[:2]
    S = batch.page_table.shape[0]
    G, Q = batch.page_size, batch.max_q_len
    R = N // K  # q heads per kv head
    pages_per_chunk = max(1, CHUNK_SLOTS // G)
    c = pages_per_chunk * G  # slots per loop step

    # A whole number of chunks: the extra columns point at the scratch page and are masked.
    pad = -batch.page_table.shape[1] % pages_per_chunk
    page_table = jnp.pad(batch.page_table, ((0, 0), (0, pad)))  # [S, P'], P' = P + pad

    # Pad each sequence's queries to Q rows: rows[s, i] = q_start[s] + i.
    i = jnp.arange(Q)
    rows = jnp.clip(batch.q_start[:, None] + i[None, :], 0, T - 1)  # [S, Q]
    q_seq = q[rows].reshape(S, Q, K, R, H).transpose(2, 0, 3, 1, 4)  # [K, S, R, Q, H]
    # Query i of sequence s sits at position seq_lens - q_lens + i and sees keys at or before it.
    q_pos = (batch.seq_lens - batch.q_lens)[:, None] + i[None, :]  # [S, Q]

    def read(pool: jax.Array, pages: jax.Array) -> jax.Array:
        # Pages [S, n] of `layer` as [K, S, n·G, H]: one gathered slice per page.
        starts = jnp.stack([jnp.full_like(pages, layer), pages * G], axis=-1)  # [S, n, 2]
        ctx = jax.lax.gather(pool, starts, _PAGE_GATHER, (1, K, G, H), mode="clip")
        return ctx.transpose(2, 0, 1, 3, 4).reshape(K, S, -1, H)  # from [S, n, K, G, H]

    # In the loop C is the chunk's c slots, not the whole context.
    def step(j, carry):
        m, l, acc = carry  # running max and sum [K, S, R, Q], output [K, S, R, Q, H]
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * pages_per_chunk, pages_per_chunk, 1)
        k_ctx, v_ctx = read(k_pool, pages), read(v_pool, pages)  # [K, S, c, H] each
        scores = jnp.einsum("KSRQH,KSCH->KSRQC", q_seq, k_ctx, preferred_element_type=jnp.float32)
        key_pos = j * c + jnp.arange(c)  # [c]
        visible = key_pos[None, None, :] <= q_pos[:, :, None]  # [S, Q, c]
        scores = jnp.where(visible[None, :, None], scores * scale, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])  # [K, S, R, Q, c]
        rescale = jnp.exp(m - m_new)
        p_v = p.astype(v_ctx.dtype)
        pv = jnp.einsum("KSRQC,KSCH->KSRQH", p_v, v_ctx, preferred_element_type=jnp.float32)
        return m_new, l * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

    # Every query sees key 0, which lies in the first chunk: after it, l > 0 on every row.
    num_chunks = jnp.maximum(1, -(-jnp.max(batch.seq_lens) // c))
    init = (
        jnp.full((K, S, R, Q), _MASKED, jnp.float32),
        jnp.zeros((K, S, R, Q), jnp.float32),
        jnp.zeros((K, S, R, Q, H), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_chunks, step, init)
    out = (acc / l[..., None]).astype(q.dtype)  # [K, S, R, Q, H]
    out = out.transpose(1, 3, 0, 2, 4).reshape(S * Q, N, H)  # [S·Q, N, H]

    # Back to token-major rows: token t is query (t - q_start) of its sequence.
    s = batch.token_seq
    src = s * Q + jnp.clip(jnp.arange(T) - batch.q_start[s], 0, Q - 1)  # [T]
    return out[src]
