from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from gateway.demo import self_signed
from gateway.sink import CaptureSink
from tests.helpers.redis import start_redis, stop_redis

# Shared machines are noisy: no per-example deadline. In CI the examples are
# derandomized so that a run is repeatable; locally every run explores anew.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
async def sink() -> AsyncIterator[CaptureSink]:
    s = CaptureSink()
    await s.start()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "gw.example.test")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole session (tests use distinct key prefixes)."""
    server, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop_redis(server)
