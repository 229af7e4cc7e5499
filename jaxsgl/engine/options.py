"""Engine options: one frozen dataclass carrying SGLang's server flags under their names."""

from __future__ import annotations

import dataclasses
from typing import Any

SCHEDULE_POLICIES = ("fcfs", "lpm", "dfs-weight")
GRAMMAR_BACKENDS = ("llguidance", "none")
LOAD_BALANCE_METHODS = ("cache_aware", "round_robin", "shortest_queue")
DEFAULT_CHUNKED_PREFILL_SIZE = 2048  # CPUs and small GPUs (see sizing.chunked_prefill_size_for)
# The KV pool's element type: the model's (auto), or 8-bit floats (half the bytes of a
# 16-bit pool: twice the tokens in the same memory, half the reads of a decode step).
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineOptions:
    model_path: str | None = None  # None: the embedded SmolLM2
    tokenizer_path: str | None = None  # None: the model's own (dummy weights: none)
    load_format: str = "auto"
    dtype: str = "auto"
    tp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1  # hosts one mesh spans (jax.distributed); rank 0 leads, the rest follow
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of rank 0's coordinator
    load_balance_method: str = "cache_aware"  # data-parallel replicas: which gets a request
    context_length: int | None = None  # None: the model's own maximum
    mem_fraction_static: float = 0.85  # accelerators: share of free memory for weights + KV
    max_total_tokens: int | None = None  # KV pool size in tokens; None: from memory
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    max_running_requests: int = 64
    # Most new tokens an extend step takes; -1 disables chunking; None: by the device
    # (`sizing.chunked_prefill_size_for`: 2048 on CPUs, up to 8192 on large GPUs, 16384 at TP 4+).
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 16384  # tokens of one extend step across requests
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0  # > 1 reserves more memory for running decodes
    schedule_constraint_ms: float = 0.0  # batching window before a prefill
    disable_radix_cache: bool = False
    page_size: int = 16
    attention_backend: str | None = None  # "native" or "pallas"; None: pallas on GPUs
    grammar_backend: str = "llguidance"  # "none" refuses regex, json_schema and ebnf
    disable_jump_forward: bool = False  # else forced grammar tokens are appended unsampled
    disable_overlap_schedule: bool = False  # else decode step N+1 launches before N ends
    num_continuous_decode_steps: int = 1  # decode steps per launch while the batch is stable
    enable_mixed_chunk: bool = False  # running decodes ride along each prefill step
    random_seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None
    warmup: bool = True  # compile the common step shapes at start
    # Persistent XLA cache; None: $JAXSGL_COMPILATION_CACHE_DIR, else ~/.cache/jaxsgl/xla.
    compilation_cache_dir: str | None = None
    log_level: str = "warning"
    # At most N running requests per named namespace, e.g. (("finance", 8),); others unbounded.
    namespace_max_running: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"schedule_policy {self.schedule_policy!r} is not one of {SCHEDULE_POLICIES}"
            )
        for name in (
            "tp_size", "dp_size", "max_running_requests", "page_size",
            "num_continuous_decode_steps", "nnodes",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nnodes > 1 and (self.dist_init_addr is None or ":" not in self.dist_init_addr):
            raise ValueError(f"nnodes={self.nnodes} needs dist_init_addr host:port")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not in [0, {self.nnodes})")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(
                f"load_balance_method {self.load_balance_method!r} is not one of "
                f"{LOAD_BALANCE_METHODS}"
            )
        if self.dp_size > 1 and self.nnodes > 1:
            raise ValueError("dp_size > 1 with nnodes > 1: run a router over per-host servers")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(
                f"grammar_backend {self.grammar_backend!r} is not one of {GRAMMAR_BACKENDS}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}"
            )
        if self.attention_backend not in (None, "native", "pallas"):
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is not 'native' or 'pallas'"
            )
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        chunk = self.chunked_prefill_size
        if chunk is not None and chunk != -1 and chunk < self.page_size:
            raise ValueError(
                f"chunked_prefill_size {self.chunked_prefill_size} is below the page size"
            )
        if self.schedule_constraint_ms < 0:
            raise ValueError(
                f"schedule_constraint_ms must be >= 0, got {self.schedule_constraint_ms}"
            )
        for name, limit in self.namespace_max_running:
            if not isinstance(name, str) or isinstance(limit, bool) or not isinstance(limit, int):
                raise ValueError(f"namespace_max_running entry {(name, limit)!r} is not (str, int)")
            if limit < 1:
                raise ValueError(f"namespace_max_running for {name!r} must be >= 1, got {limit}")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}"
            )

    @classmethod
    def from_kwargs(cls, model_path: str | None = None, **kwargs: Any) -> EngineOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine options: {', '.join(unknown)}")
        return cls(model_path=model_path, **kwargs)

    @property
    def chunk_tokens(self) -> int:
        """Most new tokens one extend step takes (chunking and the prefill cap together)."""
        size = self.chunked_prefill_size
        size = DEFAULT_CHUNKED_PREFILL_SIZE if size is None else size
        chunk = self.max_prefill_tokens if size == -1 else min(size, self.max_prefill_tokens)
        return max(chunk, self.page_size)
