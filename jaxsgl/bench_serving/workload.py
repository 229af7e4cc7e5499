"""What a run needs to know before it starts: facts the server reports about itself, the
tokenizer, and the stream of sessions the chosen dataset makes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from jaxsgl.bench_serving import datasets as ds
from jaxsgl.bench_serving.backends import fetch_json

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerFacts:
    """`/model_info`, `/server_info` and `/v1/models` as far as the server answers them."""

    model_info: dict[str, Any]
    server_info: dict[str, Any]
    model_ids: list[str]

    @property
    def num_devices(self) -> int:
        """tp_size × dp_size if `/server_info` says, else 1."""
        tp, dp = self.server_info.get("tp_size"), self.server_info.get("dp_size", 1)
        if isinstance(tp, int) and isinstance(dp, int) and tp >= 1 and dp >= 1:
            return tp * dp
        return 1

    @property
    def context_length(self) -> int | None:
        return self.model_info.get("context_length")

    @property
    def vocab_size(self) -> int | None:
        return self.model_info.get("vocab_size")

    @property
    def tokenizer_path(self) -> str | None:
        return self.model_info.get("tokenizer_path") or None


async def probe(http: aiohttp.ClientSession, base_url: str, headers: dict) -> ServerFacts:
    """Ask the server about itself; a server that cannot be reached at all is an error."""
    base = base_url.rstrip("/")
    try:
        async with http.get(base + "/", timeout=aiohttp.ClientTimeout(total=30)):
            pass
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise RuntimeError(f"cannot reach the server at {base_url}: {e}") from e
    model_info = await fetch_json(http, base + "/model_info", headers=headers)
    server_info = await fetch_json(http, base + "/server_info", headers=headers)
    models = await fetch_json(http, base + "/v1/models", headers=headers)
    ids = [m.get("id") for m in (models or {}).get("data", []) if isinstance(m, dict)]
    return ServerFacts(
        model_info if isinstance(model_info, dict) else {},
        server_info if isinstance(server_info, dict) else {},
        [i for i in ids if isinstance(i, str)],
    )


# jaxsgl's `/server_info` totals, and the settings key of each one's change over a run.
SERVER_COUNTERS = {
    "step_compiles_total": "server_step_compiles",
    "step_compile_seconds_total": "server_step_compile_s",
    "extend_steps_total": "server_extend_steps",
    "extend_tokens_total": "server_extend_tokens",
    "extend_seconds_total": "server_extend_s",
    "decode_launches_total": "server_decode_launches",
    "decode_steps_total": "server_decode_steps",
    "decode_seconds_total": "server_decode_s",
}


async def server_counters(
    http: aiohttp.ClientSession, base_url: str, headers: dict
) -> dict[str, float] | None:
    """The server's step counters (programs compiled after warm-up, extend steps and decode
    launches with their tokens and seconds); None from a server that does not give them all."""
    info = await fetch_json(http, base_url.rstrip("/") + "/server_info", headers=headers)
    if not isinstance(info, dict) or not all(k in info for k in SERVER_COUNTERS):
        return None
    return {k: float(info[k]) for k in SERVER_COUNTERS}


def needs_tokenizer(args: argparse.Namespace) -> bool:
    """Text prompts need one: the OpenAI targets, and ShareGPT's lengths."""
    return args.backend != "jaxsgl" or args.dataset_name == "sharegpt"


def resolve_tokenizer(args: argparse.Namespace, facts: ServerFacts):
    """`--tokenizer`, else the server's own if it is on this machine, else none (an error
    where one is needed)."""
    name = args.tokenizer
    if name is None and facts.tokenizer_path and Path(facts.tokenizer_path).exists():
        name = facts.tokenizer_path
    if name is None:
        if needs_tokenizer(args):
            raise ValueError(
                f"--backend {args.backend} with --dataset-name {args.dataset_name} needs a "
                "tokenizer: pass --tokenizer (a model folder, a .gguf file or an embedded name)"
            )
        return None
    return load_client_tokenizer(str(name))


@functools.cache
def load_client_tokenizer(name: str):
    """A tokenizer from a folder, a .gguf file or an embedded model's short name."""
    from jaxsgl.model.loader import resolve_model_path
    from jaxsgl.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(name))


def make_sessions(
    args: argparse.Namespace, tokenizer, facts: ServerFacts, seed: int
) -> Iterator[ds.Session]:
    """The dataset's (endless) stream of sessions, drawn from a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    if args.dataset_name == "sharegpt":
        context = args.sharegpt_context_len or facts.context_length
        prompts = sharegpt_prompts(args.dataset_path, tokenizer, context, args.sharegpt_output_len)
        wanted = num_sessions(args)
        if wanted is not None and wanted > len(prompts):
            raise ValueError(
                f"--num-prompts {wanted}: {args.dataset_path!r} has only {len(prompts)} usable "
                "exchanges (fewer prompts, or --duration, which reuses them)"
            )
        return ds.sharegpt_sessions(prompts, rng)
    vocab = len(tokenizer.hf) if tokenizer is not None else facts.vocab_size
    if vocab is None:
        raise ValueError("the server reports no vocab_size: pass --tokenizer")
    space = ds.TokenSpace(rng, vocab, tokenizer)
    if args.dataset_name == "random":
        return ds.random_sessions(
            space, args.random_input_len, args.random_output_len, args.random_range_ratio
        )
    if args.dataset_name == "generated-shared-prefix":
        return ds.shared_prefix_sessions(
            space,
            args.gsp_num_groups,
            args.gsp_prompts_per_group,
            args.gsp_system_prompt_len,
            args.gsp_question_len,
            args.gsp_output_len,
        )
    return ds.multi_turn_sessions(space, args.mt_turns, args.mt_turn_len, args.mt_output_len)


@functools.cache
def _sharegpt_cached(path: str, tokenizer, context: int | None, output_len: int | None):
    return tuple(ds.load_sharegpt(path, tokenizer, context, output_len))


def sharegpt_prompts(path, tokenizer, context: int | None, output_len: int | None):
    """The file's usable exchanges (read and tokenized once per process)."""
    return list(_sharegpt_cached(str(path), tokenizer, context, output_len))


def num_sessions(args: argparse.Namespace) -> int | None:
    """Sessions to run (None: until --duration): --num-prompts, else the dataset's own size."""
    if args.duration is not None:
        return None
    if args.dataset_name == "multi-turn":
        return args.mt_num_sessions
    if args.num_prompts is not None:
        return args.num_prompts
    if args.dataset_name == "generated-shared-prefix":
        return args.gsp_num_groups * args.gsp_prompts_per_group
    return 1000
