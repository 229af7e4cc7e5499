"""Which implementation attends over the paged pool: `native` (plain JAX, any device) or
`pallas` (the kernels of `pallas_kernels`, the default on GPUs).

The backend is a frozen, hashable value that the model holds as a static attribute, so the
choice is part of the compiled program, not a global. Under tensor parallelism the kernels run
per device on its local heads inside `shard_map`: q heads and the pool's kv heads split over the
"tensor" axis together (or neither does, when the heads do not divide it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxsgl.model import attention
from jaxsgl.model.forward_batch import ForwardBatch
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.ragged_extend import ragged_extend_attention

BACKENDS = ("native", "pallas")


def default_backend(platform: str) -> str:
    return "pallas" if platform == "gpu" else "native"


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str = "native"
    mesh: Mesh | None = None  # set for `pallas`: the kernels run per device
    heads_sharded: bool = False  # q and kv heads split over the mesh's "tensor" axis
    interpret: bool = False  # Pallas interpret mode (kernels on the CPU, for tests)

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"attention backend {self.name!r} is not one of {BACKENDS}")
        if self.name == "pallas" and self.mesh is None:
            raise ValueError("the pallas attention backend needs the device mesh")

    def __call__(
        self,
        q: jax.Array,  # [T, N, H]
        k_pool: jax.Array,  # [L, K, slots, H]
        v_pool: jax.Array,
        layer: jax.Array,  # [] int32
        batch: ForwardBatch,
        *,
        scale: float,
    ) -> jax.Array:
        """Causal attention of the step's new tokens over their paged context; `[T, N, H]`."""
        if self.name == "native":
            return attention.paged_attention(q, k_pool, v_pool, layer, batch, scale=scale)
        heads = "tensor" if self.heads_sharded else None
        qs, pool = PartitionSpec(None, heads, None), PartitionSpec(None, heads, None, None)
        local = jax.shard_map(
            lambda q, k, v, layer, batch: _pallas(q, k, v, layer, batch, scale, self.interpret),
            mesh=self.mesh,
            in_specs=(qs, pool, pool, PartitionSpec(), PartitionSpec()),
            out_specs=qs,
            check_vma=False,
        )
        return local(q, k_pool, v_pool, layer, batch)


def _pallas(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    batch: ForwardBatch,
    scale: float,
    interpret: bool,
) -> jax.Array:
    def decode(seq_lens: jax.Array) -> jax.Array:
        """[S, N, H]: each sequence's one token (row q_start[s]) over its first seq_lens[s] keys."""
        return paged_decode_attention(
            q[batch.q_start],
            k_pool,
            v_pool,
            layer,
            batch.page_table,
            seq_lens,
            page_size=batch.page_size,
            scale=scale,
            interpret=interpret,
        )

    if batch.max_q_len == 1:  # a decode step: back to rows by token_seq
        return decode(batch.seq_lens)[batch.token_seq]
    # One-token runs (decode rows riding in a prefill step, one-token prompts) go to the decode
    # kernel, which reads each page once for the whole kv group; in the extend kernel each
    # would fill a query block of one valid row. The extend kernel skips them (no new tokens)
    # and leaves their rows zero.
    single = batch.q_lens == 1  # [S]
    out = ragged_extend_attention(
        q,
        k_pool,
        v_pool,
        layer,
        batch.q_start,
        jnp.where(single, 0, batch.q_lens),
        batch.seq_lens,
        batch.page_table,
        max_q_len=batch.max_q_len,
        page_size=batch.page_size,
        scale=scale,
        interpret=interpret,
    )
    rows = jnp.where(single, batch.q_start, q.shape[0])  # past the end: dropped
    return out.at[rows].set(decode(jnp.where(single, batch.seq_lens, 0)), mode="drop")
