"""Shared setup for engine tests: the real SmolLM2 behind a Generator, and its reference."""

from __future__ import annotations

import numpy as np
import torch

from jaxsgl.generator import Generator

# Mixed lengths, chat-templated and raw; a few share long prefixes.
TEXTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "List three colors:",
    "In 1969, the first humans",
    "Translate to French: I like apples.",
    "The mitochondria is the powerhouse of the cell. " * 6,
    "Q: What is 12 times 12?\nA:",
    "Once upon a time, in a land far away, there lived a",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "The three laws of robotics are",
    "Write a haiku about the ocean.",
    "Photosynthesis converts",
    "A short story: " + "The rain kept falling on the old town. " * 10,
    "Dear Sir or Madam,",
    "1, 1, 2, 3, 5, 8,",
    "The best way to learn a language is",
]

GREEDY = {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}


def prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(t, add_special_tokens=True) for t in TEXTS[:12]]
    for t in TEXTS[12:]:  # four chat-templated prompts
        ids.append(tokenizer.apply_chat_template([{"role": "user", "content": t}]))
    return ids


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate`, batched with left padding."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=max_new_tokens,
        )
    return [row[width:].tolist() for row in out]


def small_generator(**options) -> Generator:
    """A second engine on the real SmolLM2 (float32, 4096 KV tokens, no warm-up), for tests that
    compare one engine setting against the module's engine."""
    return Generator(
        dtype="float32",
        max_total_tokens=4096,
        context_length=1024,
        warmup=False,
        progress=False,
        **options,
    )


def decode_during_prefill(gen: Generator, first, second, params: dict, second_params: dict):
    """Start `first` (text or ids) streaming; once it decodes, generate `second` (whose prompt
    takes several prefill steps) to the end, then finish `first`. Returns both outputs' ids."""
    key = "input_ids" if isinstance(first, list) else "prompt"
    stream = gen.generate(**{key: first}, sampling_params=params, stream=True)
    head = next(iter(stream))  # the request is decoding now
    key = "input_ids" if isinstance(second, list) else "prompt"
    other = gen.generate(**{key: second}, sampling_params=second_params)
    ids = head["token_ids"] + [i for chunk in stream for i in chunk["token_ids"]]
    return ids, other["output_ids"]
