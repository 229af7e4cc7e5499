"""How long a context may be, how many KV pages the pool gets, and how many new tokens an
extend step takes by default."""

from __future__ import annotations

import logging
import os

from jaxsgl.config import ModelConfig
from jaxsgl.engine.options import DEFAULT_CHUNKED_PREFILL_SIZE, EngineOptions
from jaxsgl.model.forward_batch import kv_dtype, kv_pool_bytes
from jaxsgl.model.loader import LoadedModel
from jaxsgl.sharding import num_devices, sharded_config, tensor_size

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 16384  # no memory statistics on the CPU: a modest pool
# NCCL's buffers (and CUDA's own) live outside XLA's pool. On 80 GB H100s at TP 2 and TP 4,
# 6 GB outside it was too little (the first all-reduce could not allocate its memory and the
# others waited for it forever) and 10 GB enough; 11 GB served on H200s (RESULTS.md).
MIN_COLLECTIVE_HEADROOM = 8 * 2**30


def context_length_for(options: EngineOptions, cfg: ModelConfig) -> int:
    if options.context_length is None:
        return cfg.max_position_embeddings
    if options.context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {options.context_length}")
    return options.context_length


def chunked_prefill_default(platform: str, memory_bytes: int | None, tp_size: int = 1) -> int:
    """Extend step size for a device: 2048 tokens on CPUs and GPUs under 32 GiB, 4096 under
    64 GiB, 8192 above, and 16384 there when tensor parallelism splits the model over 4 cards
    or more. Larger steps spread each step's fixed cost (reading the weights, the host's work,
    tensor-parallel all-reduces) over more tokens; on H200s, 8192-token steps served the
    multi-turn scenario 1.07x (TP 1) to 1.17x (TP 2) faster than 2048, and 16384 served it 1.06x
    faster than 8192 at TP 4 while TP 1 and TP 2 did not move (RESULTS.md)."""
    if platform == "cpu" or not memory_bytes or memory_bytes < 32 * 2**30:
        return DEFAULT_CHUNKED_PREFILL_SIZE
    if memory_bytes < 64 * 2**30:
        return 4096
    return 16384 if tp_size >= 4 else 8192


def chunked_prefill_size_for(options: EngineOptions, loaded: LoadedModel) -> int:
    """`options.chunked_prefill_size`, or the device's default when it is None; a size over
    `options.max_prefill_tokens` (which caps every step, `EngineOptions.chunk_tokens`) is
    reported."""
    size = options.chunked_prefill_size
    if size is None:
        device, stats = _memory_stats(loaded)
        tp = tensor_size(loaded.mesh)
        size = chunked_prefill_default(device.platform, stats.get("bytes_limit"), tp)
        logger.info(
            "chunked prefill: %d tokens an extend step (%s, TP %d)", size, device.device_kind, tp
        )
    if size > options.max_prefill_tokens:
        logger.warning(
            "chunked prefill size %d is over max prefill tokens: an extend step takes at most "
            "%d new tokens (raise --max-prefill-tokens for larger steps)",
            size,
            options.max_prefill_tokens,
        )
    return size


def kv_pages_for(options: EngineOptions, loaded: LoadedModel, context_length: int) -> int:
    """Pages in the pool, page 0 (scratch) included."""
    G = options.page_size
    _, stats = _memory_stats(loaded)
    if "bytes_limit" in stats:  # however the pool is sized, the collectives need room outside
        check_collective_headroom(stats["bytes_limit"], tensor_size(loaded.mesh))
    if options.max_total_tokens is not None:
        tokens = options.max_total_tokens
    else:
        tokens = _tokens_from_memory(options, loaded, stats) or CPU_DEFAULT_TOKENS
    num_pages = -(-tokens // G) + 1
    if (num_pages - 1) * G < min(context_length, 2 * G):
        raise ValueError(f"a KV pool of {tokens} tokens is too small to run anything")
    return num_pages


def _memory_stats(loaded: LoadedModel):
    """The model's first device and its memory statistics ({} on CPUs, which keep none)."""
    device = loaded.mesh.devices.flat[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return device, stats or {}


def check_collective_headroom(bytes_limit: int, tp_size: int) -> None:
    """Warn when tensor parallelism's collectives may not find memory outside XLA's pool of
    `bytes_limit`, the pool being XLA_PYTHON_CLIENT_MEM_FRACTION of the device (JAX's default
    0.75)."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    outside = bytes_limit * (1 - fraction) / fraction
    if tp_size > 1 and outside < MIN_COLLECTIVE_HEADROOM:
        logger.warning(
            "XLA_PYTHON_CLIENT_MEM_FRACTION=%s leaves %.1f GiB of each device outside XLA's "
            "pool; TP %d's all-reduces need about %d GiB there (with less, the first one can "
            "hang): lower it",
            fraction,
            outside / 2**30,
            tp_size,
            MIN_COLLECTIVE_HEADROOM // 2**30,
        )


def _tokens_from_memory(options: EngineOptions, loaded: LoadedModel, stats: dict) -> int | None:
    """The pool's tokens from the device's memory statistics `stats` (None without them)."""
    if "bytes_limit" not in stats:
        return None
    budget = stats["bytes_limit"] * options.mem_fraction_static - stats["bytes_in_use"]
    cfg = sharded_config(loaded.config, tensor_size(loaded.mesh))
    # The pool splits over kv heads across the tensor axis (when they divide it).
    shards = tensor_size(loaded.mesh) if cfg.num_kv_heads % tensor_size(loaded.mesh) == 0 else 1
    per_token = kv_pool_bytes(cfg, 1, 1, kv_dtype(options.kv_cache_dtype, loaded.dtype)) / shards
    tokens = int(budget // per_token)
    logger.info(
        "KV pool: %.1f GiB per device -> %d tokens (%d devices)",
        budget / 2**30,
        tokens,
        num_devices(loaded.mesh),
    )
    return max(tokens, 0) or None
