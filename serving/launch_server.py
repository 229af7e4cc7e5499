"""`python -m jaxsgl.launch_server`: SGLang's server flags, the engine, the HTTP server.

    python -m jaxsgl.launch_server --model-path M --host 0.0.0.0 --port 30000 \\
        --tensor-parallel-size 4 --log-level warning
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aiohttp import web

from jaxsgl.distributed import init_distributed, shutdown_distributed
from jaxsgl.engine.options import (
    GRAMMAR_BACKENDS,
    KV_CACHE_DTYPES,
    LOAD_BALANCE_METHODS,
    SCHEDULE_POLICIES,
    EngineOptions,
)
from jaxsgl.model.loader import DEFAULT_MODEL, DTYPES, LOAD_FORMATS

logger = logging.getLogger("jaxsgl.server")


def build_parser() -> argparse.ArgumentParser:
    d = EngineOptions()
    p = argparse.ArgumentParser(prog="jaxsgl.launch_server", description=__doc__.split("\n")[0])
    a = p.add_argument
    a(
        "--model-path",
        default=None,
        help=f"HF folder, .gguf file or short name (default: the embedded {DEFAULT_MODEL})",
    )
    a(
        "--tokenizer-path",
        default=None,
        help="HF folder or .gguf whose tokenizer to use (default: the model's own)",
    )
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=30000)
    a("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=d.tp_size)
    a(
        "--dp-size",
        "--data-parallel-size",
        dest="dp_size",
        type=int,
        default=d.dp_size,
        help="engine replicas, each on its own --tp-size devices, behind one dispatcher",
    )
    a(
        "--load-balance-method",
        default=d.load_balance_method,
        choices=list(LOAD_BALANCE_METHODS),
        help="which replica gets a request (with --dp-size > 1)",
    )
    a("--dtype", default="auto", choices=["auto", *DTYPES])
    a("--load-format", default="auto", choices=LOAD_FORMATS)
    a("--context-length", type=int, default=None)
    a("--mem-fraction-static", type=float, default=d.mem_fraction_static)
    a("--max-running-requests", type=int, default=d.max_running_requests)
    a("--max-total-tokens", type=int, default=None)
    a(
        "--kv-cache-dtype",
        default=d.kv_cache_dtype,
        choices=KV_CACHE_DTYPES,
        help="the KV cache's element type: the model's (auto) or 8-bit floats, stored "
        "unscaled (twice the tokens in the same memory, half the reads of a decode step)",
    )
    a(
        "--chunked-prefill-size",
        type=int,
        default=d.chunked_prefill_size,
        help="most new tokens an extend step takes (-1: no chunking); default by the device: "
        "2048 on CPUs and GPUs under 32 GiB, 4096 under 64 GiB, 8192 above (16384 at TP 4 "
        "and more)",
    )
    a("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    a("--schedule-policy", default=d.schedule_policy, choices=SCHEDULE_POLICIES)
    a("--schedule-conservativeness", type=float, default=d.schedule_conservativeness)
    a(
        "--schedule-constraint",
        dest="schedule_constraint_ms",
        type=_milliseconds,
        default=0.0,
        help="batching window before a prefill, e.g. 5ms or 5",
    )
    a("--disable-radix-cache", action="store_true")
    a("--page-size", type=int, default=d.page_size)
    a(
        "--attention-backend",
        default=None,
        choices=["native", "pallas"],
        help="paged attention implementation (default: pallas on GPUs, native elsewhere)",
    )
    a("--random-seed", type=int, default=d.random_seed)
    a(
        "--disable-jump-forward",
        action="store_true",
        help="sample every token of constrained output, even where the grammar forces it",
    )
    a(
        "--disable-overlap-schedule",
        action="store_true",
        help="wait for each decode step before preparing the next",
    )
    a("--nnodes", type=int, default=d.nnodes, help="hosts one mesh spans (jax.distributed)")
    a("--node-rank", type=int, default=d.node_rank, help="this host's rank; 0 serves HTTP")
    a("--dist-init-addr", default=None, help="host:port of rank 0 (its port + 1 is used too)")
    a(
        "--num-continuous-decode-steps",
        type=int,
        default=d.num_continuous_decode_steps,
        help="decode steps run in one launch while the batch is stable (fewer host round trips; "
        "streams then get tokens in bursts)",
    )
    a(
        "--enable-mixed-chunk",
        action="store_true",
        help="run the running requests' decode tokens in each prefill step, so that they do "
        "not wait while prompts are computed (for the pallas attention backend)",
    )
    a(
        "--grammar-backend",
        default=d.grammar_backend,
        choices=list(GRAMMAR_BACKENDS),
        help="constrained decoding backend; none refuses regex, json_schema and ebnf requests",
    )
    a(
        "--namespace-max-running",
        action="append",
        default=[],
        metavar="NAME=N",
        help="at most N running requests of cache namespace NAME (repeatable)",
    )
    a(
        "--warmup-prompts",
        default=None,
        metavar="FILE",
        help='JSON list of prompts (or {"text", "namespace"}) to cache and pin at start',
    )
    a("--api-key", default=None)
    a("--served-model-name", default=None)
    a("--chat-template", default=None, help="a Jinja chat template or a file holding one")
    a("--skip-server-warmup", action="store_true", help="do not compile step shapes at start")
    a(
        "--enable-metrics",
        action="store_true",
        help="accepted for SGLang compatibility: /metrics is always served",
    )
    a(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long running requests may finish before they are aborted",
    )
    a("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return p


def _milliseconds(text: str) -> float:
    value = text.strip().lower().removesuffix("ms")
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration in milliseconds: {text!r}") from None
    if ms < 0:
        raise argparse.ArgumentTypeError(f"negative duration: {text!r}")
    return ms


def _namespace_limits(items: list[str]) -> tuple[tuple[str, int], ...]:
    limits = []
    for item in items:
        name, sep, n = item.rpartition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--namespace-max-running takes NAME=N, got {item!r}")
        limits.append((name, int(n)))
    return tuple(limits)


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    template = args.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text()
    return EngineOptions(
        model_path=args.model_path,
        tokenizer_path=args.tokenizer_path,
        load_format=args.load_format,
        dtype=args.dtype,
        tp_size=args.tp_size,
        dp_size=args.dp_size,
        load_balance_method=args.load_balance_method,
        context_length=args.context_length,
        mem_fraction_static=args.mem_fraction_static,
        max_running_requests=args.max_running_requests,
        max_total_tokens=args.max_total_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        chunked_prefill_size=args.chunked_prefill_size,
        max_prefill_tokens=args.max_prefill_tokens,
        schedule_policy=args.schedule_policy,
        schedule_conservativeness=args.schedule_conservativeness,
        schedule_constraint_ms=args.schedule_constraint_ms,
        disable_radix_cache=args.disable_radix_cache,
        page_size=args.page_size,
        attention_backend=args.attention_backend,
        disable_overlap_schedule=args.disable_overlap_schedule,
        disable_jump_forward=args.disable_jump_forward,
        grammar_backend=args.grammar_backend,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr,
        num_continuous_decode_steps=args.num_continuous_decode_steps,
        enable_mixed_chunk=args.enable_mixed_chunk,
        random_seed=args.random_seed,
        served_model_name=args.served_model_name,
        chat_template=template,
        warmup=not args.skip_server_warmup,
        log_level=args.log_level,
        namespace_max_running=_namespace_limits(args.namespace_max_running),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("jax", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        options = options_from_args(args)
        init_distributed(options.nnodes, options.node_rank, options.dist_init_addr)
        if options.node_rank > 0:  # another host of the mesh: no server, follow rank 0
            from jaxsgl.engine.follower import run_follower

            run_follower(options)
            shutdown_distributed(options.nnodes)
            return 0
        from jaxsgl.generator import Generator
        from serving.app import create_app
        from serving.cache_api import load_warmup_prompts, warm_up

        prompts = load_warmup_prompts(args.warmup_prompts) if args.warmup_prompts else []
        generator = Generator(**_as_kwargs(options), progress=True)
        warm_up(generator, prompts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = options.served_model_name or _default_name(options)
    app = create_app(
        generator, model_name=name, api_key=args.api_key, drain_seconds=args.drain_seconds
    )
    logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=None,
            handler_cancellation=True,
            access_log=None,
        )
    finally:
        generator.shutdown()
        shutdown_distributed(options.nnodes)
    return 0


def _as_kwargs(options: EngineOptions) -> dict:
    import dataclasses

    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _default_name(options: EngineOptions) -> str:
    if options.model_path is None:
        return DEFAULT_MODEL
    return Path(options.model_path).name


if __name__ == "__main__":
    sys.exit(main())
