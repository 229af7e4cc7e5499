"""The Pallas attention kernels on a GPU against the ceilings measured in the same run.

Decode: Llama-3-8B heads (32 q / 8 kv, head dim 128), bf16, page 16; the floor is the bytes of
the context's keys and values over the copy bandwidth. Extend: causal prefill of 4 × 2048 new
tokens and 2048 new tokens over a 6144-token cached prefix; the floor is the attention FLOPs
(causal, QKᵀ and PV) over the bf16 matmul rate. Each case sweeps the kernel's block sizes and
compares with a baseline run on the same data (JAX's own Pallas paged decode; cuDNN's fused
attention for a prefill with no prefix), and checks the output against a float32 reference.
`--kv-dtype float8_e4m3fn` (or float8_e5m2) runs the cases over an 8-bit pool; their baseline
is then the same kernel widening the pool's values to bfloat16, as it did before they went to
float16 (neither baseline above takes 8-bit pages).

    python benchmarks/kernel_bench.py --out results.json
    python benchmarks/kernel_bench.py --no-sweep --no-hopper --kv-dtype float8_e4m3fn
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxsgl.roofline import measure_ceilings, time_call
from pallas_kernels import paged_decode, ragged_extend, ragged_extend_hopper
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.ragged_extend import (
    ragged_extend_attention,
    ragged_extend_attention_reference,
)

N, K, H, G = 32, 8, 128, 16
SCALE = H**-0.5
KV_DTYPE = jnp.bfloat16  # the pool's type (--kv-dtype)


def _pool(rng, num_pages: int):
    shape = (1, K, num_pages * G, H)
    k = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), shape, jnp.bfloat16)
    return k.astype(KV_DTYPE), v.astype(KV_DTYPE)


def _with_bf16_widening(kernel):
    """`kernel` as it was before 8-bit pools widened to float16: queries stay bfloat16, so keys
    and values widen to bfloat16 (the baseline row for 8-bit pools). Applies while tracing."""

    def run(*args, **kwargs):
        saved = paged_decode.widened_queries, ragged_extend.widened_queries
        paged_decode.widened_queries = ragged_extend.widened_queries = lambda q, dtype: q
        try:
            return kernel(*args, **kwargs)
        finally:
            paged_decode.widened_queries, ragged_extend.widened_queries = saved

    return run


def _tables(rng, S: int, ctx: int):
    pages = ctx // G
    table = rng.permutation(np.arange(1, 1 + S * pages)).reshape(S, pages).astype(np.int32)
    return jnp.asarray(table), 1 + S * pages


def _dense_reference(q, k, v, table, q_pos, seq):
    """float32 attention of rows `q [T, N, H]` (sequence `seq`, positions `q_pos`) over the
    sequence's pages, keys gathered into one contiguous array."""
    slots = (table[seq][:, None] * G + jnp.arange(G)).reshape(-1)  # [C]
    kc = k[0][:, slots].astype(jnp.float32)  # [K, C, H]
    vc = v[0][:, slots].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(q.shape[0], K, N // K, H)
    s = jnp.einsum("TKRH,KCH->TKRC", qg, kc) * SCALE
    s = jnp.where(jnp.arange(kc.shape[1])[None, None, None] <= q_pos[:, None, None, None], s, -1e30)
    return jnp.einsum("TKRC,KCH->TKRH", jax.nn.softmax(s, axis=-1), vc).reshape(q.shape)


def _measure(case, config, fn, args, ref, floor, rate: tuple[str, float], shape=None) -> dict:
    """One row: time and error of `fn(*args)` (reshaped to `shape`) against `ref`, with the
    floor's share and `rate = (name, units of work)` per second; or the error a compiler gave."""
    try:
        out = fn(*args)
        err = _rel(out if shape is None else out.reshape(shape), ref)
        t = time_call(fn, *args)
    except Exception as e:  # a block shape or baseline the compiler refuses: note it, go on
        return dict(case=case, config=config, error=str(e)[:200])
    name, work = rate
    return dict(
        case=case, config=config, ms=t * 1e3, of_ceiling=floor / t, rel_err=err, **{name: work / t}
    )


def _rel(out, ref) -> float:
    out = out.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_decode(rng, ceil, S: int, ctx: int, sweep: bool) -> list[dict]:
    table, num_pages = _tables(rng, S, ctx)
    k, v = _pool(rng, num_pages)
    q = jax.random.normal(jax.random.key(5), (S, N, H), jnp.bfloat16)
    lens = jnp.full((S,), ctx, jnp.int32)
    kv_bytes = 2 * S * ctx * K * H * k.dtype.itemsize
    case = f"decode B{S} ctx{ctx}"
    floor = ceil.floor(kv_bytes, 4 * S * ctx * N * H)
    last = jnp.array([ctx - 1])
    one = lambda qs, s: _dense_reference(qs[None], k, v, table, last, s)[0]
    ref = jax.jit(jax.vmap(one))(q, jnp.arange(S))
    rows = []
    grid = [(4, 4, 2, None)]
    if sweep:
        grid = itertools.product((4, 8), (2, 4), (2, 3), (None, 2, 16))
    for ppb, warps, stages, splits in grid:
        fn = jax.jit(
            functools.partial(
                paged_decode_attention,
                page_size=G,
                scale=SCALE,
                pages_per_block=ppb,
                num_splits=splits,
                num_warps=warps,
                num_stages=stages,
            )
        )
        config = f"ppb{ppb} w{warps} s{stages} x{splits}"
        args = (q, k, v, 0, table, lens)
        rows.append(_measure(case, config, fn, args, ref, floor, ("tb_s", kv_bytes / 1e12)))
    if k.dtype.itemsize == 1:  # the default blocks widening to bfloat16, as before; JAX's
        # paged attention below takes 16-bit pages only
        kernel = functools.partial(paged_decode_attention, page_size=G, scale=SCALE)
        fn = jax.jit(_with_bf16_widening(kernel))
        config = "baseline default blocks, 8-bit widened to bf16"
        args = (q, k, v, 0, table, lens)
        rows.append(_measure(case, config, fn, args, ref, floor, ("tb_s", kv_bytes / 1e12)))
        return rows
    # Baseline: JAX's Pallas GPU paged attention (decode only) on the same pages.
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    k_pages = k[0].reshape(K, num_pages, G, H)
    v_pages = v[0].reshape(K, num_pages, G, H)
    base = jax.jit(
        functools.partial(jax_paged.paged_attention, pages_per_compute_block=8, k_splits=1)
    )
    qs = (q.astype(jnp.float32) * SCALE).astype(q.dtype)
    config = "baseline jax paged_attention k_splits=1"
    args = (qs, k_pages, v_pages, table, lens)
    rows.append(_measure(case, config, base, args, ref, floor, ("tb_s", kv_bytes / 1e12)))
    return rows


def bench_extend(rng, ceil, S: int, new: int, prefix: int, sweep: bool, hopper: bool) -> list[dict]:
    ctx = prefix + new
    table, num_pages = _tables(rng, S, ctx)
    k, v = _pool(rng, num_pages)
    T = S * new
    q = jax.random.normal(jax.random.key(6), (T, N, H), jnp.bfloat16)
    q_start = jnp.arange(S, dtype=jnp.int32) * new
    q_lens = jnp.full((S,), new, jnp.int32)
    seq_lens = jnp.full((S,), ctx, jnp.int32)
    # Causal: token i of the run sees prefix + i + 1 keys; 2 FLOPs a multiply-add, QKᵀ and PV.
    flops = S * N * H * 4 * (new * prefix + new * (new + 1) / 2)
    case = f"extend {S}x{new} over {prefix}"
    floor = ceil.floor(T * N * H * 2 * 2 + 2 * S * ctx * K * H * k.dtype.itemsize, flops)
    q_pos = prefix + jnp.arange(new)
    ref = jnp.concatenate(
        [_dense_reference(q[s * new : (s + 1) * new], k, v, table, q_pos, s) for s in range(S)]
    )
    # (config, kernel, block settings): the Triton kernel's sweep of 2026-11-26
    # (kernel_notes.md) found these near its best, the first being the engine's default; then
    # the Hopper kernel's.
    triton = [(32, 128, 8, 2, 4), (128, 128, 8, 2, 1), (32, 64, 4, 3, 4)][: None if sweep else 1]
    configs = [
        (
            f"bq{bq} e{e} bk{bk} w{w} s{st}",
            ragged_extend_attention,
            dict(block_q=bq, block_k=bk, heads_per_program=e, num_warps=w, num_stages=st),
        )
        for bq, bk, w, st, e in triton
    ]
    if k.dtype.itemsize == 1:  # the default blocks, widening to bfloat16 as before
        kernel = _with_bf16_widening(ragged_extend_attention)
        configs.append(("baseline default blocks, 8-bit widened to bf16", kernel, {}))
    if hopper and ragged_extend_hopper.supported(jax.devices()[0], k.dtype, H, G):
        blocks = ((128, 2), (64, 2), (64, 3), (64, 4)) if sweep else ((128, 2),)
        kernel = ragged_extend_hopper.ragged_extend_attention_hopper
        configs += [
            (f"hopper bk{bk} s{st}", kernel, dict(block_k=bk, stages=st)) for bk, st in blocks
        ]
    rows = []
    args = (q, k, v, 0, q_start, q_lens, seq_lens, table)
    for config, kernel, settings in configs:
        fn = jax.jit(functools.partial(kernel, max_q_len=new, page_size=G, scale=SCALE, **settings))
        rows.append(_measure(case, config, fn, args, ref, floor, ("tflop_s", flops / 1e12)))
    if prefix == 0 and k.dtype.itemsize == 2:  # cuDNN's fused causal attention, dense K/V
        slots = [(table[s][:, None] * G + jnp.arange(G)).reshape(-1) for s in range(S)]
        kd = jnp.stack([k[0][:, sl] for sl in slots])  # [S, K, C, H]
        vd = jnp.stack([v[0][:, sl] for sl in slots])
        kd, vd = kd.transpose(0, 2, 1, 3), vd.transpose(0, 2, 1, 3)  # [S, C, K, H]
        qd = q.reshape(S, new, N, H)
        cudnn = jax.jit(
            functools.partial(
                jax.nn.dot_product_attention, is_causal=True, scale=SCALE, implementation="cudnn"
            )
        )
        config = "baseline cuDNN dense causal"
        rate = ("tflop_s", flops / 1e12)
        rows.append(_measure(case, config, cudnn, (qd, kd, vd), ref, floor, rate, (T, N, H)))
    return rows


def check_extend(rng, hopper: bool) -> list[dict]:
    """Each extend kernel on ragged runs against the float32 reference: prefixes of 0 and
    more, lengths off page multiples, a run left to the decode kernel (length 0), a one-token
    run, rows past the last run (which must come back as zeros), the second of two layers,
    pages of 16 and 64 and GQA ratios 4 and 1."""
    rows = []
    for page, heads, kv_heads in ((16, 32, 8), (64, 8, 8)):
        kernels = {"triton": ragged_extend_attention}
        q_lens = np.array([200, 0, 77, 1, 130], np.int32)
        prefix = np.array([0, 40, 300, 1000, 5], np.int32)
        seq_lens = q_lens + prefix
        q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
        T = 512  # 408 rows of runs, then padding
        P = -(-int(seq_lens.max()) // page)
        pages = rng.permutation(np.arange(1, 1 + len(q_lens) * P)).reshape(len(q_lens), P)
        num_slots = (1 + len(q_lens) * P) * page
        key = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
        pool_shape = (2, kv_heads, num_slots, H)
        k = jax.random.normal(key[0], pool_shape, jnp.bfloat16)
        v = jax.random.normal(key[1], pool_shape, jnp.bfloat16)
        q = jax.random.normal(key[2], (T, heads, H), jnp.bfloat16)
        args = (q, k, v, 1, *map(jnp.asarray, (q_start, q_lens, seq_lens, pages.astype(np.int32))))
        ref = ragged_extend_attention_reference(*args, page_size=page, scale=SCALE)
        if hopper and ragged_extend_hopper.supported(jax.devices()[0], q.dtype, H, page):
            kernels["hopper"] = ragged_extend_hopper.ragged_extend_attention_hopper
        for name, kernel in kernels.items():
            fn = functools.partial(kernel, max_q_len=int(q_lens.max()), page_size=page, scale=SCALE)
            try:
                out = jax.jit(fn)(*args).astype(jnp.float32)
            except Exception as e:  # a compiler's refusal is a failed check
                rows.append(dict(kernel=name, page=page, ok=False, error=str(e)[:300]))
                continue
            runs = zip(q_start, q_lens, strict=True)
            seq_rows = np.concatenate([np.arange(s, s + n) for s, n in runs])
            err = _rel(out[seq_rows], ref[seq_rows])
            pad = float(jnp.abs(out[int(q_start[-1] + q_lens[-1]) :]).max())
            ok = err < 2e-2 and pad == 0.0
            rows.append(dict(kernel=name, page=page, rel_err=err, padding_max=pad, ok=ok))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    p.add_argument("--no-sweep", action="store_true", help="one block configuration per case")
    p.add_argument("--only", choices=["decode", "extend"], default=None, help="one kernel's cases")
    p.add_argument(
        "--check-only", action="store_true", help="only the ragged checks of the extend kernels"
    )
    p.add_argument("--no-hopper", action="store_true", help="leave out the Hopper extend kernel")
    p.add_argument(
        "--kv-dtype",
        default="bfloat16",
        choices=["bfloat16", "float8_e4m3fn", "float8_e5m2"],
        help="the pool's type (8-bit ones add a row widening them to bfloat16, as before)",
    )
    args = p.parse_args(argv)
    global KV_DTYPE
    KV_DTYPE = jnp.dtype(args.kv_dtype)
    rng = np.random.default_rng(0)
    ceil = measure_ceilings()
    print(
        f"{ceil.device}: copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceil.matmul_flops_per_s / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    sweep = not args.no_sweep
    rows = []
    hopper = not args.no_hopper
    checks = check_extend(rng, hopper)
    for c in checks:
        print("check", c, flush=True)
    if args.check_only:
        raise SystemExit(0 if all(c["ok"] for c in checks) else 1)
    if args.only in (None, "decode"):
        rows += bench_decode(rng, ceil, 64, 2048, sweep)
        rows += bench_decode(rng, ceil, 4, 16384, sweep)
    if args.only in (None, "extend"):
        rows += bench_extend(rng, ceil, 4, 2048, 0, sweep, hopper)
        rows += bench_extend(rng, ceil, 1, 2048, 6144, sweep, hopper)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(ceilings=ceil.__dict__, rows=rows, checks=checks), f, indent=1)
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        if r["config"].startswith("baseline"):
            best[r["case"] + " " + r["config"]] = r
        elif r["case"] not in best or r["ms"] < best[r["case"]]["ms"]:
            best[r["case"]] = r
    print(f"{'case':28} {'config':40} {'ms':>8} {'of ceiling':>10} {'rel err':>9}")
    for r in best.values():
        print(
            f"{r['case']:28} {r['config']:40} {r['ms']:8.3f} {r['of_ceiling']:10.1%} "
            f"{r['rel_err']:9.1e}"
        )
    print(f"errors: {sum('error' in r for r in rows)} of {len(rows)} configurations")
    failed = [c for c in checks if not c["ok"]]
    print(f"ragged checks: {len(checks) - len(failed)} of {len(checks)} passed")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
