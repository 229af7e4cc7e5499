"""Logits and greedy generation by full recompute: every step runs whole sequences through a
fresh KV pool, with no cache kept between steps.

This is the correctness baseline the engine is checked against. Shapes are padded to powers of
two so a growing sequence compiles only a few programs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from jaxsgl.model.forward_batch import (
    ForwardBatch,
    KVPool,
    SeqChunk,
    bucket,
    fit_shape,
    kv_pool_sharding,
    pack_chunks,
)
from jaxsgl.model.llama import Llama

PAGE_SIZE = 16


def pack(seqs: Sequence[Sequence[int]], all_logits: bool = False) -> tuple[ForwardBatch, int]:
    """A batch running `seqs` from scratch, and the pool size (in pages) it needs.

    Sequence i gets consecutive pages after those of sequence i - 1, starting at page 1.
    """
    if min((len(s) for s in seqs), default=0) == 0:
        raise ValueError("every sequence needs at least one token")
    chunks, next_page = [], 1
    for s in seqs:
        n = -(-len(s) // PAGE_SIZE)
        chunks.append(SeqChunk(list(s), 0, range(next_page, next_page + n), all_logits))
        next_page += n
    batch = pack_chunks(chunks, PAGE_SIZE, fit_shape(chunks, PAGE_SIZE))
    return batch, bucket(next_page)


class RecomputeModel:
    """A jitted `(batch) -> logits` over a model's split state, with a throwaway pool."""

    def __init__(self, model: Llama):
        self.graphdef, self.state = nnx.split(model)
        cfg = model.cfg
        mesh = model.embed[...].sharding.mesh
        pool_sharding = kv_pool_sharding(cfg, mesh)
        dtype = model.embed[...].dtype

        def forward(state, batch, num_pages):
            shape = (cfg.num_layers, cfg.num_kv_heads, num_pages * PAGE_SIZE, cfg.head_dim)
            zeros = jax.lax.with_sharding_constraint(jax.numpy.zeros(shape, dtype), pool_sharding)
            logits, _ = nnx.merge(self.graphdef, state)(batch, KVPool(k=zeros, v=zeros))
            return logits

        self._forward = jax.jit(forward, static_argnums=2)

    def logits(self, seqs: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """Logits rows: the last token of each sequence, or every token with `all_logits`."""
        batch, num_pages = pack(seqs, all_logits)
        rows = sum(len(s) for s in seqs) if all_logits else len(seqs)
        return np.asarray(self._forward(self.state, batch, num_pages))[:rows]

    def sequence_logits(self, seq: Sequence[int]) -> np.ndarray:
        """Next-token logits `[len(seq), V]` at every position of one sequence."""
        return self.logits([seq], all_logits=True)

    def greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int | None]], None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuations of every prompt, recomputing all tokens at each step.

        A sequence stops after emitting a token in `stop_ids` (which is kept in its output).
        `on_tokens` receives each step's new token per sequence (None once a sequence stopped).
        """
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        for _ in range(max_new_tokens):
            active = [i for i in range(len(seqs)) if not done[i]]
            if not active:
                break
            nxt = self.logits([seqs[i] for i in active]).argmax(axis=-1)
            step: list[int | None] = [None] * len(seqs)
            for i, tok in zip(active, nxt.tolist(), strict=True):
                seqs[i].append(tok)
                outs[i].append(tok)
                step[i] = tok
                done[i] = tok in stop_ids
            if on_tokens is not None:
                on_tokens(step)
        return outs
