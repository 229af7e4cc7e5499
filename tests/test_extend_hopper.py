"""The Hopper extend kernel from a machine without a GPU: its checks, the backend's choice of
extend kernel, and its lowering to a Mosaic GPU module for CUDA.

Its numbers are checked on a Hopper GPU against the float32 reference (ragged runs, padding
rows, two page sizes) by `benchmarks/kernel_bench.py --check-only`; Mosaic GPU has no CPU
interpreter that runs warpgroup matmuls on transposed shared-memory operands."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from jaxsgl.model.attention_backend import (
    HOPPER_MIN_TOKENS,
    AttentionBackend,
    _pallas,
    extend_kernel,
)
from jaxsgl.model.forward_batch import ForwardBatch
from pallas_kernels import ragged_extend_hopper
from pallas_kernels.ragged_extend_hopper import ragged_extend_attention_hopper


@dataclasses.dataclass
class FakeGpu:  # what `supported` reads of a device
    compute_capability: str
    platform: str = "gpu"


HOPPER, AMPERE = FakeGpu("9.0"), FakeGpu("8.0")


def test_supported_needs_a_hopper_gpu_16_bit_pools_and_whole_tiles():
    assert ragged_extend_hopper.supported(HOPPER, jnp.bfloat16, 128, 16)
    assert ragged_extend_hopper.supported(HOPPER, jnp.float16, 64, 64)
    assert not ragged_extend_hopper.supported(AMPERE, jnp.bfloat16, 128, 16)
    assert not ragged_extend_hopper.supported(jax.devices("cpu")[0], jnp.bfloat16, 128, 16)
    assert not ragged_extend_hopper.supported(HOPPER, jnp.float32, 128, 16)
    assert not ragged_extend_hopper.supported(HOPPER, jnp.float8_e5m2, 128, 16)  # an 8-bit pool
    assert not ragged_extend_hopper.supported(HOPPER, jnp.bfloat16, 96, 16)  # head dim
    assert not ragged_extend_hopper.supported(HOPPER, jnp.bfloat16, 128, 4)  # 8-row tiles
    assert not ragged_extend_hopper.supported(HOPPER, jnp.bfloat16, 128, 256)  # > block_k


def test_backend_picks_the_extend_kernel_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("JAXSGL_EXTEND_KERNEL", raising=False)
    assert extend_kernel(HOPPER, jnp.bfloat16, 128, 16) == "hopper"
    assert extend_kernel(HOPPER, jnp.float32, 128, 16) == "triton"
    assert extend_kernel(jax.devices("cpu")[0], jnp.bfloat16, 128, 16) == "triton"
    monkeypatch.setenv("JAXSGL_EXTEND_KERNEL", "triton")
    assert extend_kernel(HOPPER, jnp.bfloat16, 128, 16) == "triton"
    monkeypatch.setenv("JAXSGL_EXTEND_KERNEL", "flash")
    with pytest.raises(ValueError, match="JAXSGL_EXTEND_KERNEL"):
        extend_kernel(HOPPER, jnp.bfloat16, 128, 16)
    with pytest.raises(ValueError, match="extend kernel"):
        AttentionBackend("native", extend="flash")


def test_rejects_what_it_cannot_run():
    q = jnp.zeros((8, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, 64, 128), jnp.bfloat16)
    ones = jnp.ones(2, jnp.int32)
    table = jnp.zeros((2, 4), jnp.int32)
    kw = dict(max_q_len=8, page_size=16, scale=1.0)
    args = (k, k, 0, ones, ones, ones, table)
    with pytest.raises(ValueError, match="bf16 or f16"):
        ragged_extend_attention_hopper(q.astype(jnp.float32), *args, **kw)
    with pytest.raises(ValueError, match="float8_e5m2"):
        k8 = k.astype(jnp.float8_e5m2)
        ragged_extend_attention_hopper(q, k8, k8, *args[2:], **kw)
    with pytest.raises(ValueError, match="page size"):
        ragged_extend_attention_hopper(q, *args, **{**kw, "page_size": 4})
    with pytest.raises(ValueError, match="block_k"):
        ragged_extend_attention_hopper(q, *args, block_k=96, **kw)
    with pytest.raises(ValueError, match=r"\[S\]"):
        ragged_extend_attention_hopper(q, k, k, 0, ones, ones[:1], ones, table, **kw)
    with pytest.raises(ValueError, match="kv heads"):
        bad = jnp.zeros((8, 3, 128), jnp.bfloat16)
        ragged_extend_attention_hopper(bad, *args, **kw)
    with pytest.raises(ValueError, match="stages"):
        ragged_extend_attention_hopper(q, *args, stages=1, **kw)


def test_lowers_to_one_mosaic_gpu_kernel_for_cuda():
    """Llama-3-8B heads over a two-layer pool, ragged runs: the kernel traces, its layouts and
    TMA copies lower, and the module holds one Mosaic GPU call."""
    T, N, K, H, G = 512, 32, 8, 128, 16
    arg = jax.ShapeDtypeStruct
    pool = arg((2, K, 4096, H), jnp.bfloat16)
    ints = functools.partial(arg, dtype=jnp.int32)
    fn = functools.partial(
        ragged_extend_attention_hopper, max_q_len=300, page_size=G, scale=H**-0.5
    )
    lowered = (
        jax.jit(fn)
        .trace(arg((T, N, H), jnp.bfloat16), pool, pool, 1, *(ints((5,)),) * 3, ints((5, 64)))
        .lower(lowering_platforms=("cuda",))
    )
    text = lowered.as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize(
    "tokens, hopper", [(HOPPER_MIN_TOKENS // 2, False), (HOPPER_MIN_TOKENS, True)]
)
def test_backend_takes_the_hopper_kernel_for_large_extend_steps(tokens, hopper):
    """With the Hopper kernel chosen, an extend step of fewer than HOPPER_MIN_TOKENS tokens
    still lowers to the Triton kernel (each Hopper shape costs warm-up a second of lowering);
    decode rows of the step go to the decode kernel either way."""
    T, S, N, K, H, G = tokens, 4, 8, 2, 64, 16
    arg = jax.ShapeDtypeStruct
    ints = functools.partial(arg, dtype=jnp.int32)
    batch = ForwardBatch(
        *(ints((T,)),) * 4, *(ints((S,)),) * 3, ints((S, 8)), ints((S,)), max_q_len=T, page_size=G
    )
    pool = arg((1, K, 1024, H), jnp.bfloat16)
    fn = functools.partial(_pallas, scale=H**-0.5, interpret=False, extend="hopper")
    text = (
        jax.jit(fn)
        .trace(arg((T, N, H), jnp.bfloat16), pool, pool, 0, batch)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    # The decode kernel (one-token runs) is Triton-lowered in both; the extend kernel is one or
    # the other.
    assert text.count("custom_call @mosaic_gpu") == int(hopper)
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 2 - int(hopper)
