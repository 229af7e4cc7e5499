"""Tensor parallelism on fake CPU devices gives the logits of one device."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from tiny_models import make_tiny

from jaxsgl import sharding
from jaxsgl.config import PRESETS, ModelConfig
from jaxsgl.model.loader import load_model
from jaxsgl.model.recompute import RecomputeModel

PROMPTS = [list(range(3, 40)), [7, 9, 11, 13, 200], list(range(100, 160))]


def _logits(model_path, tp, **kw):
    loaded = load_model(model_path, mesh=sharding.make_mesh(tp), progress=False, **kw)
    return loaded, RecomputeModel(loaded.model).logits(PROMPTS)


@pytest.fixture(scope="module")
def gqa4_folder(tmp_path_factory):
    # 8 q heads, 2 kv heads: tp 4 and 8 exercise kv heads < tensor size.
    folder = tmp_path_factory.mktemp("gqa4")
    make_tiny("llama31_tied_gqa4", folder)
    return folder


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_logits_match_single_device(gqa4_folder, tp):
    _, base = _logits(gqa4_folder, 1)
    loaded, got = _logits(gqa4_folder, tp)
    np.testing.assert_allclose(got, base, atol=1e-4, rtol=0)
    layers = loaded.model.layers
    # The split is real: attention heads and the MLP live on `tp` devices in different pieces.
    assert layers.w_qkv[...].sharding.spec[2] == "tensor"
    assert layers.wo[...].sharding.spec[1] == "tensor"
    assert layers.w_gate_up[...].sharding.spec[3] == "tensor"
    assert layers.w_down[...].sharding.spec[1] == "tensor"
    assert len({str(s.index) for s in layers.w_qkv[...].addressable_shards}) == tp
    # kv heads are replicated up to the tensor size when there are fewer of them; the 8 query
    # heads are shared out over the copies.
    assert layers.w_qkv[...].shape[2:4] == (max(2, tp), 8 // max(2, tp) + 2)


def test_qwen2_bias_under_tensor_parallel(tmp_path):
    make_tiny("qwen2_bias", tmp_path)
    _, base = _logits(tmp_path, 1)
    loaded, got = _logits(tmp_path, 4)
    np.testing.assert_allclose(got, base, atol=1e-4, rtol=0)
    assert loaded.model.layers.b_qkv[...].sharding.spec[1] == "tensor"


def _transformers_logits(ref) -> np.ndarray:
    """transformers' next-token logits after each of PROMPTS."""
    with torch.no_grad():
        return np.stack([ref(torch.tensor([p])).logits[0, -1].numpy() for p in PROMPTS])


@pytest.mark.parametrize("variant", ["llama3_untied_gqa4", "qwen2_bias"])
def test_replicated_kv_heads_read_by_their_own_query_heads(tmp_path, variant):
    """2 kv heads over 4 and 8 devices: each copy of a kv head is fused with a share of the
    query heads that read it, so the logits are transformers', whose heads are neither fused
    nor copied (and whose query head n reads kv head n // 4)."""
    ref = make_tiny(variant, tmp_path)  # 8 q heads, 2 kv heads
    expected = _transformers_logits(ref)
    for tp in (4, 8):
        loaded, got = _logits(tmp_path, tp)
        assert loaded.model.layers.w_qkv[...].shape[2] == tp  # one kv group a device
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)


def test_query_heads_that_split_over_kv_heads_that_do_not(tmp_path):
    """6 q heads over 2 kv heads. TP 3: the kv heads do not split, so the fused q/k/v weight
    stays whole while o still splits by rows (the ffn of 128 stays whole too). TP 6: each kv
    head is repeated 3 times, one query head a copy. Both give transformers' logits."""
    ref = make_tiny("llama_gqa3", tmp_path)
    expected = _transformers_logits(ref)
    # tp -> (kv heads, slots a kv group: q heads + k + v, how the kv heads split)
    for tp, (kv_heads, group, split) in {3: (2, 5, None), 6: (6, 3, "tensor")}.items():
        loaded, got = _logits(tmp_path, tp)
        layers = loaded.model.layers
        assert layers.w_qkv[...].shape[2:4] == (kv_heads, group)
        assert layers.w_qkv[...].sharding.spec[2] == split
        assert layers.wo[...].sharding.spec[1] == "tensor"
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)


def test_heads_not_divisible_fall_back_to_replicated_attention():
    # SmolLM2's 9 q heads do not split over 2 devices; the MLP still does.
    cfg = dataclasses.replace(PRESETS["smollm2-135m"], num_layers=2)
    assert cfg.num_heads % 2
    mesh1, mesh2 = sharding.make_mesh(1), sharding.make_mesh(2)
    rules = sharding.model_rules(cfg, mesh2)
    assert rules.rules["q_heads"] is None and rules.rules["mlp"] == "tensor"
    # Same random weights on both meshes: dummy init is deterministic given the seed.
    a = _dummy_logits(cfg, mesh1)
    b = _dummy_logits(cfg, mesh2)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def _dummy_logits(cfg: ModelConfig, mesh):
    from jaxsgl.model import loader

    loaded = loader._build(cfg, jax.numpy.float32, mesh, None, None, seed=3, progress=False)
    return RecomputeModel(loaded.model).logits(PROMPTS)


def test_kv_head_repeats():
    cfg = PRESETS["llama-3-8b"]  # 32 q / 8 kv heads
    assert [sharding.kv_head_repeats(cfg, tp) for tp in (1, 2, 4, 8, 16, 32)] == [
        1,
        1,
        1,
        1,
        2,
        4,
    ]
    assert sharding.sharded_config(cfg, 16).num_kv_heads == 16


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(16)


@pytest.mark.parametrize("variant", ["llama31_tied_gqa4", "qwen2_bias"])
def test_dummy_weights_are_one_model_at_every_tensor_size(tmp_path, variant):
    """A seed gives the same random model however many devices hold it, also where the kv
    heads are repeated to fill the tensor axis (tp 4 and 8 over 2 kv heads)."""
    make_tiny(variant, tmp_path)
    _, base = _logits(tmp_path, 1, load_format="dummy", dtype="float32")
    for tp in (4, 8):
        loaded, got = _logits(tmp_path, tp, load_format="dummy", dtype="float32")
        assert loaded.model.layers.w_qkv[...].shape[2] == tp  # repeated kv heads
        np.testing.assert_allclose(got, base, atol=1e-4, rtol=0)
