from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.demo import self_signed
from gateway.sink import CaptureSink


@pytest.fixture
async def sink() -> AsyncIterator[CaptureSink]:
    s = CaptureSink()
    await s.start()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "gw.example.test")
