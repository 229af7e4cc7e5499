"""A program's state: the text so far, its variables, its chat messages — and the
interpreter that runs each step appended to it.

    s += "Q: What is 2 + 2?\\nA:"           # text
    s += sgl.gen("a", max_tokens=8)         # the model continues the text; s["a"] holds it
    forks = s.fork(2)                       # two copies sharing the text (computed once)

Steps run when appended, in the program's thread, so plain Python (loops, branches on
`s["a"]`, calls to external tools) runs between them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxsgl.lang import ir
from jaxsgl.lang.backend import Backend
from jaxsgl.lang.chat import role_affixes

logger = logging.getLogger(__name__)

_END = object()


class ProgramState:
    """Created by `prog.run(...)`; read with `text()`, `messages()`, `state[name]`."""

    def __init__(self, backend: Backend, namespace: str = "", defaults: dict | None = None):
        self.backend = backend
        self.namespace = namespace
        self.defaults = dict(defaults or {})  # sampling parameters of the run
        self._text = ""
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._messages: list[dict] = []
        self._role: tuple[str, int, str] | None = None  # (role, where its content starts, suffix)
        self._pieces: queue.SimpleQueue | None = None  # (variable, text) while streaming
        self._done = threading.Event()
        self._done.set()
        self._thread: threading.Thread | None = None  # the thread running a streamed program
        self._error: BaseException | None = None

    # -- running steps -------------------------------------------------------------------------
    def __iadd__(self, step: Any) -> ProgramState:
        self._run(ir.as_expr(step))
        return self

    def _run(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.Seq):
            for item in expr.items:
                self._run(item)
        elif isinstance(expr, ir.Text):
            self._append(expr.text)
        elif isinstance(expr, ir.Gen):
            self._gen(expr)
        elif isinstance(expr, ir.Select):
            self._select(expr)
        elif isinstance(expr, ir.RoleBegin):
            self._begin_role(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._end_role(expr.role)
        else:
            raise ValueError(f"unknown program step {expr!r:.80}")

    def _append(self, text: str, var: str | None = None) -> None:
        self._text += text
        if self._pieces is not None and text:
            self._pieces.put((var, text))

    def _gen(self, step: ir.Gen) -> None:
        params = {**self.defaults, **step.params}
        if self._pieces is None:
            out = self.backend.generate(self._text, params, self.namespace)
            value, meta = out["text"], out["meta_info"]
            self._append(value, step.name)
        else:
            value, meta = "", None
            for piece, final in self.backend.stream(self._text, params, self.namespace):
                value += piece
                self._append(piece, step.name)
                meta = final or meta
        self._set(step.name, value, meta)

    def _select(self, step: ir.Select) -> None:
        logprobs = self.backend.score(self._text, step.choices, self.namespace)
        scores = [sum(lps) / len(lps) if step.normalize else sum(lps) for lps in logprobs]
        best = max(range(len(scores)), key=scores.__getitem__)  # the first of equals
        self._append(step.choices[best], step.name)
        meta = {"choice_scores": scores, "input_token_logprobs": logprobs}
        self._set(step.name, step.choices[best], meta)

    def _set(self, name: str | None, value: Any, meta: dict | None) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta or {}

    def _begin_role(self, role: str) -> None:
        if self._role is not None:
            raise ValueError(f"{role} message started inside a {self._role[0]} message")
        prefix, suffix = role_affixes(self.backend.render_chat, self._messages, role)
        self._append(prefix)
        self._role = (role, len(self._text), suffix)

    def _end_role(self, role: str) -> None:
        if self._role is None or self._role[0] != role:
            raise ValueError(f"{role}_end without {role}_begin")
        _, start, suffix = self._role
        self._messages.append({"role": role, "content": self._text[start:]})
        self._append(suffix)
        self._role = None

    # -- reading -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        self._wait()
        if name not in self._vars:
            raise KeyError(f"no variable {name!r}; the program set {sorted(self._vars)}")
        return self._vars[name]

    def __setitem__(self, name: str, value: Any) -> None:
        """Set a variable from Python (a tool's result, say); it adds no text."""
        self._set(name, value, None)

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_var(self, name: str) -> Any:
        return self[name]

    def get_meta_info(self, name: str) -> dict:
        """The engine's meta_info of the step that set `name` (tokens, cached tokens, ...)."""
        self._wait()
        return self._meta[name]

    def variables(self) -> dict[str, Any]:
        self._wait()
        return dict(self._vars)

    def text(self) -> str:
        """The whole text: prompts, role markers and generations."""
        self._wait()
        return self._text

    def messages(self) -> list[dict]:
        """The chat messages the program wrote with roles, as `{"role", "content"}` dicts."""
        self._wait()
        return [dict(m) for m in self._messages]

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text as it is produced (a streamed run: each piece goes to one reader), or all
        of it at once; with `var_name` only that variable's text."""
        if self._pieces is None:
            self._wait()
            yield self._vars.get(var_name, "") if var_name else self._text
            return
        while (item := self._pieces.get()) is not _END:
            var, text = item
            if var_name is None or var == var_name:
                yield text
        self._pieces.put(_END)  # pieces go to one reader; a later one just sees the end
        self._wait()

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """`text_iter` for asyncio callers (the waiting happens in a worker thread)."""
        pieces = self.text_iter(var_name)
        while (piece := await asyncio.to_thread(next, pieces, _END)) is not _END:
            yield piece

    def _wait(self) -> None:
        """Outside a streamed program's own thread, wait for it to finish."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._done.wait()
        if self._error is not None:
            raise self._error

    # -- streaming and forks -------------------------------------------------------------------
    def start_streaming(self, func, kwargs: dict) -> None:
        """Run `func(self, **kwargs)` in a thread; `text_iter` follows its output."""
        self._pieces, self._done = queue.SimpleQueue(), threading.Event()

        def main():
            try:
                func(self, **kwargs)
            except BaseException as e:  # re-raised to whoever reads the state
                logger.debug("program failed: %r", e)
                self._error = e
            finally:
                self._done.set()
                self._pieces.put(_END)

        self._thread = threading.Thread(target=main, name="jaxsgl-program", daemon=True)
        self._thread.start()

    def fork(self, n: int = 1) -> ForkGroup:
        """`n` copies of this state. The text so far is computed first (a prefill), so every
        branch's first request finds it in the cache."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        meta = self.backend.prefill(self._text, self.namespace) if self._text else {}
        branches = [self._copy() for _ in range(n)]
        return ForkGroup(self, branches, meta.get("prompt_tokens", 0))

    def _copy(self) -> ProgramState:
        other = ProgramState(self.backend, self.namespace, self.defaults)
        other._text, other._role = self._text, self._role
        other._vars, other._meta = dict(self._vars), dict(self._meta)
        other._messages = [dict(m) for m in self._messages]
        return other


class ForkGroup(list):
    """The branches of a fork. `forks += step` runs the step in every branch at once (one
    step, or a list of one step per branch); `join()` gathers their new variables."""

    def __init__(self, parent: ProgramState, branches: list[ProgramState], prefix_tokens: int):
        super().__init__(branches)
        self.parent = parent
        self.prefix_tokens = prefix_tokens  # tokens of the shared text, as the prefill saw them
        self._before = set(parent._vars)

    def __iadd__(self, steps: Any) -> ForkGroup:
        steps = steps if isinstance(steps, list | tuple) else [steps] * len(self)
        if len(steps) != len(self):
            raise ValueError(f"{len(steps)} steps for {len(self)} branches")
        with ThreadPoolExecutor(len(self)) as pool:
            list(pool.map(ProgramState.__iadd__, self, steps))
        return self

    def join(self) -> dict[str, list]:
        """Each variable a branch set after the fork, as a list over the branches; also set
        in the parent state (`s[name]`)."""
        names = sorted({k for b in self for k in b._vars} - self._before)
        gathered = {k: [b._vars.get(k) for b in self] for k in names}
        for k, values in gathered.items():
            self.parent._vars[k] = values
            self.parent._meta[k] = {"branches": [b._meta.get(k, {}) for b in self]}
        return gathered
