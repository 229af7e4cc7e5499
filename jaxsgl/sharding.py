"""Logical axes → mesh axes: the one place that decides how weights and caches are split.

The mesh has axes `("data", "tensor")`. Tensor parallelism splits q/k/v/gate/up by columns
(heads, ffn) and o/down by rows, so each layer needs one all-reduce after attention and one after
the MLP; XLA inserts them from these shardings. q/k/v are one weight split over kv heads (each
with its query heads), gate/up one split over the ffn (`jaxsgl.model.llama`). Embedding and LM
head are split over the vocab. When there are fewer kv heads than tensor shards, each kv head is
repeated so every shard holds the kv head its query heads read (`kv_head_repeats`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsgl.config import ModelConfig

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "tensor")


def make_mesh(
    tp_size: int = 1, dp_size: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = tp_size * dp_size
    if tp_size < 1 or dp_size < 1:
        raise ValueError(f"tp_size={tp_size} and dp_size={dp_size} must be >= 1")
    if need > len(devices):
        raise ValueError(
            f"tp_size={tp_size} x dp_size={dp_size} needs {need} devices, "
            f"but only {len(devices)} are visible"
        )
    grid = np.array(devices[:need], dtype=object).reshape(dp_size, tp_size)
    return Mesh(grid, MESH_AXES)


def tensor_size(mesh: Mesh) -> int:
    return int(mesh.shape["tensor"])


def kv_head_repeats(cfg: ModelConfig, tp: int) -> int:
    """How many copies of each kv head the sharded model keeps (1 = no replication).

    Example: 8 q heads, 2 kv heads, tp 4 -> 2 copies: kv heads [a b] become [a a b b], and shard s
    holds q heads 2s, 2s+1 with kv head s, which is a copy of the one they read.
    """
    K, N = cfg.num_kv_heads, cfg.num_heads
    if tp <= K or N % tp or tp % K:
        return 1
    return tp // K


def sharded_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config the device model is built with: kv heads replicated where needed."""
    r = kv_head_repeats(cfg, tp)
    return cfg if r == 1 else dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to a mesh axis (or None: replicated)."""

    mesh: Mesh
    rules: dict[str, str | None]

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        parts = []
        for name, dim in zip(logical_axes, shape, strict=True):
            axis = self.rules.get(name) if name else None
            if axis is not None and dim % self.mesh.shape[axis]:
                # An uneven split is not representable; keep this dimension whole.
                logger.info(
                    "axis %s of size %d not divisible by %s=%d: replicated",
                    name,
                    dim,
                    axis,
                    self.mesh.shape[axis],
                )
                axis = None
            parts.append(axis)
        return PartitionSpec(*parts)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))


def model_rules(cfg: ModelConfig, mesh: Mesh) -> ShardingRules:
    """Rules for a model whose config already went through `sharded_config`."""
    tp = tensor_size(mesh)
    heads_split = cfg.num_heads % tp == 0
    if not heads_split and tp > 1:
        logger.warning(
            "%d q heads do not split over tensor size %d: attention is replicated",
            cfg.num_heads,
            tp,
        )
    return ShardingRules(
        mesh,
        {
            "vocab": "tensor",
            "q_heads": "tensor" if heads_split else None,
            # Also splits the fused q/k/v weight: where kv heads stay whole, so do the query
            # heads fused with them, and "q_heads" splits only o's rows.
            "kv_heads": "tensor" if heads_split and cfg.num_kv_heads % tp == 0 else None,
            "mlp": "tensor",
            "embed": None,
            "head_dim": None,
            "layers": None,
        },
    )


def param_shardings(abstract_state, rules: ShardingRules) -> dict:
    """NamedShardings for an NNX state of Params carrying `logical_axes`, nested like
    `nnx.to_pure_dict(state)`."""
    nested: dict = {}
    for path, var in nnx.to_flat_state(abstract_state):
        *parents, leaf = path
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = rules.sharding(var.logical_axes, var.get_value().shape)
    return nested


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())
