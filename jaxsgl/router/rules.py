"""Request grading: which pool of workers a request goes to.

A rules file (JSON) is an ordered list of rules, or an object with that list under "rules" and
the pool for everything else under "default_pool" (default: "default"):

    {"default_pool": "default",
     "rules": [
        {"pool": "big",   "when": {"model": "llama-3-70b"}},
        {"pool": "batch", "when": {"header": {"X-Request-Class": "batch"}}},
        {"pool": "light", "when": {"max_prompt_chars": 2000, "max_tokens_at_most": 256}}]}

The first rule whose conditions all hold names the pool. Conditions:

    model                  the request's `model` is this string (or one of this list)
    min_prompt_chars       the routing text has at least this many characters
    max_prompt_chars       ... at most this many
    max_tokens_at_least    the requested output length (max_tokens, max_completion_tokens or
    max_tokens_at_most     sampling_params.max_new_tokens) is at least / at most this; a request
                           that states no length matches neither
    header                 {name: value or [values]}: each header present with one of the
                           values (names case-insensitive, values exact)

A rule with no conditions (`"when": {}`) matches everything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxsgl.router.features import RequestFeatures

DEFAULT_POOL = "default"

_INT_CONDITIONS = (
    "min_prompt_chars",
    "max_prompt_chars",
    "max_tokens_at_least",
    "max_tokens_at_most",
)
CONDITIONS = frozenset({"model", "header", *_INT_CONDITIONS})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Send requests matching every condition to `pool`; unset conditions always hold."""

    pool: str
    models: frozenset[str] | None = None
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None
    max_tokens_at_least: int | None = None
    max_tokens_at_most: int | None = None
    headers: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def matches(self, f: RequestFeatures) -> bool:
        if self.models is not None and f.model not in self.models:
            return False
        if self.min_prompt_chars is not None and f.prompt_chars < self.min_prompt_chars:
            return False
        if self.max_prompt_chars is not None and f.prompt_chars > self.max_prompt_chars:
            return False
        if self.max_tokens_at_least is not None and (
            f.max_tokens is None or f.max_tokens < self.max_tokens_at_least
        ):
            return False
        if self.max_tokens_at_most is not None and (
            f.max_tokens is None or f.max_tokens > self.max_tokens_at_most
        ):
            return False
        return all(f.headers.get(name) in values for name, values in self.headers.items())


@dataclasses.dataclass(frozen=True)
class Rules:
    """An ordered list of rules and the pool for requests no rule matches."""

    rules: tuple[Rule, ...] = ()
    default_pool: str = DEFAULT_POOL

    def pool_for(self, features: RequestFeatures) -> str:
        return next((r.pool for r in self.rules if r.matches(features)), self.default_pool)

    @property
    def pools(self) -> set[str]:
        """Every pool these rules can send a request to."""
        return {self.default_pool, *(r.pool for r in self.rules)}


def load_rules(path: str | Path) -> Rules:
    """Rules from a JSON file; ValueError naming the problem if it is not a valid rules file."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read rules file {str(path)!r}: {e}") from None
    return parse_rules(spec)


def parse_rules(spec: Any) -> Rules:
    """Rules from their JSON form (a list of rules, or {"rules": [...], "default_pool": ...})."""
    if isinstance(spec, list):
        spec = {"rules": spec}
    if not isinstance(spec, dict):
        raise ValueError("rules must be a list of rules or an object with a 'rules' list")
    unknown = sorted(set(spec) - {"rules", "default_pool"})
    if unknown:
        raise ValueError(f"unknown keys in rules: {', '.join(unknown)}")
    default_pool = spec.get("default_pool", DEFAULT_POOL)
    _check_name(default_pool, "default_pool")
    items = spec.get("rules", [])
    if not isinstance(items, list):
        raise ValueError(f"'rules' must be a list, got {items!r}")
    return Rules(tuple(parse_rule(r, i) for i, r in enumerate(items)), default_pool)


def parse_rule(spec: Any, index: int = 0) -> Rule:
    """One rule: {"pool": name, "when": {condition: value, ...}}."""
    where = f"rule {index}"
    if not isinstance(spec, dict) or set(spec) - {"pool", "when"} or "pool" not in spec:
        raise ValueError(f"{where} must be an object with 'pool' and 'when', got {spec!r}")
    _check_name(spec["pool"], f"{where} pool")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise ValueError(f"{where}: 'when' must be an object, got {when!r}")
    unknown = sorted(set(when) - CONDITIONS)
    if unknown:
        raise ValueError(f"{where}: unknown conditions {unknown}; known: {sorted(CONDITIONS)}")
    bounds = {}
    for key in _INT_CONDITIONS:
        if key in when:
            value = when[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be a non-negative integer, got {value!r}")
            bounds[key] = value
    models = None
    if "model" in when:
        models = frozenset(_strings(when["model"], f"{where}: model"))
    return Rule(pool=spec["pool"], models=models, headers=_headers(when, where), **bounds)


def _headers(when: dict, where: str) -> dict[str, frozenset[str]]:
    spec = when.get("header", {})
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: header must be an object of name -> value, got {spec!r}")
    return {
        name.lower(): frozenset(_strings(values, f"{where}: header {name}"))
        for name, values in spec.items()
    }


def _strings(value: Any, what: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {value!r}")
    return values


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
