"""XLA flags jaxsgl sets before JAX starts its GPU backend (a flag the user already gave wins).

`--xla_gpu_enable_triton_gemm=false`: with layers under `lax.scan`, XLA's Triton GEMM fusions
copy each layer's slice of the stacked weights before multiplying; cuBLAS reads it in place.
Measured on an H100 (Llama-3-8B bf16, batch 1, ctx 1024): decode step 19.5 ms with Triton GEMMs,
10.1 ms without (`benchmarks/RESULTS.md`).

`--xla_disable_hlo_passes=dot-merger`: XLA merges dots that share an operand (q/k/v, gate/up)
into one dot over the concatenation of their weights. Under `lax.scan` the weights are a fresh
slice each layer, so the concatenation is a copy of those weights every layer and step. With
the weights split over two cards the pieces fall under the merger's size limit: measured on two
H200s (Llama-3-8B bf16, batch 128, ctx 1024, TP 2), the step took 9.37 ms with the merger and
5.52 ms without.
"""

from __future__ import annotations

import os

DEFAULT_FLAGS = {
    "--xla_gpu_enable_triton_gemm": "false",
    "--xla_disable_hlo_passes": "dot-merger",
}


def apply_defaults(environ=os.environ) -> None:
    """Append each default flag to XLA_FLAGS unless that flag is already set there."""
    flags = environ.get("XLA_FLAGS", "")
    given = {f.split("=", 1)[0] for f in flags.split()}
    extra = [f"{name}={value}" for name, value in DEFAULT_FLAGS.items() if name not in given]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
