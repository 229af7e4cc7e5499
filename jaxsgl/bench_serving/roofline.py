"""The workload's roofline: the least time an engine of our design could serve the measured
requests on the given ceilings, and the run's fraction of it.

Each engine step is either an extend (prompt tokens after the cached prefix) or a decode (one
token for each running sequence), so the floor is the extend work's floor plus the decode
work's floor, each the slower of its memory term (bytes / copy ceiling) and its compute term
(FLOPs / matmul ceiling). Over the successful records, with p prompt tokens of which c were
cached, o output tokens, and from `ModelCost`: W the weight bytes a step reads, M the matmul
parameters, M_h the LM head's share of them, kv the KV bytes per token, A the attention FLOPs
per (query, key) pair:

    prefill FLOPs = 2·(M − M_h)·Σ(p − c)          computed prompt tokens through the layers
                  + 2·M_h·R                       one logits row per request (R requests)
                  + A·Σ (p(p+1) − c(c+1)) / 2     prompt token i attends to keys 0..i
    prefill bytes = W + kv·Σp                     weights once; each prompt token's K/V
                                                  written (computed) or read (cached) once
    decode: the first output token comes from the extend and the last is never fed back, so
    d = o − 1 tokens per request go through decode steps, the j-th (1..d) attending p + j keys:
    steps         = max(ceil(Σd / cap), max d)    cap: the max concurrency (else all at once)
    decode FLOPs  = 2·M·Σd + A·Σ(d·p + d(d+1)/2)
    decode bytes  = steps·W + kv·Σ(d·p + d(d+1)/2)

with both ceilings times the device count. The copy ceiling counts bytes read plus bytes
written, and each byte above is read or written once, so bytes / copy ceiling prices memory the
way bench_one_batch does. Since every term is a lower bound of the real work, fraction =
roofline seconds / measured duration is at most 1 for any real run, and equals measured output
tok/s over roofline output tok/s.

Worked example: W = 1000 B, M = 100, M_h = 20, kv = 10 B, A = 4; requests (p=4, c=0, o=3) and
(p=6, c=2, o=2); cap 1; copy 1000 B/s, matmul 1000 FLOP/s on one device.
    prefill FLOPs = 2·80·8 + 2·20·2 + 4·(10 + 18) = 1472  -> 1.472 s (bytes 1100 -> 1.1 s)
    decode: d = 2 and 1, keys (5 + 6) + 7 = 18, steps = max(3, 2) = 3
    decode bytes = 3·1000 + 10·18 = 3180 -> 3.18 s (FLOPs 2·100·3 + 4·18 = 672 -> 0.672 s)
    roofline 4.652 s; 5 output tokens -> 1.075 tok/s; measured in 9.304 s -> fraction 0.5.

At scale: 1000 requests of 512 in / 256 out, cap 256, Llama-3-8B in bf16, on illustrative
ceilings of 3.0 TB/s and 700 TFLOP/s: prefill 10.3 s (compute bound), 997 decode steps 12.1 s
(memory bound: 15.0 GB of weights per step plus 21.5 TB of KV reads), 22.4 s in all, 11,414
output tok/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence

from jaxsgl.bench_serving.metrics import RequestRecord
from jaxsgl.ceilings import Ceilings, read_ceilings
from jaxsgl.config import config_for
from jaxsgl.model_cost import ModelCost


@dataclasses.dataclass(frozen=True)
class Roofline:
    prefill_s: float
    decode_s: float
    decode_steps: int
    output_tokens: int

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else math.nan

    def summary(self, duration_s: float) -> dict[str, float | int]:
        """The summary fields of a run that took `duration_s` seconds."""
        return {
            "roofline_s": self.seconds,
            "roofline_prefill_s": self.prefill_s,
            "roofline_decode_s": self.decode_s,
            "roofline_decode_steps": self.decode_steps,
            "roofline_output_throughput": self.output_throughput,
            "roofline_fraction": self.seconds / duration_s,
        }


def workload_roofline(
    records: Sequence[RequestRecord],
    cost: ModelCost,
    ceilings: Ceilings,
    max_concurrency: int | None = None,
    devices: int = 1,
) -> Roofline:
    """The roofline of the successful `records` (see the module docstring for the formula)."""
    ok = [r for r in records if r.success]
    if not ok:
        raise ValueError("no successful requests to price against the roofline")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    ceil = ceilings.times(devices)
    prefill_bytes, prefill_flops = _prefill_work(ok, cost)
    steps, decode_bytes, decode_flops = _decode_work(ok, cost, max_concurrency or len(ok))
    return Roofline(
        prefill_s=ceil.floor(prefill_bytes, prefill_flops),
        decode_s=ceil.floor(decode_bytes, decode_flops),
        decode_steps=steps,
        output_tokens=sum(r.output_tokens for r in ok),
    )


def _prefill_work(ok: Sequence[RequestRecord], cost: ModelCost) -> tuple[int, int]:
    """(bytes, FLOPs) of the extends: every prompt token after its request's cached prefix."""
    computed = pairs = prompt = 0
    for r in ok:
        p, c = r.prompt_tokens, min(r.cached_tokens, r.prompt_tokens)
        computed += p - c
        pairs += (p * (p + 1) - c * (c + 1)) // 2
        prompt += p
    logits_rows = sum(1 for r in ok if r.output_tokens > 0)
    flops = 2 * (cost.matmul_params - cost.head_params) * computed
    flops += 2 * cost.head_params * logits_rows + cost.attn_flops_per_key * pairs
    return cost.step_weight_bytes + cost.kv_bytes_per_token * prompt, flops


def _decode_work(ok: Sequence[RequestRecord], cost: ModelCost, cap: int) -> tuple[int, int, int]:
    """(steps, bytes, FLOPs) of the decode steps: o − 1 tokens per request, `cap` per step."""
    fed = [max(r.output_tokens - 1, 0) for r in ok]
    keys = sum(d * r.prompt_tokens + d * (d + 1) // 2 for d, r in zip(fed, ok, strict=True))
    steps = max(-(-sum(fed) // cap), max(fed))
    num_bytes = steps * cost.step_weight_bytes + cost.kv_bytes_per_token * keys
    flops = 2 * cost.matmul_params * sum(fed) + cost.attn_flops_per_key * keys
    return steps, num_bytes, flops


def from_flags(args: argparse.Namespace) -> tuple[ModelCost, Ceilings] | None:
    """The model cost and ceilings the roofline flags name (None without --roofline-model);
    ValueError naming the flag when they are half given."""
    ceiling_flags = {"copy_tb_s": args.copy_tb_s, "matmul_tflop_s": args.matmul_tflop_s}
    given = [k for k, v in {**ceiling_flags, "ceilings": args.ceilings}.items() if v is not None]
    if args.roofline_model is None:
        if given:
            raise ValueError(f"{_flag(given[0])} needs --roofline-model")
        return None
    if args.ceilings is not None:
        if len(given) > 1:
            raise ValueError("--ceilings and --copy-tb-s/--matmul-tflop-s exclude each other")
        ceilings = read_ceilings(args.ceilings)
    elif len(given) < 2:
        raise ValueError(
            "--roofline-model needs the ceilings: --copy-tb-s and --matmul-tflop-s together, "
            "or --ceilings FILE (from `python -m jaxsgl.roofline --out FILE`)"
        )
    else:
        for name, value in ceiling_flags.items():
            if not value > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {value}")
        ceilings = Ceilings.of(args.copy_tb_s, args.matmul_tflop_s)
    cost = ModelCost.from_config(config_for(args.roofline_model), args.roofline_dtype)
    return cost, ceilings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
