"""Decode step time through the whole engine (scheduler, postprocess, streaming hand-off),
with the overlap schedule on or off and one or several decode steps per launch, against the
step's memory roofline measured in the same run.

A static batch of `--batch-size` requests of `--input-len` random tokens each decodes
`--output-len` tokens (ignore_eos). The engine's step is the wall time of that batch minus the
wall time of the same batch decoding a quarter as many tokens, over the extra tokens: prefill
and start-up cancel, and it holds whether tokens arrive one by one or in bursts (several
steps a launch). `x floor` is that step over the roofline of a decode step at the batch's
middle context (weights + KV read over the copy bandwidth of every device).

    python benchmarks/overlap_gap.py --model-path llama-3-8b --batch-size 1 128 \\
        --input-len 1024 --output-len 64 --decode-steps 1 8 --tp-size 1 2

`--profile DIR` then traces one more run of the last configuration into DIR (Perfetto JSON
too); `python benchmarks/trace_summary.py DIR --after ragged_extend` splits its decode steps'
device time by kernel kind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import numpy as np

from jaxsgl.generator import Generator
from jaxsgl.model_cost import ModelCost
from jaxsgl.roofline import measure_ceilings


def wall_s(gen: Generator, prompts: list[list[int]], output_len: int) -> float:
    params = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}
    t0 = time.perf_counter()
    gen.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t0


def step_ms(
    gen: Generator, bs: int, input_len: int, output_len: int, profile: str | None = None
) -> float:
    rng = np.random.default_rng(bs)
    vocab = gen.engine.loaded.config.vocab_size
    prompts = rng.integers(10, vocab - 10, (bs, input_len)).tolist()
    short = max(1, output_len // 4)
    wall_s(gen, prompts, output_len)  # compiles every shape the two runs below take
    gen.flush_cache()  # each run prefills its prompts again: the same work in both
    full = wall_s(gen, prompts, output_len)
    gen.flush_cache()
    part = wall_s(gen, prompts, short)
    gen.flush_cache()
    if profile:
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            wall_s(gen, prompts, short)
        gen.flush_cache()
    return (full - part) / (output_len - short) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="llama-3-8b")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--tp-size", type=int, nargs="+", default=[1])
    p.add_argument("--overlap", choices=["both", "on", "off"], default="both")
    p.add_argument("--decode-steps", type=int, nargs="+", default=[1], help="steps per launch")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", metavar="DIR", default=None, help="trace the last run into DIR")
    args = p.parse_args(argv)
    ceil = measure_ceilings()
    rows = []
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.overlap]
    runs = list(itertools.product(args.tp_size, modes, args.decode_steps))
    for tp, overlap, k in runs:
        with Generator(
            args.model_path,
            load_format="dummy",
            dtype="bfloat16",
            disable_overlap_schedule=not overlap,
            num_continuous_decode_steps=k,
            tp_size=tp,
            max_running_requests=max(args.batch_size),
            max_total_tokens=max(args.batch_size) * (args.input_len + args.output_len + 64),
            warmup=False,
            progress=False,
        ) as gen:
            cost = ModelCost.from_config(gen.engine.loaded.config, "bfloat16")
            for bs in args.batch_size:
                last = (tp, overlap, k) == runs[-1] and bs == args.batch_size[-1]
                trace = args.profile if last else None
                ms = step_ms(gen, bs, args.input_len, args.output_len, trace)
                context = args.input_len + args.output_len // 2
                floor = ceil.times(tp).floor(*cost.decode(bs, context))
                row = dict(
                    tp_size=tp, overlap=overlap, decode_steps=k, batch_size=bs, step_ms=ms,
                    tok_s=bs / ms * 1e3, floor_ms=floor * 1e3, x_floor=ms / 1e3 / floor,
                    device=ceil.device,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"tp {tp} overlap {overlap!s:5} steps/launch {k} bs {bs:4d}: step {ms:.2f} ms "
                    f"({row['tok_s']:.0f} tok/s, {row['x_floor']:.2f}x floor {floor * 1e3:.2f} ms)",
                    flush=True,
                )
    print(
        f"{ceil.device}: copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceil.matmul_flops_per_s / 1e12:.0f} TFLOP/s"
    )
    print(f"{'tp':>2} {'overlap':>7} {'k':>2} {'bs':>4} {'step ms':>8} {'tok/s':>7} {'x floor':>7}")
    for r in rows:
        print(
            f"{r['tp_size']:2d} {r['overlap']!s:>7} {r['decode_steps']:2d} {r['batch_size']:4d} "
            f"{r['step_ms']:8.2f} {r['tok_s']:7.0f} {r['x_floor']:7.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
