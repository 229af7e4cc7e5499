"""The workload roofline recomputed token by token with numpy, from raw JSONL-style records:
the reference the closed forms in `jaxsgl.bench_serving.roofline` are checked against."""

import math

import numpy as np

from jaxsgl.model_cost import ModelCost


def reference_roofline(
    records: list[dict],
    cost: ModelCost,
    copy_bytes_per_s: float,
    matmul_flops_per_s: float,
    cap: int | None,
    devices: int,
) -> tuple[float, int]:
    """(roofline seconds, decode steps) of the successful records."""
    ok = [r for r in records if r["success"]]
    W, M, Mh = cost.step_weight_bytes, cost.matmul_params, cost.head_params
    kv, A = cost.kv_bytes_per_token, cost.attn_flops_per_key
    prefill_bytes, prefill_flops, decode_keys, fed = float(W), 0.0, 0.0, []
    for r in ok:
        p, c, o = (
            r["prompt_tokens"],
            min(r["cached_tokens"], r["prompt_tokens"]),
            r["output_tokens"],
        )
        computed = np.arange(c, p)  # positions of the prompt tokens the extend computes
        prefill_flops += 2 * (M - Mh) * computed.size + A * (computed + 1).sum()
        prefill_flops += 2 * Mh * (o > 0)  # the first output token's logits row
        prefill_bytes += kv * p
        decoded = np.arange(p, p + o - 1)  # positions of the tokens fed back
        decode_keys += (decoded + 1).sum()
        fed.append(decoded.size)
    steps = max(math.ceil(sum(fed) / (cap or len(ok))), max(fed))
    decode_bytes = steps * W + kv * decode_keys
    decode_flops = 2 * M * sum(fed) + A * decode_keys
    copy, matmul = copy_bytes_per_s * devices, matmul_flops_per_s * devices
    seconds = max(prefill_bytes / copy, prefill_flops / matmul)
    seconds += max(decode_bytes / copy, decode_flops / matmul)
    return seconds, steps
