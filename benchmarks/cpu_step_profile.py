"""Time the jitted model step on the CPU: decode at a few batch sizes and one prefill.

Builds a model of a preset's shape with random weights (no download), a paged KV pool, and
runs the same jitted, pool-donating forward the engine runs, padded to the engine's buckets
(`fit_shape`), printing ms per step and tokens/s.

    python benchmarks/cpu_step_profile.py                       # SmolLM2-135M shape, fp32
    python benchmarks/cpu_step_profile.py --decode 64 --prefill 0 --parts
    python benchmarks/cpu_step_profile.py --vocab 512           # what the LM head costs
    python benchmarks/cpu_step_profile.py --no-attention        # what attention costs
    python benchmarks/cpu_step_profile.py --trace /tmp/trace    # per-op view in Perfetto

`--parts` also times pieces of one step jitted on their own (the LM head, one layer's paged
attention, one decoder layer). Those run from cache; inside the step the weights and the
pool stream from memory, so `--vocab` and `--no-attention` give the truer shares. XLA flags
can be tried through the environment (`XLA_FLAGS=...`); the model code sets none.

Numbers depend on the host: on a shared 2-core VM other processes come and go, so the table
shows the best and the median of `--iters` steps; compare runs made back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsgl import sharding
from jaxsgl.config import PRESETS
from jaxsgl.model import attention, llama
from jaxsgl.model.attention_backend import AttentionBackend
from jaxsgl.model.forward_batch import SeqChunk, fit_shape, make_kv_pool, pack_chunks
from jaxsgl.model.loader import _build

PAGE_SIZE = 16


def decode_chunks(num_seqs: int, context: int) -> list[SeqChunk]:
    """`num_seqs` sequences each decoding token `context` (context - 1 already in the pool),
    on disjoint pages after the scratch page."""
    pages = -(-context // PAGE_SIZE)
    return [
        SeqChunk([7], context - 1, range(1 + s * pages, 1 + (s + 1) * pages))
        for s in range(num_seqs)
    ]


def prefill_chunks(num_seqs: int, prompt_len: int) -> list[SeqChunk]:
    pages = -(-prompt_len // PAGE_SIZE)
    return [
        SeqChunk(
            [(13 * s + i) % 500 for i in range(prompt_len)],
            0,
            range(1 + s * pages, 1 + (s + 1) * pages),
        )
        for s in range(num_seqs)
    ]


def timed(fn, iters: int) -> list[float]:
    """Wall times of `iters` calls of `fn()` in ms, after a warm-up call (which compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class Bench:
    def __init__(self, cfg, dtype, num_pages: int):
        mesh = sharding.make_mesh(1)
        self.cfg, self.dtype, self.mesh = cfg, dtype, mesh
        loaded = _build(cfg, dtype, mesh, None, None, 0, False)
        self.graphdef, self.state = nnx.split(loaded.model)
        self.kv = make_kv_pool(cfg, num_pages, PAGE_SIZE, dtype, mesh)
        g = self.graphdef
        self.step = jax.jit(lambda st, kv, b: nnx.merge(g, st)(b, kv), donate_argnums=1)

    def run_step(self, chunks: list[SeqChunk], iters: int) -> list[float]:
        batch = jax.device_put(pack_chunks(chunks, PAGE_SIZE, fit_shape(chunks, PAGE_SIZE)))

        def once():
            logits, self.kv = self.step(self.state, self.kv, batch)
            return logits

        return timed(once, iters)

    def parts(self, chunks: list[SeqChunk], iters: int) -> dict[str, float]:
        """Pieces of one step, each jitted on its own (layer 0's weights and pool)."""
        cfg = self.cfg
        batch = jax.device_put(pack_chunks(chunks, PAGE_SIZE, fit_shape(chunks, PAGE_SIZE)))
        T, R = batch.tokens.shape[0], batch.logits_indices.shape[0]
        model = nnx.merge(self.graphdef, self.state)
        embed = model.embed[...]  # [V, D]
        key = jax.random.key(1)
        x_r = jax.random.normal(key, (R, cfg.hidden_size), self.dtype)  # [R, D]
        x_t = jax.random.normal(key, (T, cfg.hidden_size), self.dtype)  # [T, D]
        q = jax.random.normal(key, (T, cfg.num_heads, cfg.head_dim), self.dtype)  # [T, N, H]
        w = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers)))
        cos, sin = llama.rope_tables(cfg, batch.positions)
        lm_head = jax.jit(lambda x, e: jnp.einsum("RD,VD->RV", x, e))
        attn = jax.jit(
            lambda q, kv, b: attention.paged_attention(
                q, kv.k, kv.v, jnp.int32(0), b, scale=cfg.head_dim**-0.5
            )
        )
        layer = jax.jit(
            lambda w, x, kv, b: llama.decoder_layer(
                cfg, AttentionBackend(), w, x, cos, sin, b, kv, jnp.int32(0)
            ),
            donate_argnums=2,
        )

        def run_layer():
            x, self.kv = layer(w, x_t, self.kv, batch)
            return x

        return {
            "lm_head": min(timed(lambda: lm_head(x_r, embed), iters)),
            "attention/layer": min(timed(lambda: attn(q, self.kv, batch), iters)),
            "layer": min(timed(run_layer, iters)),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--decode", default="1,16,64", help="decode batch sizes, comma separated")
    p.add_argument("--context", type=int, default=150, help="tokens per decoding sequence")
    p.add_argument("--prefill", default="16x100", help="SEQSxTOKENS in one extend step, or 0")
    p.add_argument("--vocab", type=int, help="override the vocab size (LM head cost)")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--parts", action="store_true", help="also time LM head, attention, layer")
    p.add_argument("--no-attention", action="store_true", help="paged attention as identity")
    p.add_argument("--trace", metavar="DIR", help="write a jax.profiler trace of the runs")
    args = p.parse_args()

    cfg = PRESETS[args.preset]
    if args.vocab:
        cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    decode = [int(s) for s in args.decode.split(",") if s and s != "0"]
    runs: list[tuple[str, list[SeqChunk], int]] = [
        (f"decode S={s} ctx={args.context}", decode_chunks(s, args.context), s) for s in decode
    ]
    if args.prefill != "0":
        n, length = (int(v) for v in args.prefill.split("x"))
        runs.append((f"prefill {n}x{length}", prefill_chunks(n, length), n * length))
    num_pages = 1 + max(
        sum(-(-(c.prefix_len + len(c.tokens)) // PAGE_SIZE) for c in ch) for _, ch, _ in runs
    )

    bench = Bench(cfg, jnp.dtype(args.dtype), num_pages)
    print(
        f"{args.preset}: L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size} "
        f"{args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"pool {num_pages} pages of {PAGE_SIZE}" + (", no attention" if args.no_attention else "")
    )
    header = f"{'step':<26}{'best ms':>10}{'median':>10}{'tok/s':>10}"
    if args.parts:
        header += "".join(f"{k:>18}" for k in ("lm_head ms", "attention/layer", "layer ms"))
    print(header)
    with contextlib.ExitStack() as stack:
        if args.no_attention:
            identity = lambda q, *args, **kwargs: q  # noqa: E731
            stack.enter_context(mock.patch.object(attention, "paged_attention", identity))
        if args.trace:
            stack.enter_context(jax.profiler.trace(args.trace))
        for name, chunks, tokens in runs:
            times = bench.run_step(chunks, args.iters)
            best, median = min(times), statistics.median(times)
            line = f"{name:<26}{best:>10.1f}{median:>10.1f}{tokens / best * 1e3:>10.0f}"
            if args.parts:
                line += "".join(f"{v:>18.2f}" for v in bench.parts(chunks, args.iters).values())
            print(line, flush=True)


if __name__ == "__main__":
    main()
