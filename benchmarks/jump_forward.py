"""Constrained-output throughput with jump-forward and without it, in one process.

Requests ask for JSON records under a schema with long fixed keys (what jump-forward skips:
the keys, quotes and separators the grammar forces), greedy, on the embedded SmolLM2 (or any
model with a tokenizer). Both runs must give the same outputs; the figure is output tokens per
second of wall time over a second pass from an empty cache (the first, the same work, compiles
the step shapes), and decode steps.

    python benchmarks/jump_forward.py --num-prompts 32
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name_of_the_city_being_described": {"type": "string", "maxLength": 24},
        "country_in_which_the_city_lies": {"type": "string", "maxLength": 24},
        "is_the_city_a_national_capital": {"type": "boolean"},
        "approximate_population_in_millions": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": [
        "name_of_the_city_being_described",
        "country_in_which_the_city_lies",
        "is_the_city_a_national_capital",
        "approximate_population_in_millions",
    ],
    "additionalProperties": False,
}
CITIES = ["Paris", "Lima", "Osaka", "Cairo", "Oslo", "Quito", "Perth", "Lagos"]


def run(args, jump_forward: bool) -> dict:
    from jaxsgl.generator import Generator

    with Generator(
        args.model_path,
        load_format=args.load_format,
        tokenizer_path=args.tokenizer_path,
        dtype=args.dtype,
        disable_jump_forward=not jump_forward,
        max_running_requests=args.num_prompts,
        warmup=False,
        progress=False,
    ) as gen:
        prompts = [
            gen.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Describe {CITIES[i % len(CITIES)]} as JSON."}]
            )
            for i in range(args.num_prompts)
        ]
        params = {"json_schema": json.dumps(SCHEMA), "temperature": 0.0, "max_new_tokens": 200}
        # Both passes start from an empty cache, so the timed one takes the step shapes the
        # first compiled (a cached prompt would make its extends new shapes).
        gen.generate(input_ids=prompts, sampling_params=params)
        if not gen.flush_cache():
            raise RuntimeError("the cache could not be flushed between the passes")
        steps0 = gen.engine.stats.num_decode_steps
        t0 = time.perf_counter()
        outs = gen.generate(input_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - t0
        tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
        return dict(
            jump_forward=jump_forward,
            seconds=seconds,
            output_tokens=tokens,
            tok_s=tokens / seconds,
            decode_steps=gen.engine.stats.num_decode_steps - steps0,
            forced=sum(o["meta_info"]["jump_forward_tokens"] for o in outs),
            outputs=[o["output_ids"] for o in outs],
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument(
        "--tokenizer-path", default=None, help="for dummy weights: a tokenizer to use with them"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=32)
    args = p.parse_args(argv)
    on, off = run(args, True), run(args, False)
    same = sum(a == b for a, b in zip(on["outputs"], off["outputs"], strict=True))
    for r in (on, off):
        print(
            f"jump-forward {'on ' if r['jump_forward'] else 'off'}: {r['tok_s']:.1f} output tok/s "
            f"({r['output_tokens']} tokens in {r['seconds']:.1f} s), {r['decode_steps']} decode "
            f"steps, {r['forced']} forced tokens"
        )
    ratio = on["tok_s"] / off["tok_s"]
    print(f"speedup {ratio:.2f}x; identical outputs {same}/{len(on['outputs'])}")


if __name__ == "__main__":
    main()
