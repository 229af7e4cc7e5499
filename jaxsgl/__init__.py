"""jaxsgl: SGLang-style LLM serving on JAX."""

from jaxsgl import xla_flags

# Before anything imports jax and starts a backend: XLA reads its flags once.
xla_flags.apply_defaults()

__version__ = "0.1.0"
