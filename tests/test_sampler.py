"""Sampler against numpy references: masks, penalties, seeded draws, distributions, logprobs."""

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats

from jaxsgl import sampler
from jaxsgl.sampler import RowState, build_sampling_inputs
from jaxsgl.sampling_params import SamplingParams

# Compiled once per shape and reused across tests.
top_k_mask = jax.jit(sampler.top_k_mask)
top_p_mask = jax.jit(sampler.top_p_mask)
min_p_mask = jax.jit(sampler.min_p_mask)
adjust_logits = jax.jit(sampler.adjust_logits)
sample = jax.jit(sampler.sample)
log_softmax_at = jax.jit(sampler.log_softmax_at)

MASK_SHAPES = [(1, 2), (3, 17), (8, 64), (5, 300)]


def random_logits(rng: np.random.Generator, S: int, V: int, style: int) -> np.ndarray:
    """Style 0: smooth; 1: a coarse grid, full of ties; 2: peaked, some tokens at -inf."""
    if style == 0:
        x = rng.normal(size=(S, V)) * rng.uniform(0.3, 4.0)
    elif style == 1:
        x = rng.integers(-3, 4, size=(S, V)).astype(np.float64)
    else:
        x = rng.normal(size=(S, V)) * 6.0
        x[rng.random((S, V)) < 0.2] = -np.inf
        x[:, 0] = 1.0  # every row keeps a finite token
    return x.astype(np.float32)


def strictly_above(x: np.ndarray) -> np.ndarray:
    """`[S, V, V]`: [s, i, j] is True iff token j's logit is strictly larger than token i's."""
    return x[:, None, :] > x[:, :, None]


def ref_top_k(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    # The tie rule stated as a count: keep a token iff fewer than k tokens beat it.
    return strictly_above(x).sum(-1) < k[:, None]


def softmax64(x: np.ndarray) -> np.ndarray:
    return scipy.special.softmax(x.astype(np.float64), axis=-1)


def mass_above(x: np.ndarray) -> np.ndarray:
    """`[S, V]`: probability of the tokens strictly more probable than each token (float64)."""
    return (strictly_above(x) * softmax64(x)[:, None, :]).sum(-1)


def ref_top_p(x: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    return (mass_above(x) < top_p[:, None]) | (top_p[:, None] >= 1)


def ref_min_p(x: np.ndarray, min_p: np.ndarray) -> np.ndarray:
    p = softmax64(x)
    return p >= min_p[:, None] * p.max(-1, keepdims=True)


def away_from(values: np.ndarray, rng: np.random.Generator, lo: float, margin: float) -> float:
    """A random threshold in [lo, 1) at least `margin` from every value: float32 rounding on
    device and float64 here then agree on which side each token falls."""
    while True:
        t = rng.uniform(lo, 1.0)
        if np.all(np.abs(values - t) > margin):
            return t


@pytest.mark.parametrize("S, V", MASK_SHAPES)
def test_top_k_mask_matches_reference(S, V):
    rng = np.random.default_rng(S * 1000 + V)
    for trial in range(12):
        x = random_logits(rng, S, V, trial % 3)
        k = rng.integers(1, V + 3, size=S).astype(np.int32)
        k[0] = 1
        got = np.asarray(top_k_mask(x, k))
        np.testing.assert_array_equal(got, ref_top_k(x, k))


@pytest.mark.parametrize("S, V", MASK_SHAPES)
def test_top_p_mask_matches_reference(S, V):
    rng = np.random.default_rng(S * 1000 + V + 1)
    for trial in range(12):
        x = random_logits(rng, S, V, trial % 3)
        above = mass_above(x)
        top_p = np.array([away_from(above[s], rng, 0.01, 1e-4) for s in range(S)], np.float32)
        if trial % 4 == 0:
            top_p[-1] = 1.0
        got = np.asarray(top_p_mask(x, top_p))
        np.testing.assert_array_equal(got, ref_top_p(x, top_p))
        assert got[np.arange(S), x.argmax(-1)].all(), "the top token is always kept"


@pytest.mark.parametrize("S, V", MASK_SHAPES)
def test_min_p_mask_matches_reference(S, V):
    rng = np.random.default_rng(S * 1000 + V + 2)
    for trial in range(12):
        x = random_logits(rng, S, V, trial % 3)
        p = softmax64(x)
        ratio = p / p.max(-1, keepdims=True)
        below_max = [ratio[s][ratio[s] < 1] for s in range(S)]
        min_p = np.array([away_from(r, rng, 0.0, 1e-5) for r in below_max], np.float32)
        if trial % 4 == 0:
            min_p[0], min_p[-1] = 0.0, 1.0
        got = np.asarray(min_p_mask(x, min_p))
        np.testing.assert_array_equal(got, ref_min_p(x, min_p))


def test_masks_worked_examples():
    x = np.array([[3, 1, 2, 2]], np.float32)
    np.testing.assert_array_equal(top_k_mask(x, np.array([2], np.int32)), [[1, 0, 1, 1]])
    x = np.log(np.array([[0.1, 0.5, 0.3, 0.1]], np.float32))
    np.testing.assert_array_equal(top_p_mask(x, np.array([0.7], np.float32)), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(top_p_mask(x, np.array([0.85], np.float32)), [[1, 1, 1, 1]])
    x = np.array([[2, 1, -1]], np.float32)
    np.testing.assert_array_equal(min_p_mask(x, np.array([0.3], np.float32)), [[1, 1, 0]])


def ref_adjust(logits: np.ndarray, rows: list[RowState], eos: list[int]) -> np.ndarray:
    """HF repetition penalty, OpenAI frequency/presence, bias, suppression; dense, per token."""
    out = logits.copy()
    for s, row in enumerate(rows):
        p, counts = row.params, dict(row.output_counts)
        for t in set(row.prompt_ids) | {t for t, c in counts.items() if c}:
            l = out[s, t]
            out[s, t] = l / np.float32(p.repetition_penalty) if l > 0 else l * p.repetition_penalty
        for t, c in counts.items():
            out[s, t] = out[s, t] - p.frequency_penalty * c - p.presence_penalty * (c > 0)
        for t, b in (p.logit_bias or {}).items():
            out[s, t] += b
        if row.num_output_tokens < p.min_new_tokens:
            out[s, eos + (p.stop_token_ids or [])] = -np.inf
    return out


def random_row(rng: np.random.Generator, V: int, **params) -> RowState:
    generated = rng.integers(0, V, size=rng.integers(0, 40))
    return RowState(
        params=SamplingParams(**params),
        seed=int(rng.integers(2**32)),
        num_output_tokens=len(generated),
        output_counts=dict(zip(*np.unique(generated, return_counts=True), strict=True)),
        prompt_ids=rng.integers(0, V, size=rng.integers(0, 30)).tolist(),
    )


def test_penalties_bias_and_suppression_match_reference():
    rng = np.random.default_rng(0)
    S, V, eos = 8, 64, [63]
    for _ in range(6):
        rows = [
            random_row(
                rng,
                V,
                repetition_penalty=float(rng.choice([1.0, rng.uniform(0.2, 2.0)])),
                frequency_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
                presence_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
                logit_bias={int(t): float(rng.uniform(-5, 5)) for t in rng.integers(0, V, 3)},
                min_new_tokens=int(rng.integers(0, 40)),
                max_new_tokens=100,
                stop_token_ids=[int(rng.integers(V))],
            )
            for _ in range(S - 1)
        ]
        logits = (rng.normal(size=(S, V)) * 3).astype(np.float32)
        inputs = build_sampling_inputs(rows, vocab_size=V, num_rows=S, eos_token_ids=eos)
        got = np.asarray(adjust_logits(logits, inputs))
        np.testing.assert_allclose(got, ref_adjust(logits, rows, eos), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[-1], logits[-1])  # the padding row is untouched


def test_repetition_penalty_is_hf_semantics():
    logits = np.array([[2.0, -2.0, 0.0, 1.0]], np.float32)
    row = RowState(params=SamplingParams(repetition_penalty=2.0), seed=0, prompt_ids=[0, 1, 2])
    got = adjust_logits(logits, build_sampling_inputs([row], vocab_size=4, num_rows=1))
    np.testing.assert_array_equal(got, [[1.0, -4.0, 0.0, 1.0]])


def greedy_row(**params) -> RowState:
    return RowState(params=SamplingParams(temperature=0.0, **params), seed=0)


def test_greedy_rows_take_argmax_with_lowest_id_on_ties():
    rng = np.random.default_rng(1)
    S, V = 16, 100
    logits = rng.normal(size=(S, V)).astype(np.float32)
    logits[3, [10, 20]] = logits[3].max() + 1  # a tie: the lower id wins
    rows = [
        RowState(params=SamplingParams(temperature=t, top_k=k), seed=i)
        for i, (t, k) in enumerate([(0.0, -1), (1e-7, -1), (1.0, 1), (0.0, 5)] * 4)
    ]
    inputs = build_sampling_inputs(rows, vocab_size=V, num_rows=S)
    assert inputs.mode == sampler.GREEDY
    tokens = np.asarray(sample(logits, inputs).tokens)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    assert tokens[3] == 10
    # Greedy rows beside sampled ones still take the argmax.
    mixed = rows[:8] + [RowState(params=SamplingParams(temperature=1.0), seed=1)] * 8
    inputs = build_sampling_inputs(mixed, vocab_size=V, num_rows=S)
    assert inputs.mode == sampler.SAMPLE
    tokens = np.asarray(sample(logits, inputs).tokens)
    np.testing.assert_array_equal(tokens[:8], logits[:8].argmax(-1))


def test_logit_bias_and_min_new_tokens_steer_greedy():
    V = 16
    logits = np.zeros((4, V), np.float32)
    logits[:, 15] = 5.0  # EOS is the favourite
    rows = [
        greedy_row(logit_bias={"3": 10.0}),
        greedy_row(logit_bias={15: -10.0, 7: 1.0}),
        greedy_row(min_new_tokens=2, stop_token_ids=[4]),
        RowState(
            params=SamplingParams(temperature=0.0, min_new_tokens=2), seed=0, num_output_tokens=2
        ),
    ]
    logits[2, 4] = 4.0  # the stop id is second: suppressed too, so id 0 wins the tie of zeros
    inputs = build_sampling_inputs(rows, vocab_size=V, num_rows=4, eos_token_ids=[15])
    np.testing.assert_array_equal(sample(logits, inputs).tokens, [3, 7, 0, 15])


def sampled_rows(n: int, *, seed: int, first_step: int = 0, **params) -> list[RowState]:
    p = SamplingParams(**params)
    return [RowState(params=p, seed=seed, num_output_tokens=first_step + i) for i in range(n)]


def test_seeded_row_ignores_its_neighbours():
    rng = np.random.default_rng(2)
    V = 1000
    logits = rng.normal(size=(8, V)).astype(np.float32)
    me = SamplingParams(temperature=1.0, sampling_seed=1234)
    for step in range(6):
        mine = RowState(params=me, seed=1234, num_output_tokens=step)
        alone = sample(logits[6:7], build_sampling_inputs([mine], vocab_size=V, num_rows=1))
        neighbours = [
            RowState(params=SamplingParams(temperature=0.5, top_k=20), seed=7, num_output_tokens=3),
            greedy_row(),
            *sampled_rows(4, seed=step, temperature=1.5, top_p=0.9),
            mine,
            RowState(params=SamplingParams(temperature=1.0), seed=1235, num_output_tokens=step),
        ]
        inputs = build_sampling_inputs(neighbours, vocab_size=V, num_rows=8)
        assert inputs.mode == sampler.SAMPLE_SORTED
        assert int(sample(logits, inputs).tokens[6]) == int(alone.tokens[0])


def test_different_seeds_draw_differently():
    V = 1000
    logits = np.zeros((128, V), np.float32)
    rows = sampled_rows(64, seed=1, temperature=1.0) + sampled_rows(64, seed=2, temperature=1.0)
    tokens = np.asarray(
        sample(logits, build_sampling_inputs(rows, vocab_size=V, num_rows=128)).tokens
    )
    assert np.sum(tokens[:64] == tokens[64:]) <= 3  # ~0.06 expected from a uniform V=1000
    assert len(set(tokens[:64].tolist())) > 50  # steps of one seed are not one draw repeated


LOGITS_8 = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 3},
        {"temperature": 1.3, "top_p": 0.6},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 0.9, "top_k": 5, "top_p": 0.8, "min_p": 0.05},
    ],
)
def test_draws_follow_the_filtered_distribution(params):
    """Chi-square goodness of fit of 20k seeded draws, and no draw outside the kept support."""
    n, V = 20_000, len(LOGITS_8)
    rows = sampled_rows(n, seed=7, **params)
    inputs = build_sampling_inputs(rows, vocab_size=V, num_rows=n)
    tokens = np.asarray(sample(np.tile(LOGITS_8, (n, 1)), inputs).tokens)

    p = SamplingParams(**params)
    scaled = (LOGITS_8 / np.float32(p.temperature))[None]
    k = np.array([V if p.top_k < 1 else p.top_k])
    keep = (ref_top_k(scaled, k) & ref_top_p(scaled, np.array([p.top_p])))[0]
    keep &= ref_min_p(scaled, np.array([p.min_p]))[0]
    expected = np.where(keep, softmax64(scaled)[0], 0.0)
    expected /= expected.sum()

    observed = np.bincount(tokens, minlength=V)
    assert observed[~keep].sum() == 0, f"draws outside the support: {observed}"
    result = scipy.stats.chisquare(observed[keep], expected[keep] * n)
    assert result.pvalue > 1e-3, (observed, expected * n)


def test_logprobs_are_of_the_raw_distribution():
    rng = np.random.default_rng(3)
    S, V, k = 8, 50, 4
    logits = (rng.normal(size=(S, V)) * 2).astype(np.float32)
    rows = [
        random_row(rng, V, temperature=0.8, top_p=0.9, repetition_penalty=1.5, logit_bias={1: 3.0})
        for _ in range(S)
    ]
    inputs = build_sampling_inputs(rows, vocab_size=V, num_rows=S, top_logprobs_num=k)
    out = sample(logits, inputs)
    ref = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(S), tokens], atol=1e-5)
    top_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.top_ids, top_ids)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, top_ids, -1), atol=1e-5)
    np.testing.assert_allclose(log_softmax_at(logits, tokens), out.logprobs, atol=1e-6)
    assert sample(logits, build_sampling_inputs(rows, vocab_size=V, num_rows=S)).top_ids.shape == (
        S,
        0,
    )


def test_builder_pads_with_neutral_rows_and_buckets_widths():
    V = 32
    row = RowState(
        params=SamplingParams(
            temperature=0.5, top_k=-1, frequency_penalty=0.5, logit_bias={i: 1.0 for i in range(9)}
        ),
        seed=2**32 + 5,
        num_output_tokens=3,
        output_counts={4: 2, 9: 1, 11: 0},
    )
    inputs = build_sampling_inputs([row], vocab_size=V, num_rows=4, min_width=2)
    assert inputs.mode == sampler.SAMPLE
    np.testing.assert_array_equal(inputs.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(inputs.top_k, [V] * 4)
    np.testing.assert_array_equal(inputs.seed, [5, 0, 0, 0])
    np.testing.assert_array_equal(inputs.step, [3, 0, 0, 0])
    assert inputs.output_ids.shape == (4, 2) and inputs.bias_ids.shape == (4, 16)
    assert inputs.seen_ids.shape == inputs.suppress_ids.shape == (4, 2)
    np.testing.assert_array_equal(inputs.output_counts, [[2, 1]] + [[0, 0]] * 3)
    assert not np.asarray(inputs.seen_mask).any() and not np.asarray(inputs.suppress_mask).any()
    with pytest.raises(ValueError, match="num_rows=0"):
        build_sampling_inputs([row], vocab_size=V, num_rows=0)
    with pytest.raises(ValueError, match="num_rows=0"):
        build_sampling_inputs([], vocab_size=V, num_rows=0)
