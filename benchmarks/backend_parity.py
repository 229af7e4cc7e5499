"""Greedy outputs of the engine with each attention backend, compared with each other and with
a run recorded on another device (the CPU run kept in `backend_parity_cpu.json`).

A random-weight model (`benchmarks/configs/parity-gqa4`: 8 q / 2 kv heads, 4 layers, LM head
untied, since a random tied head mostly echoes the last token whatever attention computes) in
float32 with matmuls at full float32 precision, so that devices agree to rounding; prompts that
share prefixes (radix hits) and span several prefill chunks. Each run prints how many distinct
tokens its sequences hold: equal outputs mean little if they do not move.

    python benchmarks/backend_parity.py --backends native pallas --tp-sizes 1 2 \\
        --expect benchmarks/backend_parity_cpu.json

`pallas-triton` and `pallas-hopper` force the pallas backend's extend kernel (the Hopper one
takes 16-bit pools only: `--dtype bfloat16`, where rounding may part the backends' tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from jaxsgl.generator import Generator

GREEDY = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    shared = rng.integers(5, 49000, 150).tolist()
    out = [shared + rng.integers(5, 49000, int(n)).tolist() for n in (3, 40, 90)]
    out += [rng.integers(5, 49000, int(n)).tolist() for n in (1, 17, 300)]
    return out


def run(model: str, backend: str, tp: int, dtype: str) -> list[list[int]]:
    backend, _, kernel = backend.partition("-")
    if kernel:
        os.environ["JAXSGL_EXTEND_KERNEL"] = kernel
    else:
        os.environ.pop("JAXSGL_EXTEND_KERNEL", None)
    with Generator(  # one model, fresh random weights from the same seed each time
        model,
        load_format="dummy",
        dtype=dtype,
        attention_backend=backend,
        tp_size=tp,
        page_size=16,
        chunked_prefill_size=128,
        max_total_tokens=8192,
        warmup=False,
        progress=False,
    ) as gen:
        first = gen.generate(input_ids=prompts()[:1], sampling_params=GREEDY)
        rest = gen.generate(input_ids=prompts()[1:], sampling_params=GREEDY)
        assert gen.check_integrity() == {"running": 0, "waiting": 0}
        return [o["output_ids"] for o in first + rest]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model-path",
        default="benchmarks/configs/parity-gqa4",
        help="a preset or config folder, random weights",
    )
    p.add_argument(
        "--backends", nargs="+", default=["native"], help="native, pallas, pallas-triton, ..."
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--expect", default=None, help="outputs recorded elsewhere to compare with")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    device = jax.devices()[0].platform
    outputs = {}
    for b in args.backends:
        for tp in args.tp_sizes:
            t0 = time.perf_counter()
            outputs[f"{b} tp{tp}"] = run(args.model_path, b, tp, args.dtype)
            distinct = [len(set(seq)) for seq in outputs[f"{b} tp{tp}"]]
            print(
                f"{b} tp{tp}: {time.perf_counter() - t0:.1f} s, distinct tokens a sequence "
                f"{distinct}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "outputs": outputs}, f)
    reference = None
    if args.expect:
        with open(args.expect) as f:
            recorded = json.load(f)
        reference = ("recorded " + recorded["device"], next(iter(recorded["outputs"].values())))
    for b, out in outputs.items():
        others = [(f"{device} {o}", outputs[o]) for o in outputs if o != b]
        for name, ref in others + ([reference] if reference else []):
            same = sum(a == r for a, r in zip(out, ref, strict=True))
            print(f"{device} {b:18} vs {name:25}: {same}/{len(out)} identical sequences")


if __name__ == "__main__":
    main()
