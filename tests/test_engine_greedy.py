"""The engine's greedy outputs equal transformers' greedy generate, token for token, whatever the
cache, chunking and memory pressure do to the schedule."""

import numpy as np
import pytest
import torch
from engine_helpers import GREEDY, hf_greedy, prompt_ids

from jaxsgl.generator import Generator

COMMON = dict(
    dtype="float32", max_running_requests=16, context_length=512, warmup=False, progress=False
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from jaxsgl.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return prompt_ids(tokenizer)


@pytest.fixture(scope="module")
def reference(hf_smollm2, prompts):
    return hf_greedy(hf_smollm2, prompts, GREEDY["max_new_tokens"])


def _run(options, prompts):
    with Generator(**COMMON, **options) as gen:
        outs = gen.generate(input_ids=prompts, sampling_params=GREEDY)
        state = gen.check_integrity()
        assert state == {"running": 0, "waiting": 0}
        stats = gen.engine.scheduler
        return [o["output_ids"] for o in outs], outs, stats


@pytest.mark.parametrize(
    "name, options",
    [
        ("radix", dict(max_total_tokens=4096)),
        ("no_radix", dict(max_total_tokens=4096, disable_radix_cache=True)),
        ("chunked_32", dict(max_total_tokens=4096, chunked_prefill_size=32)),
    ],
)
def test_greedy_equals_transformers(name, options, prompts, reference):
    got, outs, _ = _run(options, prompts)
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        assert g == r, f"{name}: prompt {i} diverges at token {np.argmax(np.array(g) != r)}"
    assert all(o["meta_info"]["completion_tokens"] == 64 for o in outs)


def test_greedy_equals_transformers_under_retraction(prompts, reference):
    # 1024 tokens of KV for 16 requests that grow to ~100-200 tokens each: decodes run dry.
    got, _, scheduler = _run(dict(max_total_tokens=1024, page_size=16), prompts)
    assert scheduler.num_retractions > 0
    assert got == reference


def test_prompt_logprobs_equal_transformers(hf_smollm2, prompts):
    ids = prompts[5]  # 60 tokens: several pages
    with Generator(max_total_tokens=2048, **COMMON) as gen:
        out = gen.generate(
            input_ids=ids,
            sampling_params={"max_new_tokens": 1, "temperature": 0},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=3,
        )
        gen.check_integrity()
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1).numpy()
    got = out["meta_info"]["input_token_logprobs"]
    assert len(got) == len(ids) and got[0][0] is None and [t for _, t, _ in got] == ids
    expected = np.array([ref[p - 1, ids[p]] for p in range(1, len(ids))])
    np.testing.assert_allclose([lp for lp, _, _ in got[1:]], expected, atol=1e-3)
    top = out["meta_info"]["input_top_logprobs"]
    assert [t for _, t, _ in top[1]] == np.argsort(-ref[0])[:3].tolist()
