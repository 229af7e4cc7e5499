"""What the all-reduces of a tensor-parallel decode step cost, apart from everything else.

A Llama decode step at tensor parallel T all-reduces one `[batch, hidden]` activation after
attention and one after the MLP in every layer: 64 all-reduces a step for Llama-3-8B, each
waiting on the one before. This times that chain alone: 32 layers under `lax.scan`, each
all-reducing twice inside `shard_map` with a multiply between (so nothing folds), one program a
(T, batch). One all-reduce's time is the program's time less the same program without the
all-reduces, over 64; `step ms` is what the 64 of them add to every decode step.

    python benchmarks/allreduce_bench.py --tp-size 2 4 --batch-size 1 128 256 --out ar.json

XLA's and NCCL's ways of all-reducing are chosen by their flags and environment, read at start:
run the script once for each (e.g. `NCCL_PROTO=LL`, or
`XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true`) with `--label`.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsgl.roofline import time_call


def chain(mesh: Mesh, layers: int, reduce: bool):
    """jit of `x -> x` through `layers` layers of two (all-reduce after multiply) each."""

    tp = mesh.shape["tensor"]

    def body(x, scales):
        for s in (scales[0], scales[1]):
            x = jax.lax.psum(x * s, "tensor") if reduce else x * (s * tp)
        return x, None

    def local(x, scales):
        return jax.lax.scan(body, x, scales)[0]

    spec = PartitionSpec()
    f = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    return jax.jit(f)


def checked_ms(fn, *args, repeats: int) -> float:
    """Median ms of one call of `fn`, waited for each time, after checking its output."""
    out = jax.block_until_ready(fn(*args))
    # Every layer scales by 1/tp and all-reduces tp copies: a wrong sum leaves the ones.
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-2)
    return time_call(fn, *args, repeats=repeats, calls=1) * 1e3


def measure(tp: int, batch: int, hidden: int, layers: int, repeats: int) -> dict:
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tensor",))
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.device_put(jnp.ones((batch, hidden), jnp.bfloat16), replicated)
    # Each all-reduce sums `tp` equal copies; scaling by 1/tp first keeps the values at one.
    scales = jax.device_put(jnp.full((layers, 2), 1.0 / tp, jnp.bfloat16), replicated)
    with_ar = checked_ms(chain(mesh, layers, True), x, scales, repeats=repeats)
    without = checked_ms(chain(mesh, layers, False), x, scales, repeats=repeats)
    count = 2 * layers
    return {
        "tp": tp,
        "batch": batch,
        "bytes": batch * hidden * 2,
        "program_ms": with_ar,
        "without_ms": without,
        "all_reduce_us": (with_ar - without) / count * 1e3,
        "step_ms": with_ar - without,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp-size", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 128, 256])
    p.add_argument("--hidden", type=int, default=4096, help="Llama-3-8B's hidden size")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--label", default="default", help="names this run's flags in the output")
    p.add_argument("--out", default=None, help="append one JSON row per case")
    args = p.parse_args(argv)
    rows = []
    for tp in args.tp_size:
        if tp > jax.device_count():
            raise ValueError(f"--tp-size {tp} needs {tp} devices; {jax.device_count()} visible")
        for batch in args.batch_size:
            row = measure(tp, batch, args.hidden, args.layers, args.repeats)
            row["label"] = args.label
            row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
            row["nccl_proto"] = os.environ.get("NCCL_PROTO", "")
            rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(
        f"{'label':<12} {'tp':>3} {'batch':>6} {'KiB':>6} {'program ms':>11} "
        f"{'w/o ms':>8} {'AR µs':>8} {'step ms':>8}"
    )
    for r in rows:
        print(
            f"{r['label']:<12} {r['tp']:>3} {r['batch']:>6} {r['bytes'] / 1024:>6.0f} "
            f"{r['program_ms']:>11.3f} {r['without_ms']:>8.3f} {r['all_reduce_us']:>8.1f} "
            f"{r['step_ms']:>8.2f}"
        )


if __name__ == "__main__":
    main()
