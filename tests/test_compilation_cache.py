"""Processes that share the persistent compilation cache take turns at its folder: while one
holds the folder's lock, another's compile waits instead of reading an entry being written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import filelock

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    from jaxsgl.engine.model_runner import enable_compilation_cache

    assert enable_compilation_cache(sys.argv[1]) == sys.argv[1]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    print("compiling", flush=True)
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(8.0)).block_until_ready()
    print("done", flush=True)
    """
)


def test_a_compile_waits_for_the_cache_folders_lock(tmp_path):
    # Only the child enables the cache: the suite's own cache folder stays as it is.
    folder = str(tmp_path / "xla")
    os.makedirs(folder)
    lock = filelock.FileLock(os.path.join(folder, ".lockfile"))  # the lock JAX's cache takes
    lock.acquire()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, folder],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "compiling"
        time.sleep(3)  # the compile itself takes well under a second
        assert proc.poll() is None, "the compile went ahead while another process held the lock"
    finally:
        lock.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "done"
    assert "Error reading persistent compilation cache" not in err
    entries = [name for name in os.listdir(folder) if name.endswith("-cache")]
    assert entries, f"nothing was written to the cache: {os.listdir(folder)}"
