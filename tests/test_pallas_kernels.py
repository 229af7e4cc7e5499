"""Both attention kernels in interpret mode against their float32 references, on fresh random
data for every case: page sizes 1, 16 and 64, GQA ratios 1, 4 and 8, ragged lengths that are
not page multiples, empty prefixes and padding sequences, float32 and bfloat16."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import widened_queries
from pallas_kernels.paged_decode import (
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.ragged_extend import (
    ragged_extend_attention,
    ragged_extend_attention_reference,
    work_items,
)

H = 32
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Every (page size, GQA ratio) pair once, the dtypes alternating so each page size and each
# ratio meets both.
CASES = [
    (G, ratio, (jnp.float32, jnp.bfloat16)[(i + j) % 2])
    for i, G in enumerate((1, 16, 64))
    for j, ratio in enumerate((1, 4, 8))
]


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _pool(rng, num_slots: int, kv_heads: int, dtype, layers: int = 2):
    shape = (layers, kv_heads, num_slots, H)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    return k, v


def _page_tables(rng, seq_lens, page_size: int, num_pages: int):
    """Distinct random pages (never the scratch page 0) for each sequence, padded with 0."""
    P = max(1, max(-(-n // page_size) for n in seq_lens))
    free = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((len(seq_lens), P), np.int32)
    used = 0
    for s, n in enumerate(seq_lens):
        need = -(-n // page_size)
        table[s, :need] = free[used : used + need]
        used += need
    return jnp.asarray(table)


def _heads(ratio: int) -> tuple[int, int]:
    kv_heads = 1 if ratio == 8 else 2
    return kv_heads * ratio, kv_heads


@pytest.mark.parametrize(("page_size", "ratio", "dtype"), CASES)
def test_decode_matches_reference(page_size, ratio, dtype):
    rng = np.random.default_rng()
    N, K = _heads(ratio)
    seq_lens = [int(rng.integers(1, 200)), 1, 0, int(rng.integers(64, 300))]  # 0: padding
    num_pages = 2 + sum(-(-n // page_size) for n in seq_lens)
    k, v = _pool(rng, num_pages * page_size, K, dtype)
    table = _page_tables(rng, seq_lens, page_size, num_pages)
    q = jnp.asarray(rng.standard_normal((len(seq_lens), N, H)), dtype)
    args = (q, k, v, 1, table, jnp.asarray(seq_lens, jnp.int32))
    ref = paged_decode_attention_reference(*args, page_size=page_size, scale=H**-0.5)
    for splits in (1, 3):
        out = paged_decode_attention(
            *args, page_size=page_size, scale=H**-0.5, num_splits=splits, interpret=True
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        assert _relative_error(out, ref) < TOLERANCE[dtype], (splits, _relative_error(out, ref))
        assert not np.asarray(out[2], np.float32).any()  # the padding sequence


@pytest.mark.parametrize(("page_size", "ratio", "dtype"), CASES)
def test_extend_matches_reference(page_size, ratio, dtype):
    rng = np.random.default_rng()
    N, K = _heads(ratio)
    # A plain prefill (empty prefix), a radix hit (long prefix, short run), a later chunk, a
    # decode-like single token; no length a page multiple by design.
    q_lens = np.array([int(rng.integers(20, 40)), 3, int(rng.integers(17, 33)), 1])
    prefix = np.array([0, int(rng.integers(70, 150)), int(rng.integers(1, 60)), 45])
    seq_lens = q_lens + prefix
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    T = int(q_lens.sum()) + 5  # five padding rows at the end
    num_pages = 2 + sum(-(-n // page_size) for n in seq_lens)
    k, v = _pool(rng, num_pages * page_size, K, dtype)
    table = _page_tables(rng, seq_lens.tolist(), page_size, num_pages)
    q = jnp.asarray(rng.standard_normal((T, N, H)), dtype)
    args = (q, k, v, 1, *(jnp.asarray(a, jnp.int32) for a in (q_start, q_lens, seq_lens)), table)
    ref = ragged_extend_attention_reference(*args, page_size=page_size, scale=H**-0.5)
    out = ragged_extend_attention(
        *args,
        max_q_len=64,
        page_size=page_size,
        scale=H**-0.5,
        block_q=16,
        block_k=32,
        interpret=True,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]
    assert not np.asarray(out[T - 5 :], np.float32).any()  # padding rows stay zero


@pytest.mark.parametrize("pool_dtype", [jnp.float8_e5m2, jnp.float8_e4m3fn])
def test_kernels_read_8_bit_pools(pool_dtype):
    """`--kv-cache-dtype fp8_*`: bfloat16 queries over an 8-bit pool. Each kernel widens the
    pool's values to float16 (exactly: both 8-bit types fit in it) and must match its
    reference, which reads the same 8-bit values in float32."""
    rng = np.random.default_rng()
    G, (N, K) = 16, _heads(4)
    seq_lens = [int(rng.integers(1, 200)), 0, int(rng.integers(64, 300))]
    q_lens = np.array([int(rng.integers(20, 40)), 3, 1])  # the extend below, over prefixes
    prefix = np.array([0, int(rng.integers(70, 150)), 45])
    lens = q_lens + prefix
    pages = lambda lengths: sum(-(-int(n) // G) for n in lengths)
    num_pages = 2 + max(pages(seq_lens), pages(lens))  # one pool holds either case
    k, v = (x.astype(pool_dtype) for x in _pool(rng, num_pages * G, K, jnp.float32))
    table = _page_tables(rng, seq_lens, G, num_pages)
    q = jnp.asarray(rng.standard_normal((len(seq_lens), N, H)), jnp.bfloat16)
    args = (q, k, v, 1, table, jnp.asarray(seq_lens, jnp.int32))
    ref = paged_decode_attention_reference(*args, page_size=G, scale=H**-0.5)
    out = paged_decode_attention(*args, page_size=G, scale=H**-0.5, interpret=True)
    assert out.dtype == jnp.bfloat16 and _relative_error(out, ref) < 1e-2

    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    table = _page_tables(rng, lens.tolist(), G, num_pages)
    q = jnp.asarray(rng.standard_normal((int(q_lens.sum()), N, H)), jnp.bfloat16)
    args = (q, k, v, 0, *(jnp.asarray(a, jnp.int32) for a in (q_start, q_lens, lens)), table)
    ref = ragged_extend_attention_reference(*args, page_size=G, scale=H**-0.5)
    out = ragged_extend_attention(
        *args, max_q_len=64, page_size=G, scale=H**-0.5, block_q=16, block_k=32, interpret=True
    )
    assert out.dtype == jnp.bfloat16 and _relative_error(out, ref) < 1e-2


def test_queries_over_an_8_bit_pool_go_to_float16_within_its_range():
    q = jnp.asarray([[[1e5, -3e38, 0.5, -2.0]]], jnp.bfloat16)
    wide = widened_queries(q, jnp.float8_e4m3fn)
    assert wide.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(wide, np.float32), [[[65504, -65504, 0.5, -2.0]]])
    assert widened_queries(q, jnp.bfloat16) is q  # a 16-bit pool: the queries as they are
    q32 = q.astype(jnp.float32)
    assert widened_queries(q32, jnp.float8_e5m2) is q32  # float32 queries stay float32


@pytest.mark.parametrize("block_q", [16, 32])
def test_work_items_cover_every_query_block_once_longest_first(block_q):
    rng = np.random.default_rng()
    q_lens = rng.integers(0, 100, 9)
    q_lens[3] = 0  # a padding sequence
    T = int(q_lens.sum()) + 7
    seq, block = (np.asarray(a) for a in work_items(jnp.asarray(q_lens), block_q, 100, T))
    want = {(s, b) for s, n in enumerate(q_lens) for b in range(-(-int(n) // block_q))}
    real = seq >= 0
    assert sorted(zip(seq[real], block[real], strict=True)) == sorted(want)  # each once
    assert real[: len(want)].all() and not real[len(want) :].any()  # work first, then none
    from_end = -(-q_lens[seq[real]] // block_q) - 1 - block[real]
    assert (np.diff(from_end) >= 0).all()  # the blocks that see the most keys first


def test_extend_with_the_engines_padded_lengths():
    """The engine passes max_q_len = T (one program for any mix of lengths): the grid is
    then bounded by the tokens, and the result is the same."""
    rng = np.random.default_rng()
    N, K = _heads(4)
    q_lens = np.array([1, 37, 1, 1, 20, 3])
    prefix = np.array([30, 0, 70, 5, 16, 100])
    seq_lens = q_lens + prefix
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    T = 64
    num_pages = 2 + sum(-(-n // 16) for n in seq_lens)
    k, v = _pool(rng, num_pages * 16, K, jnp.float32)
    table = _page_tables(rng, seq_lens.tolist(), 16, num_pages)
    q = jnp.asarray(rng.standard_normal((T, N, H)), jnp.float32)
    args = (q, k, v, 0, *(jnp.asarray(a, jnp.int32) for a in (q_start, q_lens, seq_lens)), table)
    ref = ragged_extend_attention_reference(*args, page_size=16, scale=H**-0.5)
    out = ragged_extend_attention(*args, max_q_len=T, page_size=16, scale=H**-0.5, interpret=True)
    assert _relative_error(out, ref) < TOLERANCE[jnp.float32]


def test_decode_rejects_bad_shapes():
    q = jnp.zeros((2, 4, H))
    k = jnp.zeros((1, 2, 64, H))
    table, lens = jnp.zeros((2, 4), jnp.int32), jnp.ones(2, jnp.int32)
    kw = dict(page_size=16, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="kv heads"):
        paged_decode_attention(jnp.zeros((2, 3, H)), k, k, 0, table, lens, **kw)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention(jnp.zeros((2, 4, 16)), k, k, 0, table, lens, **kw)
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attention(q, k, k, 0, table[:1], lens, **kw)
    with pytest.raises(ValueError, match="whole pages"):
        paged_decode_attention(q, k, k, 0, table, lens, page_size=48, scale=1.0)
    with pytest.raises(ValueError, match=r"\[L, K, slots, H\]"):
        paged_decode_attention(q, k[0], k[0], 0, table, lens, **kw)


def test_extend_rejects_bad_shapes():
    q = jnp.zeros((8, 4, H))
    k = jnp.zeros((1, 2, 64, H))
    ones = jnp.ones(2, jnp.int32)
    table = jnp.zeros((2, 4), jnp.int32)
    kw = dict(max_q_len=8, page_size=16, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        ragged_extend_attention(q, k, k, 0, ones, ones, ones, table, block_q=24, **kw)
    with pytest.raises(ValueError, match=r"\[S\]"):
        ragged_extend_attention(q, k, k, 0, ones, ones[:1], ones, table, **kw)
    with pytest.raises(ValueError, match="kv heads"):
        ragged_extend_attention(jnp.zeros((8, 3, H)), k, k, 0, ones, ones, ones, table, **kw)
