"""Offline throughput on the CPU: jaxsgl's Generator against transformers' `generate`.

Both get the same prompts (the embedded SmolLM2, float32, greedy, every request producing
exactly `--output-len` tokens). transformers runs them as padded static batches of
`--hf-batch-size`; the Generator gets them all at once and batches continuously.

    python benchmarks/offline_throughput.py --num-prompts 64 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

SENTENCE = (
    "the model serves requests from many users while the cache keeps shared prefixes warm and "
    "the scheduler batches decode steps so that the accelerator stays busy all day long"
)
WORDS = SENTENCE.split(" ")


def make_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        text = " ".join(rng.choice(WORDS, size=length))
        prompts.append(tokenizer.encode(text, add_special_tokens=True)[:length])
    return prompts


def run_jaxsgl(prompts, output_len: int, args) -> dict:
    from jaxsgl.generator import Generator

    t0 = time.perf_counter()
    gen = Generator(
        dtype="float32",
        max_running_requests=len(prompts),
        max_total_tokens=args.max_total_tokens,
        context_length=1024,
        chunked_prefill_size=args.chunked_prefill_size,
    )
    startup = time.perf_counter() - t0
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    gen.generate(input_ids=prompts[:2], sampling_params={**params, "max_new_tokens": 4})
    t0 = time.perf_counter()
    outs = gen.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - t0
    gen.check_integrity()
    gen.shutdown()
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {
        "seconds": elapsed,
        "output_tokens": tokens,
        "startup_seconds": startup,
        "outputs": [o["output_ids"] for o in outs],
    }


def run_transformers(prompts, output_len: int, batch_size: int, model_path) -> dict:
    import torch
    import transformers
    from tqdm.auto import tqdm

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc="transformers batches"):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
            )
        outputs += [row[width:].tolist() for row in out]
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "output_tokens": sum(len(o) for o in outputs), "outputs": outputs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len-min", type=int, default=32)
    p.add_argument("--input-len-max", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--chunked-prefill-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args()

    from jaxsgl.model.loader import resolve_model_path
    from jaxsgl.tokenizer import load_tokenizer

    path = resolve_model_path(None)
    prompts = make_prompts(
        load_tokenizer(path), args.num_prompts, args.input_len_min, args.input_len_max, args.seed
    )
    ours = run_jaxsgl(prompts, args.output_len, args)
    ref = run_transformers(prompts, args.output_len, args.hf_batch_size, path)
    same = sum(a == b for a, b in zip(ours["outputs"], ref["outputs"], strict=True))
    rows = [("jaxsgl Generator", ours), ("transformers generate", ref)]
    print(
        f"\n{args.num_prompts} prompts, {args.input_len_min}-{args.input_len_max} input "
        f"tokens, {args.output_len} output tokens, {platform.processor() or platform.machine()}"
    )
    print(f"{'engine':<24}{'seconds':>10}{'output tok/s':>16}")
    for name, r in rows:
        print(f"{name:<24}{r['seconds']:>10.2f}{r['output_tokens'] / r['seconds']:>16.1f}")
    ratio = (ours["output_tokens"] / ours["seconds"]) / (ref["output_tokens"] / ref["seconds"])
    print(
        f"throughput ratio jaxsgl / transformers: {ratio:.2f}x; identical greedy outputs: "
        f"{same}/{len(prompts)}; jaxsgl startup (load + compile): "
        f"{ours['startup_seconds']:.1f} s"
    )
    if args.output:
        summary = {k: {kk: v for kk, v in r.items() if kk != "outputs"} for k, r in rows}
        summary.update(ratio=ratio, identical=same, args=vars(args))
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
