"""Host time of the scheduler alone on the multi-turn pattern, no model: 256 sessions whose
histories (768 to 3,072 tokens) are cached, each with its next turn (512 new tokens) waiting;
the extend steps that admit them all, timed one by one (scheduling, then caching the computed
pages).

    python benchmarks/scheduler_host.py --policy fcfs
"""

from __future__ import annotations

import argparse
import random
import time

from jaxsgl.engine.options import SCHEDULE_POLICIES, EngineOptions
from jaxsgl.engine.request import Request
from jaxsgl.engine.scheduler import Scheduler
from jaxsgl.sampling_params import SamplingParams


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="fcfs", choices=SCHEDULE_POLICIES)
    p.add_argument("--sessions", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048, help="--chunked-prefill-size")
    args = p.parse_args(argv)
    rng = random.Random(0)
    options = EngineOptions(
        page_size=16,
        max_running_requests=args.sessions,
        chunked_prefill_size=args.chunk,
        schedule_policy=args.policy,
    )
    sched = Scheduler(options, 1_200_000 // 16, 4096)
    histories = []
    for i in range(args.sessions):  # each history computed once and cached
        tokens = [rng.randrange(128_000) for _ in range(rng.choice([768, 1536, 2304, 3072]))]
        req = Request(f"h{i}", tokens, SamplingParams(max_new_tokens=1))
        sched.kv.attach_prefix(req, sched.kv.match(req, len(tokens)))
        sched.kv.reserve(req, len(tokens))
        req.kv_len = len(tokens)
        sched.kv.release(req, keep=True)
        histories.append(tokens)
    for i, history in enumerate(histories):
        turn = history + [rng.randrange(128_000) for _ in range(512)]
        sched.add(Request(f"t{i}", turn, SamplingParams(max_new_tokens=256), arrival_time=i))
    schedule_s, cache_s = [], []
    while sched.waiting:
        t0 = time.perf_counter()
        batch = sched.schedule(now=1e9)
        t1 = time.perf_counter()
        for req, chunk in zip(batch.reqs, batch.chunks, strict=True):
            req.kv_len += len(chunk.tokens)
            if req.kv_len == req.num_tokens:
                req.output_ids.append(0)  # its first token: the request decodes from now on
            sched.kv.cache_computed(req)
        schedule_s.append(t1 - t0)
        cache_s.append(time.perf_counter() - t1)
    sched.check_integrity()
    n = len(schedule_s)
    print(
        f"{args.policy}: {n} extend steps; schedule {1e3 * sum(schedule_s) / n:.2f} ms a step "
        f"(first, {args.sessions} waiting: {1e3 * schedule_s[0]:.2f} ms), caching "
        f"{1e3 * sum(cache_s) / n:.2f} ms a step"
    )


if __name__ == "__main__":
    main()
