"""Which implementation attends over the paged pool: `native` (plain JAX, any device) or
`pallas` (the kernels of `pallas_kernels`, the default on GPUs).

The backend is a frozen, hashable value that the model holds as a static attribute, so the
choice is part of the compiled program, not a global. Under tensor parallelism the kernels run
per device on its local heads inside `shard_map`: q heads and the pool's kv heads split over the
"tensor" axis together (or neither does, when the heads do not divide it).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxsgl.model import attention
from jaxsgl.model.forward_batch import ForwardBatch
from pallas_kernels import ragged_extend_hopper
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.ragged_extend import ragged_extend_attention

BACKENDS = ("native", "pallas")
EXTEND_KERNELS = ("triton", "hopper")
# Extend steps of fewer tokens keep the Triton kernel even where the Hopper one runs: there the
# weights' reads and matmuls dwarf attention, and each step shape with the Hopper kernel costs
# warm-up about a second more of lowering (RESULTS.md, "Server start").
HOPPER_MIN_TOKENS = 1024


def default_backend(platform: str) -> str:
    return "pallas" if platform == "gpu" else "native"


def extend_kernel(device, dtype, head_dim: int, page_size: int) -> str:
    """The pallas backend's extend kernel: the Mosaic GPU one where it runs (Hopper GPUs,
    16-bit pools, pages of a multiple of 8; for steps of at least HOPPER_MIN_TOKENS tokens),
    else the Triton-lowered one. The environment variable JAXSGL_EXTEND_KERNEL (triton or
    hopper) overrides the choice."""
    chosen = os.environ.get("JAXSGL_EXTEND_KERNEL")
    if chosen is not None:
        if chosen not in EXTEND_KERNELS:
            raise ValueError(f"JAXSGL_EXTEND_KERNEL={chosen!r} is not one of {EXTEND_KERNELS}")
        return chosen
    supported = ragged_extend_hopper.supported(device, dtype, head_dim, page_size)
    return "hopper" if supported else "triton"


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str = "native"
    mesh: Mesh | None = None  # set for `pallas`: the kernels run per device
    heads_sharded: bool = False  # q and kv heads split over the mesh's "tensor" axis
    interpret: bool = False  # Pallas interpret mode (kernels on the CPU, for tests)
    extend: str = "triton"  # the pallas backend's extend kernel, one of EXTEND_KERNELS

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"attention backend {self.name!r} is not one of {BACKENDS}")
        if self.extend not in EXTEND_KERNELS:
            raise ValueError(f"extend kernel {self.extend!r} is not one of {EXTEND_KERNELS}")
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
            lambda q, k, v, layer, batch: _pallas(
                q, k, v, layer, batch, scale, self.interpret, self.extend
            ),
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
    extend: str,
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
    # and their rows are overwritten below.
    single = batch.q_lens == 1  # [S]
    args = (q, k_pool, v_pool, layer, batch.q_start, jnp.where(single, 0, batch.q_lens))
    args += (batch.seq_lens, batch.page_table)
    sizes = dict(max_q_len=batch.max_q_len, page_size=batch.page_size, scale=scale)
    if extend == "hopper" and q.shape[0] >= HOPPER_MIN_TOKENS:
        out = ragged_extend_hopper.ragged_extend_attention_hopper(*args, **sizes)
    else:
        out = ragged_extend_attention(*args, **sizes, interpret=interpret)
    rows = jnp.where(single, batch.q_start, q.shape[0])  # past the end: dropped
    return out.at[rows].set(decode(jnp.where(single, batch.seq_lens, 0)), mode="drop")
