"""One static batch through the model runner, no server and no scheduler: prefill latency and
decode step time for each batch size × input length × output length, each against its
roofline measured in the same run.

    python -m jaxsgl.bench_one_batch --model-path llama-3-8b --load-format dummy \\
        --batch-size 1 128 --input-len 1024 --output-len 32

The floor of a step is the larger of (weight bytes + KV bytes read and written) over the
measured copy bandwidth and (matmul + attention FLOPs) over the measured bf16 matmul rate,
both times the number of devices under tensor parallelism; `x floor` is measured time over
that floor (1.0 is the ceiling). `host ms` is the part of a decode step the device does not
account for: the wall time of a step prepared, launched and waited for, minus the time of the
same prepared step launched back to back. With `--num-continuous-decode-steps k` the table
also gives the device's time per step when k steps run in one launch (no gap between them).

`--profile` also traces three of each case's decode launches (k steps each) with JAX's profiler
into `$JAXSGL_PROFILER_DIR/<prefix>-tp<T>-bs<B>-in<I>-out<O>` (default folder
/tmp/jaxsgl_profile); `python benchmarks/trace_summary.py FOLDER` sums the device's time in it
by kernel kind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxsgl.ceilings import Ceilings, read_ceilings
from jaxsgl.engine.model_runner import ModelRunner
from jaxsgl.engine.options import KV_CACHE_DTYPES
from jaxsgl.model.forward_batch import SeqChunk
from jaxsgl.model.loader import load_model
from jaxsgl.model_cost import ModelCost
from jaxsgl.profiler import DEFAULT_DIR_ENV, TRACE, default_dir
from jaxsgl.roofline import measure_ceilings, time_call
from jaxsgl.sampler import RowState
from jaxsgl.sampling_params import SamplingParams
from jaxsgl.sharding import make_mesh

GREEDY = RowState(params=SamplingParams(temperature=0.0), seed=0)


def bench_case(
    runner,
    cost: ModelCost,
    ceil: Ceilings,
    bs: int,
    input_len: int,
    output_len: int,
    rng,
    decode_steps: int = 1,
    profile_dir: str | None = None,
) -> dict:
    G = runner.page_size
    pages_per_seq = -(-(input_len + output_len) // G)
    # Sequence s owns pages 1 + s·pages_per_seq onwards (page 0 is the scratch page).
    pages = [list(range(1 + s * pages_per_seq, 1 + (s + 1) * pages_per_seq)) for s in range(bs)]
    prompts = rng.integers(10, runner.vocab_size - 10, (bs, input_len)).tolist()
    chunks = [SeqChunk(prompts[s], 0, pages[s]) for s in range(bs)]
    rows = [GREEDY] * bs

    prefill_s = []
    for _ in range(3):  # the first compiles
        t0 = time.perf_counter()
        result = runner.run(chunks, rows, decode=False)
        prefill_s.append(time.perf_counter() - t0)
    prefill = statistics.median(prefill_s[1:])
    if profile_dir:  # one more prefill, warm, under the profiler
        TRACE.start(profile_dir + "-prefill")
        try:
            jax.block_until_ready(runner.run(chunks, rows, decode=False).tokens)
        finally:
            TRACE.stop()

    tokens = result.tokens
    step_s = []
    for i in range(output_len):
        decode = [SeqChunk([int(tokens[s])], input_len + i, pages[s]) for s in range(bs)]
        t0 = time.perf_counter()
        tokens = runner.run(decode, rows, decode=True).tokens
        step_s.append(time.perf_counter() - t0)
    step = statistics.median(step_s[1:] or step_s)
    ctx = input_len + output_len // 2
    # The same step prepared once and launched back to back: the device's share alone.
    mid = [SeqChunk([int(tokens[s])], ctx, pages[s]) for s in range(bs)]
    prepared = runner.prepare(mid, rows, True)
    device = time_call(lambda: runner.launch(prepared).out.tokens, repeats=3, calls=10)
    # Several steps in one launch (`--num-continuous-decode-steps`): no gap between steps.
    k = min(decode_steps, output_len - output_len // 2)
    prepared = runner.prepare(mid, rows, True, num_steps=k)
    device_k = time_call(lambda: runner.launch(prepared).out.tokens, repeats=3, calls=10) / k
    if profile_dir:  # the same launches, warm, under the profiler
        TRACE.start(profile_dir)
        try:
            jax.block_until_ready([runner.launch(prepared).out.tokens for _ in range(3)])
        finally:
            TRACE.stop()

    pb, pf = cost.prefill(bs, input_len)
    db, df = cost.decode(bs, ctx)
    return dict(
        batch_size=bs,
        input_len=input_len,
        output_len=output_len,
        prefill_ms=prefill * 1e3,
        prefill_tok_s=bs * input_len / prefill,
        prefill_floor_ms=ceil.floor(pb, pf) * 1e3,
        prefill_x_floor=prefill / ceil.floor(pb, pf),
        prefill_bound=ceil.bound(pb, pf),
        decode_step_ms=step * 1e3,
        decode_tok_s=bs / step,
        decode_floor_ms=ceil.floor(db, df) * 1e3,
        decode_x_floor=step / ceil.floor(db, df),
        decode_bound=ceil.bound(db, df),
        decode_device_ms=device * 1e3,
        host_ms=(step - device) * 1e3,
        decode_steps_per_launch=k,
        decode_launch_ms_per_step=device_k * 1e3,
        decode_launch_x_floor=device_k / ceil.floor(db, df),
        profile_dir=profile_dir,
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="jaxsgl.bench_one_batch", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="llama-3-8b", help="preset name or model path")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, nargs="+", default=[1024])
    p.add_argument("--output-len", type=int, nargs="+", default=[16])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", default=None, choices=["native", "pallas"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    p.add_argument(
        "--layers",
        choices=["scan", "unrolled"],
        default="scan",
        help="run the layers under lax.scan (the engine's default) or unrolled",
    )
    p.add_argument(
        "--num-continuous-decode-steps",
        type=int,
        default=1,
        help="also time this many decode steps run in one launch (per step, back to back)",
    )
    p.add_argument("--result-file", default=None, help="append one JSON line per case")
    p.add_argument(
        "--ceilings",
        default=None,
        help="one device's ceilings from a JSON file (`python -m jaxsgl.roofline --out FILE`) "
        "instead of measuring them first",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help=f"trace one prefill and three decode launches of each case (into ${DEFAULT_DIR_ENV})",
    )
    p.add_argument(
        "--profile-filename-prefix",
        default="bench_one_batch",
        help="the start of each case's trace folder name",
    )
    args = p.parse_args(argv)
    profile_root = default_dir()

    ceil = read_ceilings(args.ceilings) if args.ceilings else measure_ceilings()
    mesh = make_mesh(args.tp_size)
    loaded = load_model(args.model_path, load_format=args.load_format, dtype=args.dtype, mesh=mesh)
    cases = list(itertools.product(args.batch_size, args.input_len, args.output_len))
    G = args.page_size
    num_pages = 1 + max(bs * -(-(i + o) // G) for bs, i, o in cases)
    runner = ModelRunner(
        loaded,
        num_pages,
        G,
        loaded.config.vocab_size,
        attention_backend=args.attention_backend,
        kv_cache_dtype=args.kv_cache_dtype,
        unroll_layers=args.layers == "unrolled",
        # The server's extend programs (context-wide page tables with the Pallas kernels).
        max_context=max(i + o for _, i, o in cases),
    )
    cost = ModelCost.from_config(
        loaded.config, jnp.dtype(loaded.dtype).name, jnp.dtype(runner.kv_dtype).name
    )
    rng = np.random.default_rng(0)
    results = []
    # Weights and KV split over the mesh: its devices' bandwidth and FLOPs add up.
    mesh_ceil = ceil.times(mesh.devices.size)
    for bs, i, o in tqdm(cases, desc="bench_one_batch"):
        profile_dir = None
        if args.profile:
            name = f"{args.profile_filename_prefix}-tp{args.tp_size}-bs{bs}-in{i}-out{o}"
            profile_dir = os.path.join(profile_root, name)
        r = bench_case(
            runner, cost, mesh_ceil, bs, i, o, rng, args.num_continuous_decode_steps, profile_dir
        )
        r.update(
            model=args.model_path,
            tp_size=args.tp_size,
            attention_backend=loaded.model.attention.name,
            kv_cache_dtype=args.kv_cache_dtype,
            unroll_layers=loaded.model.unroll_layers,
            device=ceil.device,
            copy_tb_s=ceil.copy_bytes_per_s / 1e12,
            matmul_tflop_s=ceil.matmul_flops_per_s / 1e12,
        )
        results.append(r)
        tqdm.write(
            f"bs {bs} in {i} out {o}: prefill {r['prefill_ms']:.2f} ms "
            f"({r['prefill_x_floor']:.2f}x floor), decode step {r['decode_step_ms']:.2f} ms "
            f"({r['decode_x_floor']:.2f}x floor, host {r['host_ms']:.2f} ms)"
            + (f", trace in {profile_dir}" if profile_dir else "")
        )
        if args.result_file:
            with open(args.result_file, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(
        f"{ceil.device}, copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceil.matmul_flops_per_s / 1e12:.0f} TFLOP/s, {args.model_path} tp {args.tp_size}, "
        f"attention {loaded.model.attention.name}, "
        f"layers {'unrolled' if loaded.model.unroll_layers else 'scan'}"
    )
    print(
        f"{'bs':>4} {'in':>5} {'out':>4} | {'prefill ms':>10} {'tok/s':>9} {'x floor':>7} | "
        f"{'step ms':>8} {'tok/s':>8} {'x floor':>7} {'host ms':>7} | "
        f"{'k':>2} {'launch ms/step':>14} {'x floor':>7}"
    )
    for r in results:
        print(
            f"{r['batch_size']:4d} {r['input_len']:5d} {r['output_len']:4d} | "
            f"{r['prefill_ms']:10.2f} {r['prefill_tok_s']:9.0f} {r['prefill_x_floor']:7.2f} | "
            f"{r['decode_step_ms']:8.2f} {r['decode_tok_s']:8.0f} {r['decode_x_floor']:7.2f} "
            f"{r['host_ms']:7.2f} | {r['decode_steps_per_launch']:2d} "
            f"{r['decode_launch_ms_per_step']:14.2f} {r['decode_launch_x_floor']:7.2f}"
        )
    return results


if __name__ == "__main__":
    main()
