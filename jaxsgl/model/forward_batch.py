"""What crosses into the jitted step: one ragged batch and the paged KV pool.

Letters as in `jaxsgl.model.llama`, plus P pages per sequence in the page table, G page size,
C = P·G context slots per sequence, Q the padded number of new tokens per sequence.

A step holds S sequences whose new tokens lie back to back in T rows. Sequence s owns rows
`q_start[s] : q_start[s] + q_lens[s]`; its context after the step is `seq_lens[s]` tokens whose
K/V live in the pages `page_table[s, :ceil(seq_lens[s] / G)]`. Extend (prefill, a chunk, a
radix-cache hit) and decode (q_lens = 1) are the same structure.

Example, page size 4: sequence 0 has a cached prefix [a b c d e] in pages [7, 3] and two new
tokens [f g]; sequence 1 decodes its 3rd token. Then tokens = [f g x], q_start = [0 2],
q_lens = [2 1], seq_lens = [7 3], positions = [5 6 2], page_table = [[7 3], [9 0]],
write_slots = [3*4+1, 3*4+2, 9*4+2] = [13 14 38].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsgl.config import ModelConfig

# Page 0 is never given to a sequence: padding tokens write their K/V there.
SCRATCH_PAGE = 0


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "tokens",
        "positions",
        "write_slots",
        "token_seq",
        "q_start",
        "q_lens",
        "seq_lens",
        "page_table",
        "logits_indices",
    ],
    meta_fields=["max_q_len", "page_size"],
)
@dataclasses.dataclass(frozen=True)
class ForwardBatch:
    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, position inside the token's own sequence
    write_slots: jax.Array  # [T] int32, pool slot (page * G + offset) for the token's new K/V
    token_seq: jax.Array  # [T] int32, sequence of each token (padding: 0, never read back)
    q_start: jax.Array  # [S] int32, first row of each sequence's new tokens
    q_lens: jax.Array  # [S] int32, new tokens per sequence (0 for padding sequences)
    seq_lens: jax.Array  # [S] int32, context length after this step
    page_table: jax.Array  # [S, P] int32, context pages in order (padding: SCRATCH_PAGE)
    logits_indices: jax.Array  # [R] int32, rows of T whose next-token logits are wanted
    max_q_len: int  # Q, static: every q_lens[s] <= Q (1 for decode steps)
    page_size: int  # G, static


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    """Keys and values of every layer, one slot per token: `[L, K, num_pages * G, H]`.

    Head-major, so a kv head's pages are contiguous (what paged kernels read), and the K axis
    is what tensor parallelism splits.
    """

    k: jax.Array  # [L, K, P_total * G, H]
    v: jax.Array  # [L, K, P_total * G, H]

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]


def kv_pool_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """The pool splits over kv heads when they divide the tensor axis, like the k/v weights."""
    tp = int(mesh.shape["tensor"])
    heads = "tensor" if cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0 else None
    return NamedSharding(mesh, PartitionSpec(None, heads, None, None))


_KV_DTYPES = {"fp8_e5m2": jnp.float8_e5m2, "fp8_e4m3": jnp.float8_e4m3fn}


def kv_dtype(kv_cache_dtype: str, model_dtype):
    """The pool's element type for `--kv-cache-dtype`: the model's for "auto", else an 8-bit
    float (values stored as they are, no scale)."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(model_dtype)
    if kv_cache_dtype not in _KV_DTYPES:
        names = ", ".join(_KV_DTYPES)
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not auto or one of {names}")
    return jnp.dtype(_KV_DTYPES[kv_cache_dtype])


def make_kv_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype, mesh: Mesh) -> KVPool:
    """A zeroed pool for the device model config `cfg` (kv heads already replicated)."""
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages * page_size, cfg.head_dim)
    sharding = kv_pool_sharding(cfg, mesh)
    # A sharding constraint rather than out_shardings: the arrays then carry the same sharding
    # a jitted step returns for them, so the first step compiles the program all later use.
    zeros = jax.jit(lambda: jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding))
    return KVPool(k=zeros(), v=zeros())


def kv_pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> int:
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return per_slot * num_pages * page_size


def bucket(n: int, minimum: int = 1) -> int:
    """The padded size for `n`: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step, as the host sees it."""

    tokens: Sequence[int]  # new tokens of this step
    prefix_len: int  # tokens of this sequence already in the pool
    pages: Sequence[int]  # pages covering at least prefix_len + len(tokens) tokens
    all_logits: bool = False  # logits at every new token (prompt logprobs), else the last only


@dataclasses.dataclass(frozen=True)
class Shape:
    """Padded dimensions of a step; every distinct Shape is one compiled program."""

    T: int  # tokens
    S: int  # sequences
    Q: int  # new tokens per sequence
    P: int  # pages per sequence
    R: int  # logits rows


def pack_chunks(
    chunks: Sequence[SeqChunk], page_size: int, shape: Shape, num_steps: int = 1
) -> ForwardBatch:
    """Host-side (numpy) batch for `chunks`, padded to `shape`.

    The logits rows come in chunk order: for each chunk its last token, or all of its new
    tokens when `all_logits`. `logits_rows(chunks)` gives the same layout for reading back.
    A decode batch run for `num_steps` steps in one launch (`advance_decode`) gets page
    tables covering every step's token.
    """
    if all(len(c.tokens) == 1 and not c.all_logits for c in chunks):
        return _pack_single_tokens(chunks, page_size, shape, num_steps)
    assert num_steps == 1, "only decode batches run several steps"
    return _pack_any(chunks, page_size, shape)


def advance_decode(batch: ForwardBatch, steps: jax.Array, tokens: jax.Array) -> ForwardBatch:
    """On the device: the decode batch `steps` tokens further on, with new `tokens [T]`.

    Decode rows are sequences (T = S, row t is sequence t). A real row's token moves `steps`
    positions on and writes its K/V into that position's slot of its own table; padding rows
    (q_lens 0) stay where they were, on the scratch page. Page size 4, a row at position 6
    with table [7 3 9]: two steps on it sits at 8, writes slot 9*4 + 0 = 36, sees 9 tokens.
    """
    real = batch.q_lens > 0  # [T]
    G = batch.page_size
    positions = batch.positions + steps  # [T]
    rows = jnp.arange(positions.shape[0])
    page = batch.page_table[rows, jnp.minimum(positions // G, batch.page_table.shape[1] - 1)]
    return dataclasses.replace(
        batch,
        tokens=tokens,
        positions=jnp.where(real, positions, batch.positions),
        write_slots=jnp.where(real, page * G + positions % G, batch.write_slots),
        seq_lens=jnp.where(real, batch.seq_lens + steps, batch.seq_lens),
    )


def _pack_single_tokens(
    chunks: Sequence[SeqChunk], G: int, shape: Shape, num_steps: int = 1
) -> ForwardBatch:
    """`pack_chunks` for a decode step (one new token per chunk), with array operations in
    place of a loop over chunks: the host builds one of these per step."""
    n = len(chunks)
    assert n <= min(shape.T, shape.S, shape.R) and shape.Q >= 1
    prefix = np.fromiter((c.prefix_len for c in chunks), np.int32, n)  # [n]
    seq_lens = prefix + 1
    num_pages = -(-(prefix + num_steps) // G)  # the pages of the last step's token too
    assert num_pages.max() <= shape.P
    page_table = np.full((shape.S, shape.P), SCRATCH_PAGE, np.int32)
    for s, c in enumerate(chunks):
        page_table[s, : num_pages[s]] = c.pages[: num_pages[s]]
    rows = np.arange(n, dtype=np.int32)
    pad = lambda values, size: np.concatenate(  # [size], zeros after the n chunks
        [values, np.zeros(size - n, np.int32)]
    ).astype(np.int32)
    write_slots = np.arange(shape.T, dtype=np.int32) % G + SCRATCH_PAGE * G
    write_slots[:n] = page_table[rows, prefix // G] * G + prefix % G
    return ForwardBatch(
        tokens=pad(np.fromiter((c.tokens[0] for c in chunks), np.int32, n), shape.T),
        positions=pad(prefix, shape.T),
        write_slots=write_slots,
        token_seq=pad(rows, shape.T),
        q_start=pad(rows, shape.S),
        q_lens=pad(np.ones(n, np.int32), shape.S),
        seq_lens=pad(seq_lens, shape.S),
        page_table=page_table,
        logits_indices=pad(rows, shape.R),
        max_q_len=shape.Q,
        page_size=G,
    )


def _pack_any(chunks: Sequence[SeqChunk], page_size: int, shape: Shape) -> ForwardBatch:
    T, S, Q, P, R = shape.T, shape.S, shape.Q, shape.P, shape.R
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    write_slots = np.arange(T, dtype=np.int32) % page_size + SCRATCH_PAGE * page_size
    token_seq = np.zeros(T, np.int32)
    q_start = np.zeros(S, np.int32)
    q_lens = np.zeros(S, np.int32)
    seq_lens = np.zeros(S, np.int32)
    page_table = np.full((S, P), SCRATCH_PAGE, np.int32)
    logits_indices = np.zeros(R, np.int32)
    row = out = 0
    for s, c in enumerate(chunks):
        n, end = len(c.tokens), c.prefix_len + len(c.tokens)
        num_pages = -(-end // page_size)
        assert n >= 1 and len(c.pages) >= num_pages and num_pages <= P and n <= Q
        pos = np.arange(c.prefix_len, end)
        pages = np.asarray(c.pages[:num_pages], np.int32)
        tokens[row : row + n] = c.tokens
        positions[row : row + n] = pos
        write_slots[row : row + n] = pages[pos // page_size] * page_size + pos % page_size
        token_seq[row : row + n] = s
        q_start[s], q_lens[s], seq_lens[s] = row, n, end
        page_table[s, :num_pages] = pages
        wanted = np.arange(row, row + n) if c.all_logits else np.array([row + n - 1])
        logits_indices[out : out + len(wanted)] = wanted
        row, out = row + n, out + len(wanted)
    assert row <= T and out <= R and len(chunks) <= S
    return ForwardBatch(
        tokens=tokens,
        positions=positions,
        write_slots=write_slots,
        token_seq=token_seq,
        q_start=q_start,
        q_lens=q_lens,
        seq_lens=seq_lens,
        page_table=page_table,
        logits_indices=logits_indices,
        max_q_len=Q,
        page_size=page_size,
    )


def fit_shape(
    chunks: Sequence[SeqChunk], page_size: int, minimum: Shape | None = None, num_steps: int = 1
) -> Shape:
    """The smallest power-of-two Shape holding `chunks` (and at least `minimum`), with pages
    for `num_steps - 1` more tokens per chunk (a decode batch run for several steps)."""
    lo = minimum or Shape(T=1, S=1, Q=1, P=1, R=1)
    extra = num_steps - 1
    pages = max(-(-(c.prefix_len + len(c.tokens) + extra) // page_size) for c in chunks)
    rows = sum(len(c.tokens) if c.all_logits else 1 for c in chunks)
    return Shape(
        T=bucket(sum(len(c.tokens) for c in chunks), lo.T),
        S=bucket(len(chunks), lo.S),
        Q=bucket(max(len(c.tokens) for c in chunks), lo.Q),
        P=bucket(pages, lo.P),
        R=bucket(rows, lo.R),
    )
