"""What a program appends to its state: text, generations, selections and chat roles.

Each call (`gen`, `select`, `user`, ...) only describes a step; `state += step` runs it.
Steps concatenate with `+`, so `s += "Answer: " + gen("a", max_tokens=8)` is one step.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

ROLES = ("system", "user", "assistant")


class Expr:
    """A step of a program; `a + b` runs `a` then `b`."""

    def __add__(self, other: Any) -> Seq:
        return Seq((*_items(self), *_items(as_expr(other))))

    def __radd__(self, other: Any) -> Seq:
        return Seq((*_items(as_expr(other)), *_items(self)))


@dataclasses.dataclass(frozen=True)
class Text(Expr):
    text: str


@dataclasses.dataclass(frozen=True)
class Seq(Expr):
    items: tuple[Expr, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gen(Expr):
    """Generate into variable `name`; `params` are sampling parameters (SGLang's names),
    only the ones the caller set (the run's defaults fill the rest)."""

    name: str | None
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Select(Expr):
    """Append the choice the model finds most likely after the text so far (by the mean
    logprob of its tokens, or their sum with `normalize=False`) and store it in `name`."""

    name: str | None
    choices: tuple[str, ...]
    normalize: bool = True


@dataclasses.dataclass(frozen=True)
class RoleBegin(Expr):
    role: str


@dataclasses.dataclass(frozen=True)
class RoleEnd(Expr):
    role: str


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise ValueError(f"a program can append text or gen/select/role steps, not {value!r:.80}")


def _items(expr: Expr) -> tuple[Expr, ...]:
    return expr.items if isinstance(expr, Seq) else (expr,)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    *,
    min_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    stop_token_ids: list[int] | None = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
    ebnf: str | None = None,
    choices: list[str] | None = None,
    sampling_seed: int | None = None,
) -> Expr:
    """A generation stored in variable `name` (`state[name]`). With `choices` it is a
    `select`; `regex`, `json_schema` (a dict or its JSON text) or `ebnf` constrain the text."""
    if choices is not None:
        return select(name, choices)
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    given = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "stop": stop,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "ignore_eos": ignore_eos,
        "stop_token_ids": stop_token_ids,
        "regex": regex,
        "json_schema": json_schema,
        "ebnf": ebnf,
        "sampling_seed": sampling_seed,
    }
    if sum(x is not None for x in (regex, json_schema, ebnf)) > 1:
        raise ValueError("give at most one of regex, json_schema and ebnf")
    return Gen(name=name, params={k: v for k, v in given.items() if v is not None})


def select(name: str | None = None, choices: list[str] | None = None, normalize: bool = True):
    """The most likely of `choices` after the text so far, appended and stored in `name`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"select needs a list of non-empty strings, got {choices!r}")
    return Select(name=name, choices=tuple(choices), normalize=normalize)


def _role(role: str, content: tuple[Any, ...]) -> Expr:
    return Seq((RoleBegin(role), *(as_expr(c) for c in content), RoleEnd(role)))


def system(*content: Any) -> Expr:
    """A system message: `content` (text and steps) between the template's system markers."""
    return _role("system", content)


def user(*content: Any) -> Expr:
    return _role("user", content)


def assistant(*content: Any) -> Expr:
    """An assistant turn; `assistant(gen("answer"))` lets the model write it."""
    return _role("assistant", content)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")
