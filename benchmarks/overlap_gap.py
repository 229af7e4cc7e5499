"""Decode step time through the whole engine (scheduler, postprocess, streaming hand-off),
with the overlap schedule and without it, next to the device's own time for the same step.

A static batch of `--batch-size` requests of `--input-len` random tokens each decodes
`--output-len` tokens (ignore_eos); the step time is the median inter-token latency. The gap
between the engine's step and the device's is the host work the schedule fails to hide.

    python benchmarks/overlap_gap.py --model-path llama-3-8b --batch-size 1 64 --input-len 1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import numpy as np

from jaxsgl.generator import Generator


def step_ms(gen: Generator, bs: int, input_len: int, output_len: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    vocab = gen.engine.loaded.config.vocab_size
    prompts = rng.integers(10, vocab - 10, (bs, input_len)).tolist()
    params = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}
    gen.engine.stats.itl.clear()
    gen.generate(input_ids=prompts, sampling_params=params)
    return statistics.median(gen.engine.stats.itl) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default="llama-3-8b")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--tp-size", type=int, nargs="+", default=[1])
    p.add_argument("--overlap", choices=["both", "on", "off"], default="both")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.overlap]
    for tp, overlap in itertools.product(args.tp_size, modes):
        with Generator(
            args.model_path,
            load_format="dummy",
            dtype="bfloat16",
            disable_overlap_schedule=not overlap,
            tp_size=tp,
            max_running_requests=max(args.batch_size),
            max_total_tokens=max(args.batch_size) * (args.input_len + args.output_len + 64),
            warmup=False,
            progress=False,
        ) as gen:
            for bs in args.batch_size:
                step_ms(gen, bs, args.input_len, 4, seed=0)  # compiles this batch's shapes
                ms = step_ms(gen, bs, args.input_len, args.output_len, seed=1)
                rows.append(dict(tp_size=tp, overlap=overlap, batch_size=bs, step_ms=ms))
                print(
                    f"tp {tp} overlap {overlap!s:5} bs {bs:4d}: median step {ms:.2f} ms "
                    f"({bs / ms * 1e3:.0f} tok/s)",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
