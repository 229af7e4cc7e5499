"""`python -m jaxsgl.bench_serving`: the flags, their checks, and one benchmark run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import aiohttp
from tqdm.auto import tqdm

from jaxsgl.bench_serving import plot, report, roofline, workload
from jaxsgl.bench_serving.backends import BACKENDS, TARGETS
from jaxsgl.bench_serving.datasets import DATASETS
from jaxsgl.bench_serving.metrics import summarize
from jaxsgl.bench_serving.runner import Benchmark, Load, flush_cache, warm_up
from jaxsgl.model_cost import ITEMSIZE

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxsgl.bench_serving",
        description="Online serving benchmark against a running server "
        "(`python -m jaxsgl.bench_serving plot RESULTS.json ... --out cmp.png` compares runs).",
    )
    _target_args(p.add_argument)
    _dataset_args(p.add_argument)
    _load_args(p.add_argument)
    _output_args(p.add_argument)
    _roofline_args(p.add_argument)
    return p


def _target_args(a) -> None:
    a(
        "--backend",
        choices=BACKENDS,
        default="jaxsgl",
        help="jaxsgl: native /generate; openai: /v1/completions; openai-chat: /v1/chat/completions",
    )
    a("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=30000)
    a("--model", default=None, help="the OpenAI `model` field (default: the server's first)")
    a(
        "--tokenizer",
        default=None,
        help="tokenizer folder, .gguf or embedded name (default: the server's, if local)",
    )
    a("--api-key", default=None)
    a("--temperature", type=float, default=0.0)
    a("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")


def _dataset_args(a) -> None:
    a("--dataset-name", choices=DATASETS, default="random")
    a("--dataset-path", default=None, help="ShareGPT JSON file")
    a(
        "--num-prompts",
        type=int,
        default=None,
        help="requests to send (default 1000; generated-shared-prefix: groups × prompts)",
    )
    a("--random-input-len", type=int, default=1024)
    a("--random-output-len", type=int, default=1024)
    a(
        "--random-range-ratio",
        type=float,
        default=1.0,
        help="lengths are uniform in [ratio × len, len]",
    )
    a("--gsp-num-groups", type=int, default=64)
    a("--gsp-prompts-per-group", type=int, default=16)
    a("--gsp-system-prompt-len", type=int, default=2048)
    a("--gsp-question-len", type=int, default=128)
    a("--gsp-output-len", type=int, default=256)
    a("--mt-num-sessions", type=int, default=64)
    a("--mt-turns", type=int, default=5)
    a("--mt-turn-len", type=int, default=512, help="tokens in each new user message")
    a("--mt-output-len", type=int, default=256)
    a("--sharegpt-output-len", type=int, default=None, help="override the answers' lengths")
    a(
        "--sharegpt-context-len",
        type=int,
        default=None,
        help="skip longer exchanges (default: the server's context length)",
    )


def _load_args(a) -> None:
    a("--duration", type=float, default=None, help="send requests for this many seconds")
    a("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    a("--max-concurrency", type=int, default=None)
    a("--warmup-requests", type=int, default=1)
    a("--seed", type=int, default=1)
    a("--flush-cache", action="store_true", help="POST /flush_cache before the run")


def _output_args(a) -> None:
    a(
        "--num-devices",
        type=int,
        default=None,
        help="devices serving (default: tp_size × dp_size from /server_info, else 1)",
    )
    a("--baseline", default=None, help="a results file to compare GPU-seconds per request to")
    a("--output-file", default=None, help="results JSON (summary and settings)")
    a(
        "--output-details",
        default=None,
        help="per-request JSONL (default: the --output-file path with .jsonl)",
    )
    a("--label", default=None, help="the run's name in plots")
    a("--disable-tqdm", action="store_true")
    a("--log-level", default="warning")


def _roofline_args(a) -> None:
    a(
        "--roofline-model",
        default=None,
        help="price the run against the workload's roofline for this model "
        "(a preset such as llama-3-8b, or an HF folder with config.json)",
    )
    a("--roofline-dtype", choices=ITEMSIZE, default="bfloat16", help="weights and KV cache")
    a("--copy-tb-s", type=float, default=None, help="copy ceiling of one device (read + write)")
    a("--matmul-tflop-s", type=float, default=None, help="bf16 matmul ceiling of one device")
    a(
        "--ceilings",
        default=None,
        help="both ceilings from a JSON file (`python -m jaxsgl.roofline --out FILE`)",
    )


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad flag (before anything is sent)."""
    if args.num_prompts is not None and args.duration is not None:
        raise ValueError("--num-prompts and --duration exclude each other")
    if args.num_prompts is not None and args.dataset_name == "multi-turn":
        raise ValueError("multi-turn runs --mt-num-sessions sessions; --num-prompts does not apply")
    if args.dataset_name == "sharegpt" and not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file)")
    positive = ["num_prompts", "mt_num_sessions", "num_devices", "sharegpt_output_len"]
    positive += [name for name in vars(args) if name.startswith(("random_", "gsp_", "mt_"))]
    positive.remove("random_range_ratio")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.random_range_ratio <= 1:
        raise ValueError(f"--random-range-ratio must be within 0..1, got {args.random_range_ratio}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.baseline is not None:
        report.baseline_gpu_s(args.baseline)
    load(args)  # the load flags' own checks
    roofline.from_flags(args)


def load(args: argparse.Namespace) -> Load:
    return Load(
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        num_sessions=workload.num_sessions(args),
        duration=args.duration,
        seed=args.seed,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run as the flags say; returns {"summary", "records", "settings"}."""
    check_args(args)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # the load's own cap is the only one
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        facts = await workload.probe(http, base_url, headers)
        tokenizer = workload.resolve_tokenizer(args, facts)
        spec = load(args)
        sessions = workload.make_sessions(args, tokenizer, facts, args.seed)
        if spec.num_sessions is not None:  # drawn before the clock starts
            sessions = list(islice(sessions, spec.num_sessions))
        model = args.model or (facts.model_ids[0] if facts.model_ids else None)
        target = TARGETS[args.backend](
            base_url,
            model=model,
            temperature=args.temperature,
            ignore_eos=not args.disable_ignore_eos,
            api_key=args.api_key,
        )
        if args.warmup_requests:
            extra = workload.make_sessions(args, tokenizer, facts, args.seed + 1)
            prompts = [s[0] for s in islice(extra, args.warmup_requests)]
            await warm_up(http, target, prompts, args.max_concurrency)
        if args.flush_cache:
            await flush_cache(http, base_url, headers)
        total = spec.num_sessions * _turns(args) if spec.num_sessions else None
        before = await workload.server_counters(http, base_url, headers)
        with tqdm(total=total, desc="requests", disable=args.disable_tqdm) as progress:
            records = await Benchmark(http, target, spec, progress).run(sessions)
        after = await workload.server_counters(http, base_url, headers)
    num_devices = args.num_devices or facts.num_devices
    baseline = report.baseline_gpu_s(args.baseline) if args.baseline else None
    settings = {k: v for k, v in vars(args).items() if not k.startswith("api_key")}
    settings.update(base_url=base_url, model=model, num_devices=num_devices)
    if before is not None and after is not None:  # what the server's steps did in the run
        for counter, key in workload.SERVER_COUNTERS.items():
            grown = after[counter] - before[counter]
            settings[key] = grown if "seconds" in counter else int(grown)
    summary = summarize(records, num_devices, baseline)
    if (priced := roofline.from_flags(args)) and summary["completed"]:
        cost, ceilings = priced
        roof = roofline.workload_roofline(
            records, cost, ceilings, args.max_concurrency, num_devices
        )
        summary.update(roof.summary(summary["duration_s"]))
        settings["roofline_ceilings"] = ceilings.to_json()
    return {"summary": summary, "records": records, "settings": settings}


def _turns(args: argparse.Namespace) -> int:
    return args.mt_turns if args.dataset_name == "multi-turn" else 1


def header(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings lines at the top of the result table."""
    rate = args.request_rate
    lines = {
        "Backend": args.backend,
        "Base URL": settings["base_url"],
        "Dataset": args.dataset_name,
        "Request rate (req/s)": "inf" if math.isinf(rate) else rate,
        "Max concurrency": args.max_concurrency or "none",
    }
    if ceilings := settings.get("roofline_ceilings"):
        lines["Roofline model"] = f"{args.roofline_model} ({args.roofline_dtype})"
        copy, matmul = ceilings["copy_tb_s"], ceilings["matmul_tflop_s"]
        lines["Roofline ceilings (per device)"] = f"{copy:.3f} TB/s, {matmul:.1f} TFLOP/s"
    if "server_step_compiles" in settings:
        n, seconds = settings["server_step_compiles"], settings["server_step_compile_s"]
        lines["Server step compiles in the run"] = f"{n} ({seconds:.1f} s)"
        n, tokens = settings["server_extend_steps"], settings["server_extend_tokens"]
        lines["Server extend steps in the run"] = (
            f"{n} ({tokens / max(n, 1):.0f} new tokens each, {settings['server_extend_s']:.1f} s)"
        )
        n, steps = settings["server_decode_launches"], settings["server_decode_steps"]
        lines["Server decode launches in the run"] = (
            f"{n} ({steps / max(n, 1):.2f} steps each, {settings['server_decode_s']:.1f} s)"
        )
    return lines


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The results JSON and the per-request JSONL, where the flags ask for them."""
    details = args.output_details
    if details is None and args.output_file:
        details = str(Path(args.output_file).with_suffix(".jsonl"))
    if details:
        report.write_records(details, result["records"])
    if args.output_file:
        report.write_results(args.output_file, result["summary"], result["settings"], details)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["plot"]:
            return plot.main(argv[1:])
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
        result = asyncio.run(run(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.table(result["summary"], header(args, result["settings"])))
    save(args, result)
    return 0
