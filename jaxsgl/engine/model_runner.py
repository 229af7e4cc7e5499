"""The one owner of device state: parameters, the KV pool and the compiled step.

`run` takes a scheduled batch as host data, pads it to a shape bucket, and runs one jitted
function — forward over the paged pool, then sampling — with the pool donated so its writes
happen in place. Every distinct padded shape is one compiled program; `warmup` compiles the
common ones at start behind a progress bar, and the persistent XLA cache makes restarts quick.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from functools import partial

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxsgl.model.forward_batch import (
    ForwardBatch,
    KVPool,
    SeqChunk,
    Shape,
    bucket,
    fit_shape,
    kv_pool_sharding,
    make_kv_pool,
    pack_chunks,
)
from jaxsgl.model.loader import LoadedModel
from jaxsgl.sampler import (
    RowState,
    SampleOutput,
    build_sampling_inputs,
    log_softmax_at,
    sample,
    top_k_logprobs,
)
from jaxsgl.sampling_params import SamplingParams
from jaxsgl.sharding import sharded_config, tensor_size

logger = logging.getLogger(__name__)

MIN_EXTEND_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copies of one step's outputs; rows follow the batch's chunk order."""

    tokens: np.ndarray  # [S] sampled token per chunk
    logprobs: np.ndarray  # [S] logprob of each sampled token
    top_logprobs: np.ndarray  # [S, k]
    top_ids: np.ndarray  # [S, k]
    # For chunks with `all_logits`: per new token, the logprob of the token after it.
    target_logprobs: np.ndarray | None  # [R]
    target_top_logprobs: np.ndarray | None  # [R, k]
    target_top_ids: np.ndarray | None  # [R, k]


def enable_compilation_cache(path: str | None) -> str:
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "jaxsgl", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        num_pages: int,
        page_size: int,
        vocab_size: int,
        eos_token_ids: Sequence[int] = (),
    ):
        self.loaded = loaded
        self.page_size = page_size
        self.num_pages = num_pages
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.graphdef, self.state = nnx.split(loaded.model)
        device_cfg = sharded_config(loaded.config, tensor_size(loaded.mesh))
        self.kv = make_kv_pool(device_cfg, num_pages, page_size, loaded.dtype, loaded.mesh)
        self.kv_sharding = kv_pool_sharding(device_cfg, loaded.mesh)
        self.num_steps = 0

    @property
    def num_compiled(self) -> int:
        """Compiled step programs so far: one per distinct padded shape."""
        return _step._cache_size()

    def run(
        self,
        chunks: Sequence[SeqChunk],
        rows: Sequence[RowState],
        *,
        decode: bool,
        top_logprobs_num: int = 0,
        target_ids: Sequence[Sequence[int]] | None = None,
    ) -> StepResult:
        """One step. `rows[i]` is the sampling state of `chunks[i]`; `target_ids[i]`, for a
        chunk with `all_logits`, are the ids after each of its new tokens."""
        shape = self.shape_for(chunks, decode)
        k = bucket(top_logprobs_num) if top_logprobs_num else 0
        batch = pack_chunks(chunks, self.page_size, shape)
        sampling = build_sampling_inputs(
            rows,
            vocab_size=self.vocab_size,
            num_rows=shape.S,
            eos_token_ids=self.eos_token_ids,
            top_logprobs_num=k,
        )
        sample_rows, targets = self._rows(chunks, shape, target_ids)
        want = any(c.all_logits for c in chunks)
        out, tgt, self.kv = _step(
            self.graphdef,
            self.kv.k.sharding,
            self.state,
            self.kv,
            batch,
            sampling,
            sample_rows,
            want,
            targets,
        )
        self.num_steps += 1
        n = len(chunks)
        out = jax.device_get(out)
        tgt = jax.device_get(tgt) if tgt is not None else (None, None, None)
        return StepResult(
            out.tokens[:n], out.logprobs[:n], out.top_logprobs[:n], out.top_ids[:n], *tgt
        )

    def shape_for(self, chunks: Sequence[SeqChunk], decode: bool) -> Shape:
        if decode:
            s = bucket(len(chunks))
            pages = fit_shape(chunks, self.page_size).P
            return Shape(T=s, S=s, Q=1, P=pages, R=s)
        shape = fit_shape(chunks, self.page_size, Shape(T=MIN_EXTEND_TOKENS, S=1, Q=1, P=1, R=1))
        if shape.S == 1:  # one sequence owns every row: Q = T costs nothing and shares programs
            shape = dataclasses.replace(shape, Q=shape.T)
        return shape

    def _rows(self, chunks, shape: Shape, target_ids) -> tuple[np.ndarray, np.ndarray]:
        """Where each chunk's last token sits among the logits rows, and the target ids."""
        sample_rows = np.zeros(shape.S, np.int32)
        targets = np.zeros(shape.R, np.int32)
        r = 0
        for i, c in enumerate(chunks):
            width = len(c.tokens) if c.all_logits else 1
            if c.all_logits and target_ids is not None:
                targets[r : r + width] = target_ids[i]
            sample_rows[i] = r + width - 1
            r += width
        return sample_rows, targets

    def warmup(
        self, max_batch: int, max_context: int, chunk_tokens: int, progress: bool = True
    ) -> int:
        """Compile the decode grid (batch x context buckets) and every single-request extend
        (token x context buckets: prefills, cache hits, prompt chunks)."""
        page_buckets = _powers(1, -(-max_context // self.page_size))
        shapes = [("decode", s, p) for s in _powers(1, max_batch) for p in page_buckets]
        for t in _powers(MIN_EXTEND_TOKENS, chunk_tokens):
            shapes += [("extend", t, p) for p in page_buckets if p * self.page_size >= t]
        for kind, n, p in tqdm(shapes, desc="Compiling step shapes", disable=not progress):
            self._run_dummy(kind, n, p)
        return len(shapes)

    def _run_dummy(self, kind: str, n: int, pages: int) -> None:
        # Writes go to scratch page 0 only, so the pool's contents are untouched.
        greedy = RowState(params=SamplingParams(temperature=0.0), seed=0)
        if kind == "decode":
            chunks = [SeqChunk([0], pages * self.page_size - 1, [0] * pages)] * n
            self.run(chunks, [greedy] * n, decode=True)
        else:
            chunk = SeqChunk([0] * n, pages * self.page_size - n, [0] * pages)
            self.run([chunk], [greedy], decode=False)


@partial(jax.jit, static_argnums=(0, 1, 7), donate_argnums=3)
def _step(
    graphdef,
    kv_sharding,
    state,
    kv: KVPool,
    batch: ForwardBatch,
    sampling,
    sample_rows,
    want_targets: bool,
    target_ids,
):
    """Forward + sample. Module level, so runners of the same model share compiled programs."""
    logits, kv = nnx.merge(graphdef, state)(batch, kv)  # [R, V]
    # Pin the pool's sharding: the next step then gets exactly the input it was compiled for.
    kv = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, kv_sharding), kv)
    out: SampleOutput = sample(logits[sample_rows], sampling)
    targets = None
    if want_targets:
        k = sampling.top_logprobs_num
        targets = (log_softmax_at(logits, target_ids), *top_k_logprobs(logits, k))
    return out, targets, kv


def _powers(lo: int, hi: int) -> list[int]:
    out, v = [], bucket(lo)
    while v < hi:
        out.append(v)
        v *= 2
    return out + [bucket(hi)]
