"""XLA flags jaxsgl sets before JAX starts its GPU backend (a flag the user already gave wins;
a list flag gets our items added to the user's).

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


# Flags whose value is a list: the user's list and ours are joined (a user who turns off some
# other pass keeps the dot merger off too).
LIST_FLAGS = {"--xla_disable_hlo_passes"}


def apply_defaults(environ=os.environ) -> None:
    """Append each default flag to XLA_FLAGS unless that flag is already set there; for a
    list flag, add the default's items to the user's list."""
    words = environ.get("XLA_FLAGS", "").split()
    given = {w.split("=", 1)[0]: i for i, w in enumerate(words)}
    for name, value in DEFAULT_FLAGS.items():
        if name not in given:
            words.append(f"{name}={value}")
        elif name in LIST_FLAGS:
            i = given[name]
            items = [x for x in words[i].split("=", 1)[1].split(",") if x]
            items += [v for v in value.split(",") if v not in items]
            words[i] = f"{name}=" + ",".join(items)
    if words:
        environ["XLA_FLAGS"] = " ".join(words)
