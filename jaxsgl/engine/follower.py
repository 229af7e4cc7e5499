"""A follower process of a multi-host mesh: the same model and KV pool as the leader, and
every step the leader launches (see `jaxsgl.distributed`)."""

from __future__ import annotations

import logging

from jaxsgl.distributed import connect_to_leader, follow
from jaxsgl.engine.model_runner import ModelRunner, enable_compilation_cache
from jaxsgl.engine.options import EngineOptions
from jaxsgl.model.loader import load_model
from jaxsgl.sharding import make_mesh

logger = logging.getLogger(__name__)


def run_follower(options: EngineOptions, progress: bool = True) -> int:
    """Load the model onto this process's share of the mesh, then follow the leader until it
    stops. Returns the number of launches run."""
    enable_compilation_cache(options.compilation_cache_dir)
    loaded = load_model(
        options.model_path,
        load_format=options.load_format,
        dtype=options.dtype,
        mesh=make_mesh(options.tp_size),
        seed=options.random_seed,
        progress=progress,
    )
    conn = connect_to_leader(options.dist_init_addr)
    kind, num_pages = conn.recv()
    assert kind == "init", kind
    runner = ModelRunner(
        loaded,
        num_pages,
        options.page_size,
        loaded.config.vocab_size,
        attention_backend=options.attention_backend,
        kv_cache_dtype=options.kv_cache_dtype,
    )
    logger.info("following the leader: %d KV pages", num_pages)
    launches = follow(runner, conn)
    logger.info("the leader stopped after %d launches", launches)
    return launches
