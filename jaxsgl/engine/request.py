"""A request as the engine tracks it: its tokens, its pages, where it stands.

Token bookkeeping, for `tokens = prompt_ids + output_ids`:
- `kv_len` tokens have their K/V in the pool; the next step computes `tokens[kv_len:]`
  (the unprocessed prompt in a prefill, the last sampled token in a decode).
- `pages` covers at least `kv_len` tokens; its first `num_tree_pages` pages belong to the radix
  cache (locked through `last_node`), the rest to this request.
Example, page size 4: prompt [a b c d e f], a cache hit on [a b c d] -> pages [7] (tree),
kv_len 4; the prefill computes [e f] into a new page 9 -> pages [7 9], kv_len 6.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

from jaxsgl.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # in the queue (new, or retracted and waiting to be recomputed)
    RUNNING = "running"  # admitted: prefilling in chunks or decoding
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str = ""
    return_logprob: bool = False
    logprob_start_len: int = -1  # first prompt position whose logprob is returned (-1: none)
    top_logprobs_num: int = 0
    seed: int = 0  # the PRNG seed for this request (sampling_seed or drawn at arrival)
    on_event: Callable[[dict[str, Any]], None] | None = None
    grammar: Any = None  # a constrained.Grammar when the output must follow one

    num_forced_tokens: int = 0  # output tokens appended by jump-forward, not sampled

    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: dict[str, Any] | None = None
    # KV state
    kv_len: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    num_tree_pages: int = 0
    last_node: Any = None  # the radix node locked for this request's cached prefix
    num_cached_tokens: int = 0  # prompt tokens served from the cache at first admission
    admitted_once: bool = False
    num_retractions: int = 0
    # logprobs, filled as tokens are computed
    prompt_logprobs: list[tuple[float | None, int, list[tuple[float, int]] | None]] = (
        dataclasses.field(default_factory=list)
    )
    output_logprobs: list[tuple[float, int, list[tuple[float, int]] | None]] = dataclasses.field(
        default_factory=list
    )
    # timing
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        """More than one token is still to compute: the prompt (or a recompute) is unfinished."""
        return self.num_tokens - self.kv_len > 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.prompt_ids)

    @property
    def penalized(self) -> bool:
        p = self.params
        return bool(p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1)

    def can_run_ahead(self) -> bool:
        """Whether a step may be prepared before this request's last token is recorded:
        penalties read its token counts and grammars its last token, neither known then."""
        return not self.penalized and self.grammar is None
