"""Ragged extend attention on Hopper GPUs: Mosaic GPU, TMA page copies, warpgroup matmuls.

The same function as `ragged_extend.ragged_extend_attention` (letters as there), written for
sm_90 the way FlashAttention 3 is: each thread block has three warpgroups. A memory warpgroup
copies key and value blocks into shared memory with the TMA unit, one copy per page, a few
blocks ahead; two compute warpgroups take 64 new tokens of one q head each and run QKᵀ and PV
as `wgmma`s from shared memory. The compute warpgroups take turns at the tensor cores (a
rendezvous barrier twice a block): one computes its softmax while the other's matmul runs, so
the exponentials hide behind the matmuls instead of following them.

Grid (q heads, work items), heads fastest: the R heads of a kv group run side by side and read
the same pages, which L2 then serves once. A work item is 2 · 64 new tokens of one sequence
(`ragged_extend.work_items`, longest first); rows past the last sequence form one more run
whose items only write zeros, so every row of the output is written and nothing needs a zeroed
buffer first. Rows inside a sequence of length 0 (runs the caller leaves to the decode
kernel) are left unwritten: the caller overwrites them.

Needs bf16 or f16, a head dim that is a multiple of 64 and pages of a multiple of 8 rows (a
TMA box must cover whole 8-row tiles of the swizzled shared-memory layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import LOG2_E, MASKED, cdiv, check_pool, check_runs
from pallas_kernels.ragged_extend import work_items

WARPGROUP_ROWS = 64  # rows of one wgmma: the new tokens a compute warpgroup owns
SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what wgmma takes here


def supported(device, dtype, head_dim: int, page_size: int, block_k: int = 128) -> bool:
    """Whether this kernel runs these shapes on `device` (a Hopper GPU)."""
    return (
        device.platform == "gpu"
        and str(getattr(device, "compute_capability", "")).startswith("9")
        and jnp.dtype(dtype) in SIXTEEN_BIT
        and head_dim % 64 == 0
        and page_size % 8 == 0
        and block_k % page_size == 0
    )


def ragged_extend_attention_hopper(
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
    block_k: int = 128,
    stages: int = 2,
) -> jax.Array:
    """Causal attention of each sequence's new tokens over its context; `[T, N, H]`.

    Sequences' rows are back to back from row 0 (`q_start` ascending); rows past the last
    sequence come back as zeros.
    """
    T, N, H = q.shape
    K = check_pool(k_pool, v_pool, page_size, q)
    check_runs(q_start, q_lens, seq_lens, page_table)
    if jnp.dtype(q.dtype) not in SIXTEEN_BIT or k_pool.dtype != q.dtype:
        raise ValueError(
            f"the Hopper extend kernel takes bf16 or f16 queries and a pool of the same type, "
            f"got {q.dtype} and {k_pool.dtype}"
        )
    if H % 64 or page_size % 8 or block_k % page_size or block_k % 64:
        raise ValueError(
            f"head dim {H} must be a multiple of 64, page size {page_size} of 8, and "
            f"block_k {block_k} a multiple of 64 and of the page size"
        )
    if max_q_len < 1 or stages < 2:
        raise ValueError(f"max_q_len {max_q_len} must be positive and stages {stages} >= 2")
    R = N // K
    slots = k_pool.shape[2]
    BQ, BK, G = WARPGROUP_ROWS, block_k, page_size
    item_rows = 2 * BQ  # new tokens of one work item: one per compute warpgroup
    pages_per_block = BK // G
    P = page_table.shape[1]
    P_pad = cdiv(P, pages_per_block) * pages_per_block
    page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, P_pad - P)))
    q_start, q_lens, seq_lens = (x.astype(jnp.int32) for x in (q_start, q_lens, seq_lens))

    # Rows past the last sequence are one more run, marked by a context of 0 tokens (a real
    # run of new tokens has at least as many tokens of context).
    end = jnp.max(q_start + q_lens)
    q_start = jnp.concatenate([q_start, end[None]])
    q_lens = jnp.concatenate([q_lens, (T - end)[None]])
    seq_lens = jnp.concatenate([seq_lens, jnp.zeros((1,), jnp.int32)])
    item_seq, item_block = work_items(q_lens, item_rows, T, T)  # the padding run may be T long
    W = item_seq.shape[0]
    c = scale * LOG2_E  # scores in base 2, scaled: exp2(x · c - m) = exp(x · scale - m')

    def body(refs, smem, bars, free_bars, turn):
        layer_ref, seq_ref, block_ref, start_ref, len_ref, ctx_ref, table_ref = refs[:7]
        q_ref, k_ref, v_ref, o_ref = refs[7:]
        head, w, wg = lax.axis_index("heads"), lax.axis_index("items"), lax.axis_index("wg")
        q_smem, o_smem, k_smem, v_smem = smem
        k_bars, v_bars, q_bars = bars
        k_free, v_free = free_bars

        def take_turn():  # both compute warpgroups meet here; they alternate at the tensor cores
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def attend(start, steps, max_steps, prefix, row0, head, wg):
            """[BQ, H] float32: this warpgroup's rows of the item, normalised."""
            q_tile = q_smem.at[wg]

            @pl.when(steps > 0)
            def _():
                # A run starts at any row, and a TMA copy into the swizzled tile layout wants
                # rows in whole tiles of 8: stage the rows plainly, then re-store them swizzled.
                staged = o_smem.at[wg]
                src = q_ref.at[pl.ds(row0 + start, BQ), pl.ds(head * H, H)]
                plgpu.copy_gmem_to_smem(src, staged, q_bars.at[wg])
                plgpu.barrier_wait(q_bars.at[wg])
                q_tile[...] = plgpu.load(staged, (), layout=plgpu.Layout.WGMMA, optimized=False)
                plgpu.commit_smem()
                plgpu.barrier_wait(k_bars.at[0])

            per_row, tile = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
            m = plgpu.layout_cast(jnp.full((BQ,), MASKED, jnp.float32), per_row)
            l = plgpu.layout_cast(jnp.zeros((BQ,), jnp.float32), per_row)
            acc = plgpu.layout_cast(jnp.zeros((BQ, H), jnp.float32), tile)
            pl.when(wg == 1)(take_turn)

            def step(i, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(i, stages)

                def qk(ref):
                    plgpu.wgmma(ref, q_tile, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return ref[...]

                x = pl.run_scoped(qk, plgpu.ACC((BQ, BK), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                x = x * c
                if masked:  # the diagonal: query at position p sees keys at or before p
                    iota = functools.partial(
                        plgpu.broadcasted_iota, jnp.int32, (BQ, BK), layout=plgpu.Layout.WGMMA
                    )
                    q_pos = prefix + start + iota(0)
                    k_pos = i * BK + iota(1)
                    x = jnp.where(k_pos <= q_pos, x, MASKED)
                m_new = jnp.maximum(m, x.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(x - lax.broadcast_in_dim(m_new, x.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(q_tile.dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_bars.at[slot])
                plgpu.barrier_wait(turn)  # the other warpgroup's QKᵀ has been issued

                def pv(ref):
                    plgpu.wgmma(ref, p16, v_smem.at[slot])

                    @pl.when(i + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_bars.at[lax.rem(i + 1, stages)])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def flush(i, _):  # blocks the other warpgroup still reads: release, keep turns
                slot = lax.rem(i, stages)
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            # Key blocks wholly at or before the first query need no mask.
            full = jnp.clip((prefix + start + 1) // BK, 0, steps)  # rows past the end: 0
            carry = (acc, m, l)
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(steps, max_steps, flush, None)
            pl.when(wg == 0)(take_turn)
            acc, _, l = carry
            return acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), acc.shape, [0])

        s = seq_ref[w]

        @pl.when(s >= 0)
        def _():
            q_len, seq_len, row0 = len_ref[s], ctx_ref[s], start_ref[s]
            prefix = seq_len - q_len
            first = block_ref[w] * item_rows  # the item's first new token

            def steps_of(g):  # key blocks warpgroup g reads: to its last valid query
                start = first + g * BQ
                stop = jnp.minimum(start + BQ, q_len)
                return jnp.where((start < q_len) & (seq_len > 0), cdiv(prefix + stop, BK), 0)

            max_steps = jnp.maximum(steps_of(0), steps_of(1))

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                start = first + wg * BQ
                rows = jnp.clip(q_len - start, 0, BQ)  # valid rows of this warpgroup
                steps = steps_of(wg)
                out = attend(start, steps, max_steps, prefix, row0, head, wg)
                o_smem.at[wg][...] = out.astype(o_smem.dtype)
                plgpu.commit_smem()
                _store_rows(o_smem.at[wg], o_ref, row0 + start, rows, head)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                # The pools come flattened to rows: layer, kv head, slot.
                base = (layer_ref[0] * K + head // R) * slots

                def load(step, slot, ref, dst, bar):
                    for j in range(pages_per_block):
                        page = table_ref[s, step * pages_per_block + j]
                        plgpu.copy_gmem_to_smem(
                            ref.at[pl.ds(pl.multiple_of(base + page * G, G), G)],
                            dst.at[slot, pl.ds(j * G, G)],
                            bar.at[slot],
                        )

                for i in range(stages):

                    @pl.when(i < max_steps)
                    def _(i=i):
                        load(i, i, k_ref, k_smem, k_bars)
                        load(i, i, v_ref, v_smem, v_bars)

                @pl.loop(0, max_steps - stages)
                def _(i):
                    slot = lax.rem(i, stages)
                    plgpu.barrier_wait(k_free.at[slot])
                    load(i + stages, slot, k_ref, k_smem, k_bars)
                    plgpu.barrier_wait(v_free.at[slot])
                    load(i + stages, slot, v_ref, v_smem, v_bars)

    def _store_rows(src, o_ref, row, count, head):
        """Copy the first `count` rows of `src [BQ, H]` to rows `row :` of head `head`: TMA
        boxes have static shapes, so a ladder of 64, 32, ..., 1 rows, each taken or not."""
        size = BQ
        while size >= 1:
            off = count & ~(2 * size - 1)

            @pl.when(count & size != 0)
            def _(off=off, size=size):
                plgpu.copy_smem_to_gmem(
                    src.at[pl.ds(off, size)], o_ref.at[pl.ds(row + off, size), pl.ds(head * H, H)]
                )

            size //= 2
        plgpu.wait_smem_to_gmem(0)

    def entry(*refs):
        swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, BQ, H), q.dtype, transforms=swizzled),
            plgpu.SMEM((2, BQ, H), q.dtype),
            plgpu.SMEM((stages, BK, H), q.dtype, transforms=swizzled),
            plgpu.SMEM((stages, BK, H), q.dtype, transforms=swizzled),
        )
        bars = (
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
        )
        free_bars = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: body(refs, *scoped),
            smem,
            bars,
            free_bars,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    kernel = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((T, N * H), q.dtype),
        grid=(N, W),
        grid_names=("heads", "items"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return kernel(
        jnp.asarray(layer, jnp.int32).reshape(1),
        item_seq,
        item_block,
        q_start,
        q_lens,
        seq_lens,
        page_table,
        q.reshape(T, N * H),  # 2-D refs: the TMA copies slice rows and columns, nothing else
        k_pool.reshape(-1, H),
        v_pool.reshape(-1, H),
    ).reshape(T, N, H)
