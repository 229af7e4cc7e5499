"""Per-request sampling parameters with SGLang's names, defaults and ranges.

Host-side, pure Python. The HTTP layer builds one from a request's `sampling_params` dict
(`SamplingParams.from_dict`, types checked), the engine checks it against the model
(`validate(vocab_size)`, ranges checked), and `jaxsgl.sampler.build_sampling_inputs` turns a
batch of them into device arrays. Every bad input raises `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Below this temperature a request is greedy (SGLang's `_SAMPLING_EPS`).
GREEDY_TEMPERATURE = 1e-6

_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_BOOL_FIELDS = (
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
)
_GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and when it stops.

    After construction `stop` is always a list of strings (`None` -> `[]`, `"x"` -> `["x"]`)
    and `logit_bias` keys are ints (OpenAI clients send JSON, whose keys are strings).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # < GREEDY_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int | str, float] | None = None
    sampling_seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    no_stop_trim: bool = False

    def __post_init__(self):
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _check_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in _GRAMMAR_FIELDS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.sampling_seed is not None:
            _check_int("sampling_seed", self.sampling_seed)
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple):
                raise ValueError(
                    f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}"
                )
            for t in self.stop_token_ids:
                _check_int("stop_token_ids", t)
            object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Parse an API `sampling_params` object; unknown keys and wrong types raise."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}")
        return cls(**d)

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: temperature ~0, or top_k = 1 (the one token left is the argmax)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int) -> None:
        """Check value ranges (SGLang's) against a model with `vocab_size` tokens."""
        _require("temperature", self.temperature, self.temperature >= 0, ">= 0")
        _require("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _require("top_k", self.top_k, self.top_k == -1 or self.top_k >= 1, "-1 (all) or >= 1")
        _require("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _require(name, value, -2 <= value <= 2, "in [-2, 2]")
        _require(
            "repetition_penalty",
            self.repetition_penalty,
            0 < self.repetition_penalty <= 2,
            "in (0, 2]",
        )
        _require("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 0, ">= 0")
        _require(
            "min_new_tokens",
            self.min_new_tokens,
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"in [0, max_new_tokens={self.max_new_tokens}]",
        )
        _require("n", self.n, self.n >= 1, ">= 1")
        for token_id in self.logit_bias or {}:
            _require_token("logit_bias", token_id, vocab_size)
        for token_id in self.stop_token_ids or []:
            _require_token("stop_token_ids", token_id, vocab_size)
        grammars = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise ValueError(f"only one of regex, json_schema, ebnf may be set, got {grammars}")


def grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, text) of the params' grammar, or None for free output."""
    for name in _GRAMMAR_FIELDS:
        value = getattr(params, name)
        if value is not None:
            return name, value
    return None


def _check_int(name: str, value: Any) -> None:
    # bool is a subclass of int; `"n": true` is a client bug, not n=1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _check_float(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _require(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _require_token(name: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name} token id {token_id} is outside the vocabulary [0, {vocab_size})")


def _normalize_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")


def _normalize_logit_bias(bias: Any) -> dict[int, float]:
    """`{"50256": -100}` -> `{50256: -100.0}`."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be an object of token id -> bias, got {bias!r}")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.lstrip("-").isdigit():
            token_id = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            token_id = key
        else:
            raise ValueError(f"logit_bias key must be a token id, got {key!r}")
        out[token_id] = _check_float(f"logit_bias[{key!r}]", value)
    return out
