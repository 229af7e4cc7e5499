"""Request routing over replicas: the cache-aware policy (shared by `--dp-size` inside one server
and by the standalone router over HTTP workers) and the router process itself."""

from jaxsgl.router.policy import (
    POLICIES,
    CacheAware,
    Policy,
    RoundRobin,
    ShortestQueue,
    make_policy,
)
from jaxsgl.router.prefix_tree import PrefixTree

__all__ = [
    "POLICIES",
    "CacheAware",
    "Policy",
    "PrefixTree",
    "RoundRobin",
    "ShortestQueue",
    "make_policy",
]
