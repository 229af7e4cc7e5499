"""The Flax model against transformers on small random checkpoints of every supported variant."""

import numpy as np
import pytest
import torch
from tiny_models import VARIANTS, make_tiny

from jaxsgl.model.loader import load_model
from jaxsgl.model.recompute import RecomputeModel


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_tiny(request.param, folder)
    ours = RecomputeModel(load_model(folder, progress=False).model)
    return request.param, ref, ours


def _prompts(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(length)).tolist() for length in (37, 5, 120)[:n]]


def test_logits_match_transformers(tiny):
    name, ref, ours = tiny
    for ids in _prompts():
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0].numpy()
        got = ours.sequence_logits(ids)
        err = np.abs(got - expected).max()
        print(f"{name} len={len(ids)} max|dlogit|={err:.2e}")
        assert err <= 2e-3, (name, err)


def test_greedy_continuation_matches_transformers(tiny):
    name, ref, ours = tiny
    prompts = _prompts(seed=1)
    got = ours.greedy(prompts, max_new_tokens=24)
    for ids, out in zip(prompts, got, strict=True):
        with torch.no_grad():
            seq = ref.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out == seq[0, len(ids) :].tolist(), name


def test_packed_batch_equals_separate_sequences(tiny):
    _, _, ours = tiny
    prompts = _prompts()
    packed = ours.logits(prompts)
    for row, ids in zip(packed, prompts, strict=True):
        np.testing.assert_allclose(row, ours.sequence_logits(ids)[-1], atol=1e-5)


def test_sharded_safetensors_folder(tmp_path):
    ref = make_tiny("llama2_untied_mha", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = _prompts(1)[0]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    got = RecomputeModel(load_model(tmp_path, progress=False).model).sequence_logits(ids)
    assert np.abs(got - expected).max() <= 2e-3
