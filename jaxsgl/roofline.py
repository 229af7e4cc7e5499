"""Ceilings measured on the device at hand, and a timer for jitted work.

Benchmarks state every figure as a ratio against these, measured in the same run: a
device-to-device copy for memory bandwidth (bytes read plus bytes written) and a large bf16
matrix product for the matmul rate, both on random data.

    python -m jaxsgl.roofline --out ceilings.json   # for bench_serving's --ceilings
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxsgl.ceilings import Ceilings, write_ceilings


def time_call(fn: Callable, *args, repeats: int = 7, calls: int = 10) -> float:
    """Median seconds per call of `fn(*args)`: `calls` dispatched back to back, then waited
    for, so the host's launch time hides behind the device's work; after one warm-up call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def measure_ceilings(copy_mib: int | None = None, matmul_n: int | None = None) -> Ceilings:
    """Copy bandwidth and bf16 matmul rate of the default device (smaller sizes on a CPU)."""
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    copy_mib = copy_mib or (2048 if gpu else 256)
    matmul_n = matmul_n or (8192 if gpu else 1024)
    key = jax.random.key(0)
    x = jax.random.normal(key, (copy_mib * 2**20 // 2,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    copy_s = time_call(copy, x)
    a = jax.random.normal(key, (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul_s = time_call(matmul, a, b)
    return Ceilings(
        copy_bytes_per_s=2 * x.nbytes / copy_s,
        matmul_flops_per_s=2 * matmul_n**3 / matmul_s,
        device=getattr(device, "device_kind", device.platform),
    )


def main(argv: list[str] | None = None) -> int:
    """Measure the default device's ceilings, print them and write them to `--out`."""
    p = argparse.ArgumentParser(prog="python -m jaxsgl.roofline", description=main.__doc__)
    p.add_argument("--out", default=None, help="ceilings JSON (copy_tb_s, matmul_tflop_s)")
    p.add_argument("--copy-mib", type=int, default=None, help="copied buffer (default by device)")
    p.add_argument("--matmul-n", type=int, default=None, help="square matmul side (default too)")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    print(f"measuring copy bandwidth and bf16 matmul rate on {device} ...", file=sys.stderr)
    ceilings = measure_ceilings(args.copy_mib, args.matmul_n)
    print(
        f"{ceilings.device}: copy {ceilings.copy_bytes_per_s / 1e12:.3f} TB/s, "
        f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s"
    )
    if args.out:
        write_ceilings(args.out, ceilings)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
