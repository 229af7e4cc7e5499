"""Warm-up sessions: prefixes a program produced stay cached while the session is open.

with sgl.session() as session:
    session.run(system_prompt_prog)     # its text is computed and pinned
    ...                                 # requests sharing it always hit the cache
# unpinned here: evictable again
"""

from __future__ import annotations

import logging
from typing import Any

from jaxsgl.lang.backend import Backend, resolve_backend
from jaxsgl.lang.function import SglFunction
from jaxsgl.lang.state import ProgramState

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, backend: Any = None):
        self.backend: Backend = resolve_backend(backend)
        self.pins: list[tuple[str, str, int]] = []  # (text, namespace, pinned tokens)

    def run(self, program: SglFunction, *args: Any, **kwargs: Any) -> ProgramState:
        """Run `program` and pin the whole text it produced, in its namespace."""
        if not isinstance(program, SglFunction):
            raise ValueError(f"session.run takes an @function program, not {program!r:.80}")
        state = program.run(*args, backend=self.backend, **kwargs)
        self.pin(state.text(), state.namespace)
        return state

    def pin(self, text: str, namespace: str = "") -> int:
        """Cache `text` and pin its whole pages until the session closes; pinned tokens."""
        pinned = self.backend.pin(text, namespace)
        self.pins.append((text, namespace, pinned))
        return pinned

    def close(self) -> None:
        """Unpin everything this session pinned (newest first)."""
        while self.pins:
            text, namespace, _ = self.pins.pop()
            self.backend.unpin(text, namespace)
        logger.debug("session closed")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def session(backend: Any = None) -> Session:
    """A `Session` on `backend` (default: the default backend)."""
    return Session(backend)
