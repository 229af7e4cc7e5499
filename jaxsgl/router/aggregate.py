"""One deployment's `/server_info` from its workers' own: options of the first worker, counters
added up over all of them, so that a client (bench_serving) sees the router as one server of
`dp_size` replicas."""

from __future__ import annotations

from collections.abc import Sequence

# Counters that are not `*_total` but still add up over workers (the engine's gauges).
GAUGES = ("num_running_reqs", "num_queue_reqs", "num_used_tokens", "num_cached_pages")


def merge_server_info(infos: Sequence[dict]) -> dict:
    """The workers' `/server_info` bodies as one: `dp_size` the sum of theirs, every `*_total`
    counter and gauge summed, the hit rate over the sums, token usage their mean, `integrity`
    one entry a worker."""
    if not infos:
        raise ValueError("no server_info to merge")
    out = dict(infos[0])
    for key, value in infos[0].items():
        summed = key.endswith("_total") or key in GAUGES
        if summed and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = sum(info.get(key, 0) for info in infos)
    out["dp_size"] = sum(info.get("dp_size", 1) for info in infos)
    prompt = out.get("prompt_tokens_total", 0)
    out["cache_hit_rate"] = out.get("cached_tokens_total", 0) / prompt if prompt else 0.0
    usage = [info["token_usage"] for info in infos if "token_usage" in info]
    if usage:
        out["token_usage"] = sum(usage) / len(usage)
    out["integrity"] = [info.get("integrity") for info in infos]
    out["num_workers"] = len(infos)
    return out
