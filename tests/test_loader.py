"""Model resolution, formats, dtypes, orbax round trips and errors that name the problem."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import make_tiny

from jaxsgl import sharding
from jaxsgl.config import PRESETS
from jaxsgl.model import loader
from jaxsgl.model.checkpoint import save_converted
from jaxsgl.model.loader import load_model, resolve_model_path
from jaxsgl.model.recompute import RecomputeModel

IDS = list(range(5, 60))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny("llama31_tied_gqa4", folder)
    return folder


def _seq_logits(loaded):
    return RecomputeModel(loaded.model).sequence_logits(IDS)


def test_embedded_model_resolves_by_short_name(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_path(None) == smollm2_path
    assert resolve_model_path("SmolLM2-135M-Instruct") == smollm2_path


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    monkeypatch.setitem(
        loader.EMBEDDED_MODELS, "absent-model", ("no_such_pkg_xyz", "m.gguf", "pip install xyz")
    )
    with pytest.raises(ValueError, match="pip install xyz"):
        resolve_model_path("absent-model")


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.*no config.json"):
        load_model(tmp_path)


def test_unknown_architecture(tmp_path, tiny_folder):
    for f in tiny_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture.*GPT2LMHeadModel"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path, tiny_folder):
    for f in tiny_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated safetensors file"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path, tiny_folder):
    from safetensors.numpy import load_file, save_file

    for f in tiny_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(tmp_path)


def test_tensor_of_the_wrong_shape_is_named_with_those_fused_with_it(tmp_path, tiny_folder):
    from safetensors.numpy import load_file, save_file

    for f in tiny_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    attn = "model.layers.1.self_attn."
    tensors[attn + "k_proj.weight"] = tensors[attn + "k_proj.weight"][:8]  # 1 kv head of 2
    save_file(tensors, tmp_path / "model.safetensors")
    expected = (
        rf"tensors '{attn}q_proj.weight' \(64, 64\), '{attn}k_proj.weight' \(8, 64\), "
        rf"'{attn}v_proj.weight' \(16, 64\) do not fit the config \(expected \(64, 2, 6, 8\)"
    )
    with pytest.raises(ValueError, match=expected):
        load_model(tmp_path)


def test_dtypes(tiny_folder):
    f32 = load_model(tiny_folder, progress=False)
    assert f32.dtype == jnp.float32  # the checkpoint's own dtype under `auto`
    bf16 = load_model(tiny_folder, dtype="bfloat16", progress=False)
    half = load_model(tiny_folder, dtype="half", progress=False)
    assert bf16.model.layers.w_qkv[...].dtype == jnp.bfloat16
    assert half.model.layers.w_gate_up[...].dtype == jnp.float16
    ref = _seq_logits(f32)
    for low in (bf16, half):
        got = _seq_logits(low)
        assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(tiny_folder, dtype="int8")


def test_quantized_gguf_auto_dtype_is_float32_on_cpu():
    cfg = PRESETS["smollm2-135m"]
    quantized = type(cfg)(**{**cfg.__dict__, "checkpoint_dtype": "quantized"})
    assert jax.default_backend() == "cpu"
    assert loader.resolve_dtype("auto", quantized) == jnp.float32


def test_orbax_round_trip_onto_another_mesh(tmp_path, tiny_folder):
    original = load_model(tiny_folder, progress=False)
    out = save_converted(original, tmp_path / "converted")
    assert loader.detect_format(out) == "orbax"
    restored = load_model(out, mesh=sharding.make_mesh(2))
    assert restored.model.layers.w_qkv[...].sharding.spec[2] == "tensor"
    np.testing.assert_allclose(_seq_logits(restored), _seq_logits(original), atol=1e-4)
    with pytest.raises(ValueError, match="already holds a converted model"):
        save_converted(original, out)


def test_converted_model_of_an_older_layout_asks_to_convert_again(tmp_path, tiny_folder):
    out = save_converted(load_model(tiny_folder, progress=False), tmp_path / "converted")
    meta = json.loads((out / "config.json").read_text())
    del meta[loader.ORBAX_MARKER]["params_version"]  # as written before fused q/k/v, gate/up
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layout version 1, this jaxsgl uses version 2; convert"):
        load_model(out)


def test_dummy_presets_have_their_real_sizes():
    # Abstract only: shapes and parameter counts, no 8B allocation.
    expected = {
        "llama-3-8b": 8.03e9,
        "llama-3.2-1b": 1.24e9,
        "llama-3-70b": 70.6e9,
        "smollm2-135m": 134.5e6,
    }
    for name, count in expected.items():
        cfg = PRESETS[name]
        assert abs(cfg.num_params - count) / count < 0.01, name
        _, _, state, _ = loader.abstract_model(cfg, jnp.bfloat16, sharding.make_mesh(1))
        total = sum(x.size for x in jax.tree.leaves(state))
        assert total == cfg.num_params, name


def test_dummy_weights_load_and_run():
    loaded = load_model("smollm2-135m", load_format="dummy", dtype="float32", progress=False)
    logits = _seq_logits(loaded)
    assert logits.shape == (len(IDS), 49152) and np.isfinite(logits).all()
    with pytest.raises(ValueError, match="preset name"):
        load_model("llama-5", load_format="dummy")
