"""jaxsgl: SGLang-style LLM serving on JAX."""

from jaxsgl import xla_flags

# Before anything imports jax and starts a backend: XLA reads its flags once.
xla_flags.apply_defaults()

from jaxsgl import lang  # noqa: E402 - light: no jax
from jaxsgl.lang import *  # noqa: E402, F403 - `import jaxsgl as sgl; sgl.gen(...)`

__version__ = "0.1.0"
__all__ = ["Generator", *lang.__all__]  # noqa: F405


def __getattr__(name: str):
    # `from jaxsgl import Generator` without importing the engine (and jax) with the package.
    if name == "Generator":
        from jaxsgl.generator import Generator

        return Generator
    raise AttributeError(f"module 'jaxsgl' has no attribute {name!r}")
