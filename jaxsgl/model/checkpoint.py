"""Save a loaded (converted) model with orbax, and restore it without converting again.

A converted folder holds `config.json` (the checkpoint's config plus a marker), the tokenizer
files, and `params/` (orbax). Restoring places every array straight into its sharding on the
target mesh, whatever mesh it was saved from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxsgl.config import ModelConfig
from jaxsgl.model.llama import PARAMS_VERSION
from jaxsgl.model.loader import (
    ORBAX_MARKER,
    LoadedModel,
    abstract_model,
    resolve_dtype,
    write_config,
)

logger = logging.getLogger(__name__)


def save_converted(loaded: LoadedModel, folder: str | Path, tokenizer=None) -> Path:
    """Write `loaded` (and its tokenizer, if given) to `folder` for fast restarts."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "params").exists():
        raise ValueError(f"{folder}: already holds a converted model")
    params = nnx.to_pure_dict(nnx.state(loaded.model))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / "params", params)
    write_config(
        loaded.config,
        folder,
        **{
            ORBAX_MARKER: {
                "dtype": jax.numpy.dtype(loaded.dtype).name,
                "tensor_size": int(loaded.mesh.shape["tensor"]),
                "params_version": PARAMS_VERSION,
            }
        },
    )
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(folder)
    logger.info("saved converted model to %s", folder)
    return folder


def restore_converted(folder: str | Path, *, dtype: str = "auto", mesh: Mesh) -> LoadedModel:
    folder = Path(folder).absolute()
    meta = json.loads((folder / "config.json").read_text())
    saved = meta[ORBAX_MARKER]
    cfg = ModelConfig.from_hf_dict(meta, str(folder / "config.json"))
    version = saved.get("params_version", 1)  # 1: written before the field existed
    if version != PARAMS_VERSION:
        raise ValueError(
            f"{folder}: parameters saved in layout version {version}, this jaxsgl uses "
            f"version {PARAMS_VERSION}; convert again"
        )
    if saved["tensor_size"] != int(mesh.shape["tensor"]) and _replicates_kv(cfg, saved, mesh):
        raise ValueError(
            f"{folder}: saved for tensor size {saved['tensor_size']}, whose kv-head layout "
            f"differs from tensor size {mesh.shape['tensor']}; convert again"
        )
    saved_dtype = resolve_dtype(saved["dtype"], cfg)
    target_dtype = saved_dtype if dtype == "auto" else resolve_dtype(dtype, cfg)
    _, graphdef, state, shardings = abstract_model(cfg, saved_dtype, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state),
        shardings,
    )
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(folder / "params", target)
    if target_dtype != saved_dtype:
        params = jax.tree.map(lambda a: a.astype(target_dtype), params)
        _, graphdef, state, _ = abstract_model(cfg, target_dtype, mesh)
    nnx.replace_by_pure_dict(state, params)
    return LoadedModel(nnx.merge(graphdef, state), cfg, mesh, target_dtype, folder)


def _replicates_kv(cfg: ModelConfig, saved: dict, mesh: Mesh) -> bool:
    from jaxsgl.sharding import kv_head_repeats

    return kv_head_repeats(cfg, saved["tensor_size"]) != kv_head_repeats(
        cfg, int(mesh.shape["tensor"])
    )
