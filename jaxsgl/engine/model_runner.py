"""The one owner of device state: parameters, the KV pool and the compiled step.

`run` takes a scheduled batch as host data, pads it to a shape bucket, and runs one jitted
function — forward over the paged pool, then sampling — with the pool donated so its writes
happen in place. Every distinct padded shape is one compiled program; `warmup` compiles the
common ones at start behind a progress bar, and the persistent XLA cache makes restarts quick.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxsgl.distributed import Followers, to_host
from jaxsgl.model.attention_backend import AttentionBackend, default_backend, extend_kernel
from jaxsgl.model.forward_batch import (
    ForwardBatch,
    KVPool,
    SeqChunk,
    Shape,
    advance_decode,
    bucket,
    fit_shape,
    kv_dtype,
    kv_pool_sharding,
    make_kv_pool,
    pack_chunks,
)
from jaxsgl.model.loader import LoadedModel
from jaxsgl.sampler import (
    RowState,
    SampleOutput,
    SamplingInputs,
    build_sampling_inputs,
    log_softmax_at,
    sample,
    top_k_logprobs,
)
from jaxsgl.sampling_params import SamplingParams
from jaxsgl.sharding import sharded_config, tensor_size

logger = logging.getLogger(__name__)

MIN_EXTEND_TOKENS = 16
# Page tables of at least two pages: with a one-page table XLA:CPU turns the step's K/V write
# into a select over a copy of the whole pool (a 8k-token SmolLM2 pool: ~1 s a decode step
# instead of ~45 ms). One masked column costs nothing measurable on any device.
MIN_PAGES = 2
# Warm-up steps: greedy, writing only to scratch page 0 (the pool's contents stay untouched).
_WARM_ROW = RowState(params=SamplingParams(temperature=0.0), seed=0)


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


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    """A step's host inputs, padded to its shape bucket; `ModelRunner.launch` runs it."""

    batch: ForwardBatch
    sampling: SamplingInputs
    sample_rows: np.ndarray  # [S] logits row sampled for each chunk
    want_targets: bool
    target_ids: np.ndarray  # [R]
    num_chunks: int
    # Token t is row token_src[t] of the previous step's sampled tokens, or batch.tokens[t]
    # where token_src[t] is -1 (see `ModelRunner.prepare`).
    token_src: np.ndarray  # [T] int32
    num_steps: int = 1  # decode steps run in this one launch, each feeding the next its tokens


@dataclasses.dataclass(frozen=True)
class PendingStep:
    """A launched step: device arrays not yet waited for."""

    out: SampleOutput  # fields [S, ...], or [num_steps, S, ...] for several steps
    targets: tuple | None
    num_chunks: int
    num_steps: int = 1
    seq: int = 0  # launch number (followers on other hosts know launches by it)

    @property
    def last_tokens(self) -> jax.Array:
        """`[S]` the tokens its last step sampled: the next step's placeholders."""
        return self.out.tokens if self.num_steps == 1 else self.out.tokens[-1]


def enable_compilation_cache(path: str | None) -> str:
    """XLA's persistent compilation cache in `path`; default $JAXSGL_COMPILATION_CACHE_DIR,
    else ~/.cache/jaxsgl/xla. Returns the folder."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "jaxsgl", "xla")
    path = path or os.environ.get("JAXSGL_COMPILATION_CACHE_DIR") or default
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
        *,
        attention_backend: str | None = None,
        unroll_layers: bool = False,
        followers: Followers | None = None,
        max_context: int | None = None,
        kv_cache_dtype: str = "auto",
    ):
        """`followers`: processes on other hosts that launch every step this runner launches
        (this one is the leader of a multi-host mesh; see `jaxsgl.distributed`).
        `max_context` (the engine's context length) lets extends with the Pallas kernels take
        page tables of one width, so one program serves each (tokens, sequences) bucket."""
        self.loaded = loaded
        self.page_size = page_size
        self.num_pages = num_pages
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        device_cfg = sharded_config(loaded.config, tensor_size(loaded.mesh))
        self.kv_dtype = kv_dtype(kv_cache_dtype, loaded.dtype)
        self.kv = make_kv_pool(device_cfg, num_pages, page_size, self.kv_dtype, loaded.mesh)
        self.kv_sharding = kv_pool_sharding(device_cfg, loaded.mesh)
        device = loaded.mesh.devices.flat[0]
        head_dim = loaded.config.head_dim
        loaded.model.attention = AttentionBackend(
            attention_backend or default_backend(device.platform),
            mesh=loaded.mesh,
            heads_sharded=self.kv_sharding.spec[1] is not None,
            interpret=device.platform != "gpu",  # Pallas kernels run interpreted off GPUs
            extend=extend_kernel(device, self.kv_dtype, head_dim, page_size),
        )
        # Unrolled layers read weights in place but compile far slower: opt-in.
        loaded.model.unroll_layers = unroll_layers
        # Extend shapes: the Pallas kernel's grid follows the step's tokens, not its longest
        # run or widest table, so with tables as wide as the context (4 bytes a page a
        # sequence: 1 KB at 4k tokens, 32 KB at 128k) an extend's program depends only on its
        # tokens and sequences, and warm-up covers them all. The native path computes over
        # whole tables and runs: there both stay tight.
        self._extend_pages = None
        if loaded.model.attention.name == "pallas" and max_context:
            self._extend_pages = max(MIN_PAGES, bucket(-(-max_context // page_size)))
        attn = loaded.model.attention
        kernels = f" (extend kernel: {attn.extend})" if attn.name == "pallas" else ""
        logger.info("attention backend: %s%s", attn.name, kernels)
        self.graphdef, self.state = nnx.split(loaded.model)
        self.num_steps = 0
        self._zero_tokens: dict[int, jax.Array] = {}
        self.followers = followers
        self.multiprocess = jax.process_count() > 1
        self._launches = itertools.count()
        # Launches outside warm-up that compiled a program: each one paused the engine. The
        # programs live in one cache for the process; a launch counts a compile when the cache
        # grew during it and its argument shapes are new to this runner (a data-parallel
        # replica compiling at the same moment is not this runner's pause).
        self.num_runtime_compiles = 0
        self.runtime_compile_seconds = 0.0
        self._warming = False
        self._signatures: set = set()

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
        step = self.prepare(chunks, rows, decode, top_logprobs_num, target_ids)
        return self.collect(self.launch(step))

    def prepare(
        self,
        chunks: Sequence[SeqChunk],
        rows: Sequence[RowState],
        decode: bool,
        top_logprobs_num: int = 0,
        target_ids: Sequence[Sequence[int]] | None = None,
        *,
        placeholders: bool = False,
        num_steps: int = 1,
    ) -> PreparedStep:
        """The host half of a step: the padded numpy inputs.

        With `placeholders` (a decode step prepared before the previous one finished, over
        the same sequences), chunk i's token is whatever the previous step sampled in its row
        i: `launch` gets those tokens as a device array, and the step reads them there.
        A decode batch with `num_steps` > 1 runs that many steps in one launch, each step's
        sampled tokens the next one's input (the chunks' pages must cover them all).
        """
        assert num_steps == 1 or decode
        shape = self.shape_for(chunks, decode, num_steps)
        k = bucket(top_logprobs_num) if top_logprobs_num else 0
        sampling = build_sampling_inputs(
            rows,
            vocab_size=self.vocab_size,
            num_rows=shape.S,
            eos_token_ids=self.eos_token_ids,
            top_logprobs_num=k,
            device_put=not self.multiprocess,
        )
        sample_rows, targets = self._rows(chunks, shape, target_ids)
        token_src = np.full(shape.T, -1, np.int32)
        if placeholders:
            assert decode
            token_src[: len(chunks)] = np.arange(len(chunks))
        return PreparedStep(
            token_src=token_src,
            batch=pack_chunks(chunks, self.page_size, shape, num_steps),
            sampling=sampling,
            sample_rows=sample_rows,
            want_targets=any(c.all_logits for c in chunks),
            target_ids=targets,
            num_chunks=len(chunks),
            num_steps=num_steps,
        )

    def launch(self, step: PreparedStep, prev: PendingStep | None = None) -> PendingStep:
        """Dispatch the step to the device and return at once (JAX runs it asynchronously).
        `prev` is the launched step whose sampled tokens fill the placeholders."""
        S = step.batch.q_start.shape[0]
        seq = next(self._launches)
        if self.followers is not None:
            self.followers.send(("launch", seq, step, None if prev is None else prev.seq))
        prev_tokens = prev.last_tokens if prev is not None else self._no_tokens(S)
        assert prev_tokens.shape == (S,), (prev_tokens.shape, S)
        args = self._step_args(step, prev_tokens)
        programs, t0 = _step._cache_size(), time.perf_counter()
        out, tgt, self.kv = _step(*args)
        grew = _step._cache_size() > programs
        if grew or self._warming:
            self._note_program(step, args, grew, time.perf_counter() - t0)
        self.num_steps += step.num_steps
        return PendingStep(out, tgt, step.num_chunks, step.num_steps, seq)

    def _note_program(self, step: PreparedStep, args, compiled: bool, seconds: float) -> None:
        """Remember the program `args` run (warm-up's, or one compiled since); count and log
        a compile outside warm-up."""
        leaves, tree = jax.tree.flatten(args)
        signature = (tree, tuple((np.shape(x), str(getattr(x, "dtype", ""))) for x in leaves))
        new = signature not in self._signatures
        self._signatures.add(signature)
        if self._warming or not (compiled and new):
            return
        b = step.batch
        self.num_runtime_compiles += 1
        self.runtime_compile_seconds += seconds
        logger.info(
            "compiled a step shape outside warm-up (%d tokens, %d sequences, page tables of "
            "%d pages, %d steps a launch): %.2f s",
            b.tokens.shape[0], b.q_start.shape[0], b.page_table.shape[1], step.num_steps, seconds,
        )  # fmt: skip

    def compiled_text(self, step: PreparedStep) -> str:
        """The compiled program of `step`, as text (to check what XLA made of it)."""
        return self._compile(step).as_text()

    def _step_args(self, step: PreparedStep, prev_tokens: jax.Array) -> tuple:
        return (
            self.graphdef,
            self.kv.k.sharding,
            self.state,
            self.kv,
            step.batch,
            step.sampling,
            step.sample_rows,
            step.want_targets,
            step.target_ids,
            step.token_src,
            prev_tokens,
            step.num_steps,
        )

    def collect(self, pending: PendingStep) -> StepResult:
        """Wait for a launched single step and copy its outputs to the host."""
        assert pending.num_steps == 1
        return self.collect_steps(pending)[0]

    def collect_steps(self, pending: PendingStep) -> list[StepResult]:
        """Wait for a launched step and copy its outputs to the host, one result per step."""
        n = pending.num_chunks
        out = self._fetch(pending.out)
        tgt = self._fetch(pending.targets) if pending.targets is not None else (None,) * 3
        if pending.num_steps == 1:
            out = jax.tree.map(lambda x: x[None], out)
        return [
            StepResult(
                out.tokens[i, :n],
                out.logprobs[i, :n],
                out.top_logprobs[i, :n],
                out.top_ids[i, :n],
                *tgt,
            )  # fmt: skip
            for i in range(pending.num_steps)
        ]

    def _fetch(self, tree):
        """Host copies of replicated outputs (all copies started at once on one process)."""
        return jax.tree.map(to_host, tree) if self.multiprocess else jax.device_get(tree)

    def _no_tokens(self, S: int) -> jax.Array:
        """Zeros standing in for a previous step's tokens, placed like a step's outputs so
        both kinds of step share one compiled program."""
        if S not in self._zero_tokens:
            sharding = NamedSharding(self.loaded.mesh, PartitionSpec())
            self._zero_tokens[S] = jax.device_put(np.zeros(S, np.int32), sharding)
        return self._zero_tokens[S]

    def shape_for(self, chunks: Sequence[SeqChunk], decode: bool, num_steps: int = 1) -> Shape:
        if decode:
            s = bucket(len(chunks))
            pages = max(MIN_PAGES, fit_shape(chunks, self.page_size, num_steps=num_steps).P)
            return Shape(T=s, S=s, Q=1, P=pages, R=s)
        least = Shape(T=MIN_EXTEND_TOKENS, S=1, Q=1, P=self._extend_pages or MIN_PAGES, R=1)
        shape = fit_shape(chunks, self.page_size, least)
        if shape.S == 1 or self._extend_pages:  # Q = T costs nothing here and shares programs
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
        self,
        max_batch: int,
        max_context: int,
        chunk_tokens: int,
        progress: bool = True,
        decode_steps: int = 1,
        compile_threads: int | None = None,
    ) -> int:
        """Compile the decode grid (batch x context buckets, for one step and for
        `decode_steps` steps a launch) and the extends: with the Pallas kernels every
        (tokens, sequences) bucket, else every single-request extend (token x context
        buckets: prefills, cache hits, prompt chunks).

        XLA compiles the shapes side by side on `compile_threads` threads (default: one per
        core; at most 16; the engine gives data-parallel replicas a share each); then each
        shape runs once on the device, from JAX's cache. Across processes (multi-host) every
        process must compile each program together with the others, so there the shapes
        compile one at a time, as each launches everywhere."""
        page_buckets = _powers(MIN_PAGES, max(MIN_PAGES, -(-max_context // self.page_size)))
        prepared = [
            self._dummy_decode(s, p, k)
            for k in sorted({1, decode_steps})
            for s in _powers(1, max_batch)
            for p in page_buckets
        ]
        for t in _powers(MIN_EXTEND_TOKENS, chunk_tokens):
            if self._extend_pages:  # t tokens over s sequences, each within the context
                P = self._extend_pages
                seqs = [s for s in _powers(1, min(t, max_batch)) if t <= s * P * self.page_size]
                prepared += [self._dummy_extend(t, P, s) for s in seqs]
            else:
                pages = [p for p in page_buckets if p * self.page_size >= t]
                prepared += [self._dummy_extend(t, p, 1) for p in pages]
        alone = not self.multiprocess and self.followers is None
        self._warming = True
        try:
            self._warm(prepared, alone, compile_threads, progress)
        finally:
            self._warming = False
        return len(prepared)

    def _warm(self, prepared, alone: bool, compile_threads: int | None, progress: bool) -> None:
        bar = tqdm(total=len(prepared), desc="Compiling step shapes", disable=not progress)
        if alone:
            for step in prepared:  # made here, not in the threads
                self._no_tokens(step.batch.q_start.shape[0])
            threads = min(16, compile_threads or os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for _ in pool.map(self._compile, prepared):
                    bar.update()
        for step in prepared:  # compiled by now when alone; else compiled here, everywhere
            self.collect_steps(self.launch(step))
            if not alone:
                bar.update()
        bar.close()

    def _dummy_decode(self, num_seqs: int, pages: int, num_steps: int) -> PreparedStep:
        """A decode of `num_seqs` sequences over `pages` pages, `num_steps` steps a launch."""
        prefix = max(0, pages * self.page_size - num_steps)
        chunks = [SeqChunk([0], prefix, [0] * pages)] * num_seqs
        return self.prepare(chunks, [_WARM_ROW] * num_seqs, True, num_steps=num_steps)

    def _dummy_extend(self, num_tokens: int, pages: int, num_seqs: int) -> PreparedStep:
        """An extend of `num_tokens` split evenly over `num_seqs` sequences of `pages` pages."""
        each = num_tokens // num_seqs
        chunk = SeqChunk([0] * each, pages * self.page_size - each, [0] * pages)
        return self.prepare([chunk] * num_seqs, [_WARM_ROW] * num_seqs, False)

    def _compile(self, step: PreparedStep):
        """`step`'s compiled program, also kept in JAX's in-memory cache for its launches
        (safe from several threads once `_no_tokens` holds the step's size)."""
        S = step.batch.q_start.shape[0]
        return _step.lower(*self._step_args(step, self._no_tokens(S))).compile()


@partial(jax.jit, static_argnums=(0, 1, 7, 11), donate_argnums=3)
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
    token_src,  # [T] int32, row of prev_tokens holding the token, or -1: batch.tokens
    prev_tokens,  # [S] int32, the previous step's sampled tokens (device resident)
    num_steps: int = 1,
):
    """Forward + sample. Module level, so runners of the same model share compiled programs.

    With `num_steps` > 1 (decode only) the forward and sampling repeat that many times in one
    program, each step's sampled tokens the next one's input; outputs get a leading step axis.
    """
    tokens = jnp.where(token_src >= 0, prev_tokens[jnp.maximum(token_src, 0)], batch.tokens)
    batch = dataclasses.replace(batch, tokens=tokens)

    def forward(batch, kv, sampling):
        logits, kv = nnx.merge(graphdef, state)(batch, kv)  # [R, V]
        # Pin the pool's sharding: the next step then gets exactly the input it was compiled for.
        kv = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, kv_sharding), kv)
        return logits, kv, sample(logits[sample_rows], sampling)

    if num_steps > 1:

        def one_step(carry, i):  # decode: row t of the batch is sequence t, so T = S
            kv, tokens = carry
            sampling_i = dataclasses.replace(sampling, step=sampling.step + i)
            _, kv, out = forward(advance_decode(batch, i, tokens), kv, sampling_i)
            return (kv, out.tokens), out

        (kv, _), out = jax.lax.scan(one_step, (kv, batch.tokens), jnp.arange(num_steps))
        return out, None, kv
    logits, kv, out = forward(batch, kv, sampling)
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
