"""The real SmolLM2-135M-Instruct weights: jaxsgl against transformers loading the same GGUF."""

import numpy as np
import pytest
import torch

from jaxsgl.model.loader import load_model
from jaxsgl.model.recompute import RecomputeModel
from jaxsgl.tokenizer import load_tokenizer

RAW_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. In the beginning",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Les élèves ont étudié la géométrie; 東京は日本の首都です。 Numbers: 3.14159, 2.71828,",
    "Once upon a time " * 30,  # long enough that positions run past 150
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    return [chat] + [tokenizer.encode(p, add_special_tokens=False) for p in RAW_PROMPTS]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    loaded = load_model(smollm2_path, dtype="float32", progress=False)
    return RecomputeModel(loaded.model)


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    return hf_smollm2


def test_logits_match_transformers_at_every_position(ours, reference, prompts):
    worst = []
    for ids in prompts:
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].float().numpy()
        got = ours.sequence_logits(ids)
        err = float(np.abs(got - expected).max())
        worst.append(err)
        assert err <= 2e-3, (len(ids), err)
    print("max |dlogit| per prompt:", [f"{e:.2e}" for e in worst])


def test_greedy_32_tokens_match_transformers(ours, reference, prompts, tokenizer):
    got = ours.greedy(prompts, max_new_tokens=32)  # all prompts in one packed batch
    for ids, out in zip(prompts, got, strict=True):
        with torch.no_grad():
            seq = reference.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out == seq[0, len(ids) :].tolist()
    answer = tokenizer.decode(got[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
