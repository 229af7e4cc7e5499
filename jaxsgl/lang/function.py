"""`@function`: a Python function over a state `s` becomes a program to `run` or `run_batch`.

@sgl.function(namespace="qa")
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32))

state = qa.run(question="What is 2 + 2?", temperature=0)
states = qa.run_batch([{"question": q} for q in questions], progress_bar=True)
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from jaxsgl.lang import ir
from jaxsgl.lang.backend import Backend, resolve_backend
from jaxsgl.lang.state import ProgramState

_RUN_PARAMS = (
    "max_new_tokens", "stop", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "ignore_eos", "sampling_seed",
)  # fmt: skip


class SglFunction:
    """A program: `func(s, **arguments)` appends steps to the state `s`."""

    def __init__(self, func: Callable, namespace: str = ""):
        if not callable(func):
            raise ValueError(f"@function decorates a function, not {func!r:.80}")
        if not isinstance(namespace, str):
            raise ValueError(f"namespace must be a string, got {namespace!r}")
        self.func, self.namespace = func, namespace
        self.signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        """Inside another program: run this one's steps on the caller's state."""
        return self.func(s, *args, **kwargs)

    def run(
        self,
        *args: Any,
        stream: bool = False,
        backend: Any = None,
        namespace: str | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program; returns its state (at once with `stream=True`, while it runs).
        Keyword arguments named like sampling parameters (`temperature`, `max_new_tokens`,
        `stop`, ...) are defaults for every `gen`; the rest are the program's arguments."""
        defaults = {k: kwargs.pop(k) for k in _RUN_PARAMS if kwargs.get(k) is not None}
        arguments = self._bind(args, kwargs)
        ns = self.namespace if namespace is None else namespace
        state = ProgramState(resolve_backend(backend), ns, defaults)
        if stream:
            state.start_streaming(self.func, arguments)
        else:
            self.func(state, **arguments)
        return state

    def run_batch(
        self,
        batch_kwargs: list[dict],
        *,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        backend: Any = None,
        **run_kwargs: Any,
    ) -> list[ProgramState]:
        """Run the program once per argument dict, concurrently (the engine batches their
        requests); the states in order. The text the programs share before their first
        generation is computed once, before any of them starts."""
        if not isinstance(batch_kwargs, list) or not all(isinstance(k, dict) for k in batch_kwargs):
            raise ValueError("run_batch takes a list of argument dicts")
        if not batch_kwargs:
            return []
        be = resolve_backend(backend)
        ns = run_kwargs.get("namespace") or self.namespace
        shared = os.path.commonprefix([self._text_before_gen(be, ns, k) for k in batch_kwargs])
        if shared and len(batch_kwargs) > 1:
            be.prefill(shared, ns)
        threads = min(len(batch_kwargs), 64) if num_threads == "auto" else int(num_threads)
        if threads < 1:
            raise ValueError(f"num_threads must be >= 1 or 'auto', got {num_threads!r}")
        states: list[ProgramState | None] = [None] * len(batch_kwargs)
        with (
            ThreadPoolExecutor(threads) as pool,
            tqdm(total=len(batch_kwargs), disable=not progress_bar, desc=self.__name__) as bar,
        ):
            futures = {
                pool.submit(self.run, backend=be, **run_kwargs, **kw): i
                for i, kw in enumerate(batch_kwargs)
            }
            for fut in as_completed(futures):
                states[futures[fut]] = fut.result()
                bar.update(1)
        return states

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = self.signature.bind(None, *args, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad arguments for program {self.__name__!r}: {e}") from None
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self.signature.parameters)))
        return arguments

    def _text_before_gen(self, backend: Backend, namespace: str, kwargs: dict) -> str:
        """The text the program appends before its first model call (no model is called:
        the program stops there). Python code before that point runs once more here."""
        tracer = _Tracer(backend, namespace)
        try:
            self.func(tracer, **self._bind((), dict(kwargs)))
        except _StopTrace:
            pass
        except Exception:  # e.g. code that needs a generated value: no shared text then
            return ""
        return tracer._text


class _StopTrace(Exception):
    pass


class _Tracer(ProgramState):
    """A state that records text and stops at the first step that needs the model."""

    def _gen(self, step: ir.Gen) -> None:
        raise _StopTrace

    def _select(self, step: ir.Select) -> None:
        raise _StopTrace

    def fork(self, n: int = 1):
        raise _StopTrace

    def __getitem__(self, name: str) -> Any:
        raise _StopTrace


def function(func: Callable | None = None, *, namespace: str = ""):
    """Decorator: `@function` or `@function(namespace="finance")` (the namespace keeps the
    program's prefixes in their own part of the cache)."""
    if func is None:
        return lambda f: SglFunction(f, namespace=namespace)
    return SglFunction(func, namespace=namespace)
