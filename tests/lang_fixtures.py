"""Backends for the frontend language tests: one in-process Generator with the server's options,
and a RuntimeEndpoint on the shared server, so every program can run on both and compare.

Test modules load this as a plugin next to `server_fixture`:
`pytest_plugins = ["server_fixture", "lang_fixtures"]`. Modules import from it before pytest
loads it, so its asserts are not rewritten (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import pytest
from server_fixture import CONTEXT_LENGTH

from jaxsgl.generator import Generator
from jaxsgl.lang import GeneratorBackend, RuntimeEndpoint

# The same engine options as the shared server (`server_fixture.SERVER_FLAGS`): greedy
# outputs must then be the same on both backends.
SERVER_OPTIONS = dict(
    max_total_tokens=16384,
    context_length=CONTEXT_LENGTH,
    max_running_requests=64,
    chunked_prefill_size=512,
    warmup=False,
    progress=False,
)


@pytest.fixture(scope="session")
def lang_generator():
    with Generator(**SERVER_OPTIONS) as gen:
        yield gen
        assert gen.check_integrity() == {"running": 0, "waiting": 0}


@pytest.fixture(scope="session")
def backends(lang_generator, server) -> dict:
    """{"generator": ..., "endpoint": ...}: the same model in process and over HTTP."""
    return {
        "generator": GeneratorBackend(lang_generator),
        "endpoint": RuntimeEndpoint(server.url),
    }
