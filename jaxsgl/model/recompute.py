"""Logits and greedy generation by full recompute: no KV cache, every step runs whole sequences.

This is the correctness baseline the paged engine is checked against, and what `jaxsgl generate`
runs. Token counts are padded to powers of two so a growing sequence compiles only a few shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsgl.model.llama import ForwardInputs, Llama


def bucket(n: int, minimum: int = 16) -> int:
    """The padded size for `n` tokens: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def pack(seqs: Sequence[Sequence[int]], all_positions: bool = False) -> ForwardInputs:
    """Pack sequences back to back into one padded step.

    Example: seqs [[5 6 7], [8 9]] -> tokens [5 6 7 8 9 0 ...], segment_ids [0 0 0 1 1 -1 ...],
    positions [0 1 2 0 1 0 ...]; logits at the last token of each ([2, 4]) or, with
    `all_positions`, at every token of the padded step. Callers slice off the padding rows.
    """
    lengths = [len(s) for s in seqs]
    if min(lengths, default=0) == 0:
        raise ValueError("every sequence needs at least one token")
    total = sum(lengths)
    T = bucket(total)
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    segments = np.full(T, -1, np.int32)
    tokens[:total] = np.concatenate([np.asarray(s, np.int32) for s in seqs])
    positions[:total] = np.concatenate([np.arange(n) for n in lengths])
    segments[:total] = np.repeat(np.arange(len(seqs)), lengths)
    if all_positions:
        indices = np.arange(T)
    else:  # padded to a bucket too, so a shrinking batch reuses compiled shapes
        indices = np.zeros(bucket(len(seqs), minimum=1), np.int64)
        indices[: len(seqs)] = np.cumsum(lengths) - 1
    return ForwardInputs(
        tokens=jnp.asarray(tokens),
        positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segments),
        logits_indices=jnp.asarray(indices, dtype=jnp.int32),
    )


class RecomputeModel:
    """A jitted `ForwardInputs -> logits` over a model's split state."""

    def __init__(self, model: Llama):
        self.graphdef, self.state = nnx.split(model)
        self._forward = jax.jit(lambda state, inputs: nnx.merge(self.graphdef, state)(inputs))

    def logits(self, inputs: ForwardInputs) -> jax.Array:
        return self._forward(self.state, inputs)

    def sequence_logits(self, seq: Sequence[int]) -> np.ndarray:
        """Next-token logits `[len(seq), V]` at every position of one sequence."""
        out = self.logits(pack([seq], all_positions=True))
        return np.asarray(out[: len(seq)])

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
            nxt = np.asarray(jnp.argmax(self.logits(pack([seqs[i] for i in active])), axis=-1))
            step: list[int | None] = [None] * len(seqs)
            for i, tok in zip(active, nxt[: len(active)].tolist(), strict=True):
                seqs[i].append(tok)
                outs[i].append(tok)
                step[i] = tok
                done[i] = tok in stop_ids
            if on_tokens is not None:
                on_tokens(step)
        return outs
