"""jaxsgl: SGLang-style LLM serving on JAX."""

from jaxsgl import xla_flags

# Before anything imports jax and starts a backend: XLA reads its flags once.
xla_flags.apply_defaults()

__version__ = "0.1.0"
__all__ = ["Generator"]


def __getattr__(name: str):
    # `from jaxsgl import Generator` without importing the engine (and jax) with the package.
    if name == "Generator":
        from jaxsgl.generator import Generator

        return Generator
    raise AttributeError(f"module 'jaxsgl' has no attribute {name!r}")
