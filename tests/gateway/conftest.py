from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Settings
from gateway.sink import CaptureSink
from tests.helpers.gw import GatewayFactory, base_config, deep_merge


@pytest.fixture
async def make_gw(
    tmp_path: Path, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> AsyncIterator[GatewayFactory]:
    """Start gateways in front of ``sink``: the test configuration with each
    override merged in, optionally with a clock of the test's."""
    started: list[Gateway] = []

    async def make(*overrides: dict[str, Any], clock: Callable[[], float] = time.time) -> Gateway:
        cfg = base_config(tmp_path, sink.port, tls_files)
        for extra in overrides:
            cfg = deep_merge(cfg, extra)
        gw = Gateway(Settings(**cfg), clock=clock)
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.close(drain=1)
