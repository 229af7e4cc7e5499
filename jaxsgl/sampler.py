"""Next-token sampling on device for S rows of float32 logits `[S, V]`.

Letters: S rows (one per sequence), V vocab, M distinct generated tokens of a row, R distinct
seen tokens (prompt + output), B logit-bias entries, E suppressed ids, k top logprobs.

Order, as SGLang's:
  raw logits -> `logprobs`, `top_logprobs` (the model's own distribution, what users are shown)
  -> repetition penalty -> frequency and presence penalties -> logit bias -> suppression
  -> greedy rows: argmax
  -> sampled rows: / temperature, keep top-k ∩ top-p ∩ min-p, draw by Gumbel-max.
The three masks are all taken on the same temperature-scaled distribution and intersected, so
their order does not matter. Gumbel-max (argmax of logits + Gumbel noise) is an exact draw from
the softmax of the kept logits, so no renormalisation pass is needed.

Ties are decided by value, never by token id: every token tied with a mask's boundary token is
kept (top-k may keep more than k tokens). Argmax ties (greedy rows) go to the lowest token id,
as `jnp.argmax`; top logprobs list tied tokens in id order, as `lax.top_k`.

Randomness is per row: key = fold_in(key(seed), step), threefry. A seeded request draws the same
token at step t whatever else is in the batch and whichever row it sits in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsgl.sampling_params import GREEDY_TEMPERATURE, SamplingParams

# What a batch needs, decided on the host so the compiled step does no more than that.
GREEDY = "greedy"  # every row greedy: argmax only, no noise, no sort
SAMPLE = "sample"  # some row samples, none uses top_k or top_p: noise, no sort
SAMPLE_SORTED = "sample_sorted"  # some sampled row uses top_k or top_p: one sort over V per row
MODES = (GREEDY, SAMPLE, SAMPLE_SORTED)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingInputs:
    """Per-row sampling state of one batch, as `build_sampling_inputs` makes it.

    Contracts: ids within one row of a sparse table are distinct, and `mode` covers every row
    (a row with top_k < V or top_p < 1 is ignored by the filters unless mode is SAMPLE_SORTED).
    """

    temperature: jax.Array  # [S] f32, < GREEDY_TEMPERATURE: greedy row
    top_k: jax.Array  # [S] i32, V when off
    top_p: jax.Array  # [S] f32, 1 when off
    min_p: jax.Array  # [S] f32, 0 when off
    frequency_penalty: jax.Array  # [S] f32
    presence_penalty: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32, 1 when off
    seed: jax.Array  # [S] u32
    step: jax.Array  # [S] i32, tokens the row generated before this one
    output_ids: jax.Array  # [S, M] i32, distinct generated tokens
    output_counts: jax.Array  # [S, M] i32, times each was generated (padding: 0)
    seen_ids: jax.Array  # [S, R] i32, distinct prompt + generated tokens
    seen_mask: jax.Array  # [S, R] bool (padding: False)
    bias_ids: jax.Array  # [S, B] i32
    bias_values: jax.Array  # [S, B] f32 (padding: 0)
    suppress_ids: jax.Array  # [S, E] i32, tokens forbidden this step
    suppress_mask: jax.Array  # [S, E] bool (padding: False)
    # Grammar masks: bit v of word v // 32 set where token v may come next; [S, 1] and unused
    # unless `constrained` (rows without a grammar allow everything).
    allowed_words: jax.Array  # [S, ceil(V / 32)] uint32
    mode: str = dataclasses.field(metadata=dict(static=True))  # one of MODES
    constrained: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # k: the most any row asks for, bucketed by the caller; 0 = none.
    top_logprobs_num: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    tokens: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, log-softmax of the raw logits at `tokens`
    top_logprobs: jax.Array  # [S, k] f32, of the raw distribution, best first
    top_ids: jax.Array  # [S, k] i32


def apply_penalties(logits: jax.Array, inputs: SamplingInputs) -> jax.Array:
    """Repetition penalty (HF), then frequency and presence penalties (OpenAI), on `[S, V]`.

    Repetition: a seen token's logit moves toward 0, `l / r` if `l > 0` else `l * r`.
    Frequency/presence: `l - frequency * count - presence * (count > 0)` for generated tokens.
    """
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]  # [S, 1]
    # Padding entries point past the vocabulary: the gather fills them, the scatter drops them.
    ids = jnp.where(inputs.seen_mask, inputs.seen_ids, V)  # [S, R]
    seen = logits.at[rows, ids].get(mode="fill", fill_value=0.0)  # [S, R]
    r = inputs.repetition_penalty[:, None]  # [S, 1]
    logits = logits.at[rows, ids].set(jnp.where(seen > 0, seen / r, seen * r), mode="drop")

    ids = jnp.where(inputs.output_counts > 0, inputs.output_ids, V)  # [S, M]
    counts = inputs.output_counts.astype(jnp.float32)  # [S, M]
    out = logits.at[rows, ids].get(mode="fill", fill_value=0.0)  # [S, M]
    out = (
        out
        - inputs.frequency_penalty[:, None] * counts
        - inputs.presence_penalty[:, None] * (counts > 0)
    )
    return logits.at[rows, ids].set(out, mode="drop")


def adjust_logits(logits: jax.Array, inputs: SamplingInputs) -> jax.Array:
    """Penalties, then logit bias (added), then suppression (-inf): what greedy rows argmax."""
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]  # [S, 1]
    logits = apply_penalties(logits, inputs)
    # Bias padding adds 0.0 to token 0: a no-op, so no mask is needed.
    logits = logits.at[rows, inputs.bias_ids].add(inputs.bias_values, mode="drop")
    ids = jnp.where(inputs.suppress_mask, inputs.suppress_ids, V)  # [S, E]
    logits = logits.at[rows, ids].set(-jnp.inf, mode="drop")
    if inputs.constrained:
        logits = jnp.where(grammar_allows(inputs.allowed_words, V), logits, -jnp.inf)
    return logits


def grammar_allows(words: jax.Array, V: int) -> jax.Array:
    """`[S, V]` bool from a bitmask `[S, W]`: token v is bit v % 32 of word v // 32.

    V = 40, token 33 allowed: word 1 has bit 1 set (words[:, 1] & 2 != 0).
    """
    v = jnp.arange(V)
    bits = words[:, v // 32] >> (v % 32).astype(jnp.uint32)  # [S, V]
    return (bits & 1).astype(jnp.bool_)


def sort_descending(logits: jax.Array) -> jax.Array:
    """Each row's logits, largest first: `[S, V]`, shared by `top_k_mask` and `top_p_mask`."""
    return jnp.sort(logits, axis=-1, descending=True)


def top_k_mask(
    logits: jax.Array, top_k: jax.Array, *, sorted_logits: jax.Array | None = None
) -> jax.Array:
    """`[S, V]` bool: tokens at least as large as the row's k-th largest logit.

    logits [3 1 2 2], k=2: sorted [3 2 2 1], k-th = 2 -> keep [T F T T] (the tie is kept).
    k >= V keeps everything.
    """
    V = logits.shape[-1]
    if sorted_logits is None:
        sorted_logits = sort_descending(logits)
    k = jnp.clip(top_k, 1, V)  # [S]
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # [S, 1]
    return logits >= kth


def top_p_mask(
    logits: jax.Array, top_p: jax.Array, *, sorted_logits: jax.Array | None = None
) -> jax.Array:
    """`[S, V]` bool: the most probable tokens whose total probability first reaches top_p.

    probs [.1 .5 .3 .1], top_p .7: sorted [.5 .3 .1 .1], cumsum [.5 .8 .9 1.]; the first to
    reach .7 is .3 -> keep [F T T F]. top_p .85: the boundary .1 is tied -> keep all four.
    Equivalently: keep a token iff the mass of strictly more probable tokens is < top_p, so the
    top token is always kept. top_p >= 1 keeps everything.
    """
    V = logits.shape[-1]
    if sorted_logits is None:
        sorted_logits = sort_descending(logits)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)  # [S, V]
    cut = jnp.sum(cumulative < top_p[:, None], axis=-1)  # [S], first index reaching top_p
    cut = jnp.minimum(cut, V - 1)  # rounding can leave the total just below top_p
    boundary = jnp.take_along_axis(sorted_logits, cut[:, None], axis=-1)  # [S, 1]
    return (logits >= boundary) | (top_p >= 1)[:, None]


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """`[S, V]` bool: tokens with `p >= min_p * p_max`, i.e. `logit >= max + log(min_p)`.

    logits [2 1 -1], min_p .3: p / p_max = [1 .37 .05] -> keep [T T F]. min_p = 0 keeps all.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)  # [S, 1]
    return logits >= top + jnp.log(min_p)[:, None]


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """`[S]` threefry keys, `fold_in(key(seed), step)`: a row's noise depends on nothing else.

    The implementation is pinned so `jax_default_prng_impl` cannot change seeded outputs.
    """
    make = lambda s, t: jax.random.fold_in(jax.random.key(s, impl="threefry2x32"), t)
    return jax.vmap(make)(seed, step)


def log_softmax_at(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """`[T]` log-probability of `ids [T]` under `logits [T, V]`, without a `[T, V]` log-softmax."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, ids[:, None].astype(jnp.int32), axis=-1)[:, 0]  # [T]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def top_k_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k most probable tokens of each row of `logits [T, V]`: logprobs `[T, k]`, ids `[T, k]`.

    Best first; tied tokens in id order. k is static and clipped to V.
    """
    T, V = logits.shape
    k = min(k, V)
    if k == 0:
        return jnp.zeros((T, 0), jnp.float32), jnp.zeros((T, 0), jnp.int32)
    logits = logits.astype(jnp.float32)
    values, ids = jax.lax.top_k(logits, k)  # [T, k]
    return values - jax.nn.logsumexp(logits, axis=-1, keepdims=True), ids.astype(jnp.int32)


def sample(logits: jax.Array, inputs: SamplingInputs) -> SampleOutput:
    """Next token of each row of `logits [S, V]`; see the module docstring for the order."""
    logits = logits.astype(jnp.float32)
    S, V = logits.shape
    adjusted = adjust_logits(logits, inputs)  # [S, V]
    tokens = jnp.argmax(adjusted, axis=-1)  # [S], lowest id on ties
    if inputs.mode != GREEDY:
        greedy = inputs.temperature < GREEDY_TEMPERATURE  # [S]
        temperature = jnp.where(greedy, 1.0, inputs.temperature)  # no 0-division on greedy rows
        scaled = adjusted / temperature[:, None]  # [S, V]
        keep = min_p_mask(scaled, inputs.min_p)
        if inputs.mode == SAMPLE_SORTED:
            sorted_logits = sort_descending(scaled)
            keep &= top_k_mask(scaled, inputs.top_k, sorted_logits=sorted_logits)
            keep &= top_p_mask(scaled, inputs.top_p, sorted_logits=sorted_logits)
        keys = row_keys(inputs.seed, inputs.step)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32))(keys)  # [S, V]
        drawn = jnp.argmax(jnp.where(keep, scaled, -jnp.inf) + noise, axis=-1)  # [S]
        tokens = jnp.where(greedy, tokens, drawn)
    tokens = tokens.astype(jnp.int32)
    top_logprobs, top_ids = top_k_logprobs(logits, inputs.top_logprobs_num)
    return SampleOutput(
        tokens=tokens,
        logprobs=log_softmax_at(logits, tokens),
        top_logprobs=top_logprobs,
        top_ids=top_ids,
    )


@dataclasses.dataclass(kw_only=True)
class RowState:
    """One request's sampling state at this step, as the engine keeps it."""

    params: SamplingParams
    seed: int  # params.sampling_seed, or a seed the engine drew for the request; taken mod 2**32
    num_output_tokens: int = 0  # the PRNG step and the min_new_tokens clock
    output_counts: Mapping[int, int] = dataclasses.field(default_factory=dict)  # id -> count
    prompt_ids: Sequence[int] = ()  # read only when repetition_penalty != 1
    allowed_words: np.ndarray | None = None  # [ceil(V / 32)] grammar bitmask, None: no grammar


def pad_width(n: int, minimum: int) -> int:
    """The bucketed width for `n` entries: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def build_sampling_inputs(
    rows: Sequence[RowState],
    *,
    vocab_size: int,
    num_rows: int,
    eos_token_ids: Sequence[int] = (),
    top_logprobs_num: int = 0,
    min_width: int = 8,
    device_put: bool = True,
) -> SamplingInputs:
    """Device inputs for `rows`, padded to `num_rows` with greedy rows that have no penalties.

    Sparse tables get power-of-two widths of at least `min_width`, so shapes stay in a few
    buckets. Rows fill only the tables their parameters use: a row without penalties costs
    nothing. EOS and stop ids are suppressed while a row is short of its min_new_tokens.
    """
    if num_rows < max(1, len(rows)):
        raise ValueError(f"num_rows={num_rows} must be >= 1 and hold all {len(rows)} rows")
    V = vocab_size
    rows = [*rows, *[_PADDING_ROW] * (num_rows - len(rows))]
    params = [row.params for row in rows]
    column = lambda values, dtype: np.array(list(values), dtype)  # [S]
    temperature = column((0.0 if p.is_greedy else p.temperature for p in params), np.float32)
    top_k = column((V if p.top_k < 1 else min(p.top_k, V) for p in params), np.int32)
    top_p = column((p.top_p for p in params), np.float32)
    sampled = temperature >= GREEDY_TEMPERATURE
    if not sampled.any():
        mode = GREEDY
    elif ((top_k < V) | (top_p < 1))[sampled].any():
        mode = SAMPLE_SORTED
    else:
        mode = SAMPLE
    outputs, seen, bias, suppress = zip(
        *(_sparse_rows(r, eos_token_ids) for r in rows), strict=True
    )
    output_ids, output_counts = _pack(outputs, min_width, np.int32)
    seen_ids, seen_mask = _pack(seen, min_width, np.bool_)
    bias_ids, bias_values = _pack(bias, min_width, np.float32)
    suppress_ids, suppress_mask = _pack(suppress, min_width, np.bool_)
    constrained = any(row.allowed_words is not None for row in rows)
    allowed_words = np.zeros((num_rows, 1), np.uint32)
    if constrained:
        allowed_words = np.full((num_rows, -(-V // 32)), 0xFFFFFFFF, np.uint32)
        for i, row in enumerate(rows):
            if row.allowed_words is not None:
                allowed_words[i] = row.allowed_words.view(np.uint32)
    inputs = SamplingInputs(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=column((p.min_p for p in params), np.float32),
        frequency_penalty=column((p.frequency_penalty for p in params), np.float32),
        presence_penalty=column((p.presence_penalty for p in params), np.float32),
        repetition_penalty=column((p.repetition_penalty for p in params), np.float32),
        seed=column((row.seed % 2**32 for row in rows), np.uint32),
        step=column((row.num_output_tokens for row in rows), np.int32),
        output_ids=output_ids,
        output_counts=output_counts,
        seen_ids=seen_ids,
        seen_mask=seen_mask,
        bias_ids=bias_ids,
        bias_values=bias_values,
        suppress_ids=suppress_ids,
        suppress_mask=suppress_mask,
        allowed_words=allowed_words,
        mode=mode,
        constrained=constrained,
        top_logprobs_num=top_logprobs_num,
    )
    # One transfer for every leaf; numpy where the step runs across processes (each feeds
    # the same host values to its own devices).
    return jax.device_put(inputs) if device_put else inputs


_PADDING_ROW = RowState(params=SamplingParams(temperature=0.0), seed=0)

_Entries = tuple[list[int], list]  # one row of a sparse table: ids and their values


_NO_ENTRIES: tuple[_Entries, ...] = (([], []),) * 4


def _sparse_rows(row: RowState, eos_token_ids: Sequence[int]) -> tuple[_Entries, ...]:
    """The row's (output counts, seen tokens, logit bias, suppressed ids) entries."""
    p = row.params
    penalized = p.frequency_penalty or p.presence_penalty
    short = row.num_output_tokens < p.min_new_tokens
    if not (penalized or p.repetition_penalty != 1 or short or p.logit_bias):
        return _NO_ENTRIES  # the common row: nothing to look at, whatever its length
    generated = {}
    if penalized:
        generated = {t: c for t, c in row.output_counts.items() if c > 0}
    seen = []
    if p.repetition_penalty != 1:
        seen = sorted(set(row.prompt_ids).union(t for t, c in row.output_counts.items() if c))
    suppress = []
    if row.num_output_tokens < p.min_new_tokens:
        suppress = sorted(set(eos_token_ids).union(p.stop_token_ids or []))
    bias = p.logit_bias or {}
    return (
        (list(generated), list(generated.values())),
        (seen, [True] * len(seen)),
        (list(bias), list(bias.values())),
        (suppress, [True] * len(suppress)),
    )


def _pack(entries: Sequence[_Entries], min_width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (ids, values) -> `[S, W]` ids and values, zero-padded to a bucketed width W."""
    width = pad_width(max(len(ids) for ids, _ in entries), min_width)
    ids = np.zeros((len(entries), width), np.int32)
    values = np.zeros((len(entries), width), dtype)
    for i, (row_ids, row_values) in enumerate(entries):
        ids[i, : len(row_ids)] = row_ids
        values[i, : len(row_values)] = row_values
    return ids, values
