"""The frontend language: programs of text, generations, choices and chat roles.

import jaxsgl as sgl

@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32))

sgl.set_default_backend(sgl.Generator())       # or sgl.RuntimeEndpoint(url)
print(qa.run(question="What is the capital of France?", temperature=0)["answer"])
"""

from jaxsgl.lang.backend import (
    Backend,
    GeneratorBackend,
    get_default_backend,
    set_default_backend,
)
from jaxsgl.lang.endpoint import RuntimeEndpoint
from jaxsgl.lang.function import SglFunction, function
from jaxsgl.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from jaxsgl.lang.session import Session, session
from jaxsgl.lang.state import ForkGroup, ProgramState

__all__ = [
    "Backend",
    "ForkGroup",
    "GeneratorBackend",
    "ProgramState",
    "RuntimeEndpoint",
    "Session",
    "SglFunction",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "get_default_backend",
    "select",
    "session",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]
