"""ModelCost from a config alone, against the parameters of the model jaxsgl actually builds;
the KV cache's element types and the device's default extend step size."""

import logging

import jax
import jax.numpy as jnp
import pytest

from jaxsgl.config import PRESETS, config_for
from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.sizing import (
    check_collective_headroom,
    chunked_prefill_default,
    chunked_prefill_size_for,
)
from jaxsgl.model.forward_batch import kv_dtype
from jaxsgl.model.loader import abstract_model, write_config
from jaxsgl.model_cost import ModelCost
from jaxsgl.sharding import make_mesh


@pytest.mark.parametrize("name", ["llama-3-8b", "smollm2-135m"])
def test_config_cost_agrees_with_the_built_model(name):
    cfg = PRESETS[name]
    # The model's shapes without its weights: what a loaded runner's state holds.
    _, _, state, _ = abstract_model(cfg, jnp.bfloat16, make_mesh(1))
    leaves = jax.tree.leaves(state)
    params = sum(x.size for x in leaves)
    embed = cfg.vocab_size * cfg.hidden_size
    matmul = params - (0 if cfg.tie_word_embeddings else embed)
    cost = ModelCost.from_config(cfg, "bfloat16")
    assert cost.weight_bytes == pytest.approx(params * 2, rel=0.01)
    assert cost.matmul_params == pytest.approx(matmul, rel=0.01)
    assert cost.step_weight_bytes == pytest.approx(matmul * 2, rel=0.01)


def test_llama_3_8b_by_hand():
    cost = ModelCost.from_config(PRESETS["llama-3-8b"], "bfloat16")
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert cost.attn_flops_per_key == 4 * 32 * 32 * 128
    assert cost.head_params == 128_256 * 4096
    assert cost.weight_bytes == 2 * 8_030_261_248
    assert cost.matmul_params == 8_030_261_248 - 128_256 * 4096  # untied: the gather is free
    f32 = ModelCost.from_config(PRESETS["llama-3-8b"], "float32")
    assert f32.weight_bytes == 2 * cost.weight_bytes and f32.matmul_params == cost.matmul_params
    fp8 = ModelCost.from_config(PRESETS["llama-3-8b"], "bfloat16", "float8_e5m2")
    assert fp8.kv_bytes_per_token == 65_536 and fp8.weight_bytes == cost.weight_bytes
    with pytest.raises(ValueError, match="unknown KV dtype 'int4'"):
        ModelCost.from_config(PRESETS["llama-3-8b"], "bfloat16", "int4")


def test_kv_cache_dtype_names():
    assert kv_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_dtype("fp8_e5m2", jnp.float32) == jnp.float8_e5m2
    assert kv_dtype("fp8_e4m3", jnp.bfloat16) == jnp.float8_e4m3fn
    with pytest.raises(ValueError, match="'int8' is not auto or one of fp8_e5m2, fp8_e4m3"):
        kv_dtype("int8", jnp.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' is not one of"):
        EngineOptions(kv_cache_dtype="fp8")


def test_tied_head_counts_as_a_matmul():
    cfg = PRESETS["smollm2-135m"]
    cost = ModelCost.from_config(cfg)
    assert cost.matmul_params == cfg.num_params and cost.step_weight_bytes == cost.weight_bytes


def test_config_for_reads_presets_and_folders(tmp_path):
    assert config_for("Llama-3-8B") is PRESETS["llama-3-8b"]
    write_config(PRESETS["smollm2-135m"], tmp_path)
    assert config_for(tmp_path) == PRESETS["smollm2-135m"]
    with pytest.raises(ValueError, match="preset name"):
        config_for(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        ModelCost.from_config(PRESETS["smollm2-135m"], "int4")


def test_chunked_prefill_default_follows_the_device():
    gib = 2**30
    assert chunked_prefill_default("cpu", None) == 2048
    assert chunked_prefill_default("gpu", None) == 2048  # no memory figure: the small default
    assert chunked_prefill_default("gpu", 24 * gib) == 2048
    assert chunked_prefill_default("gpu", 40 * gib) == 4096
    assert chunked_prefill_default("gpu", 80 * gib) == 8192  # H100
    assert chunked_prefill_default("gpu", 141 * gib) == 8192  # H200
    # Tensor parallelism over 4 cards or more doubles the step on large cards only.
    assert chunked_prefill_default("gpu", 141 * gib, tp_size=2) == 8192
    assert chunked_prefill_default("gpu", 141 * gib, tp_size=4) == 16384
    assert chunked_prefill_default("gpu", 80 * gib, tp_size=8) == 16384
    assert chunked_prefill_default("gpu", 40 * gib, tp_size=4) == 4096
    assert chunked_prefill_default("cpu", None, tp_size=4) == 2048
    assert EngineOptions().chunk_tokens == 2048  # unresolved options: the small default
    assert EngineOptions(chunked_prefill_size=8192).chunk_tokens == 8192
    assert EngineOptions(chunked_prefill_size=-1, max_prefill_tokens=4096).chunk_tokens == 4096


def test_a_chunk_over_the_prefill_cap_is_reported(caplog):
    """--chunked-prefill-size above --max-prefill-tokens: steps take the cap, and the engine
    says so at start instead of running smaller steps than asked without a word."""
    over = EngineOptions(chunked_prefill_size=32768)
    with caplog.at_level(logging.WARNING, logger="jaxsgl.engine.sizing"):
        assert chunked_prefill_size_for(over, loaded=None) == 32768
    assert over.chunk_tokens == 16384
    (record,) = caplog.records
    assert "32768" in record.getMessage() and "at most 16384" in record.getMessage()
    caplog.clear()
    at_cap = EngineOptions(chunked_prefill_size=16384)
    with caplog.at_level(logging.WARNING, logger="jaxsgl.engine.sizing"):
        assert chunked_prefill_size_for(at_cap, loaded=None) == 16384
    assert not caplog.records


@pytest.mark.parametrize(
    "card_gib, fraction, tp, warned",
    [
        (80, "0.92", 4, True),  # 6.4 GB outside the pool: hung at the first all-reduce
        (80, "0.87", 4, False),  # 10.4 GB: served
        (141, "0.92", 4, False),  # an H200's 11.3 GB: served
        (80, "0.92", 1, False),  # no collectives
        (80, None, 2, False),  # JAX's default pool, three quarters of the card
    ],
)
def test_too_little_memory_outside_the_pool_for_collectives_is_reported(
    caplog, monkeypatch, card_gib, fraction, tp, warned
):
    if fraction is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", fraction)
    pool = card_gib * 2**30 * float(fraction or 0.75)  # the limit XLA's pool reports
    with caplog.at_level(logging.WARNING, logger="jaxsgl.engine.sizing"):
        check_collective_headroom(int(pool), tp)
    assert bool(caplog.records) == warned
    if warned:
        assert f"TP {tp}" in caplog.records[0].getMessage()
        assert (
            f"leaves {card_gib * (1 - float(fraction)):.1f} GiB" in caplog.records[0].getMessage()
        )
