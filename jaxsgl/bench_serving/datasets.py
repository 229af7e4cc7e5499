"""Benchmark workloads as streams of sessions: a session is one conversation, a list of user
turns; single-turn datasets make one-turn sessions.

A turn's prompt carries its text (for OpenAI-style targets), its token ids when the benchmark
chose them (the native target sends those, so prompt lengths are exact) and the chat messages.
Later turns of a session are built while the benchmark runs, from the model's actual answers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxsgl.bench_serving.report import read_json_file

logger = logging.getLogger(__name__)

DATASETS = ("random", "generated-shared-prefix", "multi-turn", "sharegpt")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request's input: `text` (None without a tokenizer), `ids` (None when only the
    text is known, e.g. ShareGPT), the chat `messages`, and the output length asked for."""

    text: str | None
    ids: list[int] | None
    output_len: int
    num_tokens: int  # our own count, used when a server reports none
    messages: tuple[dict, ...] = ()

    def chat(self) -> list[dict]:
        return list(self.messages) or [{"role": "user", "content": self.text or ""}]

    def follow(self, answer_text: str, answer_ids: list[int] | None, user: Prompt) -> Prompt:
        """The next turn's prompt: this prompt, the model's answer, then the new user message.

        With ids everywhere the next prompt starts with exactly this prompt's ids and the
        answer's: `[p1 p2] + [a1 a2 a3] + [u1 u2]`, which a prefix cache can match in full."""
        ids = None
        if self.ids is not None and answer_ids is not None and user.ids is not None:
            ids = self.ids + answer_ids + user.ids
        text = None
        if self.text is not None and user.text is not None:
            text = self.text + answer_text + user.text
        messages = (
            *self.chat(),
            {"role": "assistant", "content": answer_text},
            {"role": "user", "content": user.text or ""},
        )
        if ids is not None:
            num = len(ids)
        else:  # an estimate: the server's own count is what gets reported
            num = self.num_tokens + len(answer_ids or ()) + user.num_tokens
        return Prompt(text, ids, user.output_len, num, messages)


Session = list[Prompt]  # a conversation's user turns, in order


class TokenSpace:
    """Random token ids to build prompts from, decoded to text when a tokenizer is known."""

    def __init__(self, rng: np.random.Generator, vocab_size: int, tokenizer=None):
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        special = set(tokenizer.hf.all_special_ids) if tokenizer is not None else set()
        self.ids = np.array([i for i in range(vocab_size) if i not in special])
        self.rng = rng
        self.tokenizer = tokenizer

    def prompt(self, num_tokens: int, output_len: int, prefix: list[int] | None = None) -> Prompt:
        ids = (prefix or []) + self.rng.choice(self.ids, num_tokens).tolist()
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return Prompt(text, ids, output_len, len(ids))


def random_sessions(
    space: TokenSpace, input_len: int, output_len: int, range_ratio: float
) -> Iterator[Session]:
    """Prompts of random tokens; each length uniform in [range_ratio × len, len] (at least 1)."""
    _check_positive(input_len=input_len, output_len=output_len)
    if not 0 <= range_ratio <= 1:
        raise ValueError(f"--random-range-ratio must be within 0..1, got {range_ratio}")
    while True:
        n_in = _draw_len(space.rng, input_len, range_ratio)
        n_out = _draw_len(space.rng, output_len, range_ratio)
        yield [space.prompt(n_in, n_out)]


def shared_prefix_sessions(
    space: TokenSpace,
    num_groups: int,
    prompts_per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
) -> Iterator[Session]:
    """Groups of prompts that share a random system prompt and differ in a random question.
    Each round of `num_groups × prompts_per_group` prompts is shuffled; a later round (in a
    timed run) draws new system prompts."""
    _check_positive(
        gsp_num_groups=num_groups,
        gsp_prompts_per_group=prompts_per_group,
        gsp_system_prompt_len=system_len,
        gsp_question_len=question_len,
        gsp_output_len=output_len,
    )
    while True:
        systems = [space.prompt(system_len, 0).ids for _ in range(num_groups)]
        round_ = [
            space.prompt(question_len, output_len, prefix=system)
            for system in systems
            for _ in range(prompts_per_group)
        ]
        for k in space.rng.permutation(len(round_)):
            yield [round_[k]]


def multi_turn_sessions(
    space: TokenSpace, turns: int, turn_len: int, output_len: int
) -> Iterator[Session]:
    """Conversations of `turns` random user messages of `turn_len` tokens each."""
    _check_positive(mt_turns=turns, mt_turn_len=turn_len, mt_output_len=output_len)
    while True:
        yield [space.prompt(turn_len, output_len) for _ in range(turns)]


def load_sharegpt(
    path: str | Path, tokenizer, context_len: int | None, output_len: int | None = None
) -> list[Prompt]:
    """The first user/assistant exchange of each conversation in a ShareGPT JSON file; the
    output length is the answer's token count (or `output_len`). Exchanges shorter than two
    tokens either way, or longer than the context, are left out."""
    data = read_json_file(path, "--dataset-path", missing="is not a file")
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r}: a ShareGPT file holds a list of conversations")
    prompts = []
    for entry in data:
        pair = _first_exchange(entry)
        if pair is None:
            continue
        question, answer = pair
        n_in = len(tokenizer.encode(question))
        n_out = output_len or len(tokenizer.encode(answer))
        if n_in < 2 or n_out < 2 or (context_len and n_in + n_out > context_len):
            continue
        prompts.append(Prompt(question, None, n_out, n_in))
    if not prompts:
        raise ValueError(f"{str(path)!r} holds no usable user/assistant exchange")
    return prompts


def sharegpt_sessions(prompts: list[Prompt], rng: np.random.Generator) -> Iterator[Session]:
    """The exchanges in a shuffled order, reshuffled after each pass."""
    for _ in itertools.count():
        for k in rng.permutation(len(prompts)):
            yield [prompts[k]]


def _first_exchange(entry) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations") or entry.get("conversation")
    if not isinstance(turns, list):
        return None
    for ask, reply in itertools.pairwise(turns):
        if not (isinstance(ask, dict) and isinstance(reply, dict)):
            continue
        if ask.get("from") in ("human", "user") and reply.get("from") in ("gpt", "assistant"):
            question, answer = ask.get("value"), reply.get("value")
            if isinstance(question, str) and isinstance(answer, str):
                return question, answer
    return None


def _draw_len(rng: np.random.Generator, length: int, ratio: float) -> int:
    return int(rng.integers(max(int(length * ratio), 1), length + 1))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {v}")
