"""Ceilings measured on the device at hand, and a timer for jitted work.

Benchmarks state every figure as a ratio against these, measured in the same run: a
device-to-device copy for memory bandwidth (bytes read plus bytes written) and a large bf16
matrix product for the matmul rate, both on random data.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


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


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy, read + write
    matmul_flops_per_s: float  # bf16 matrix product
    device: str

    def floor(self, bytes_moved: float, flops: float) -> float:
        """The fewest seconds work of this size can take: the slower of its two terms."""
        return max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)

    def times(self, devices: int) -> Ceilings:
        """The ceilings of `devices` such devices working on one split problem."""
        return Ceilings(
            self.copy_bytes_per_s * devices,
            self.matmul_flops_per_s * devices,
            f"{devices} x {self.device}" if devices > 1 else self.device,
        )

    def bound(self, bytes_moved: float, flops: float) -> str:
        memory = bytes_moved / self.copy_bytes_per_s >= flops / self.matmul_flops_per_s
        return "memory" if memory else "compute"


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
