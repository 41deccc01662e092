"""The gateway with its state in Redis (the scaled-out layout): links,
hijack counters and freezes live in a real redis-server the test starts."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import aiohttp

from gateway.sink import CaptureSink
from tests.gateway.test_hijack_e2e import send
from tests.helpers.gw import (
    ALICE,
    base_config,
    deep_merge,
    free_port,
    message,
    start_gateway,
    with_attachment,
)


async def test_linking_and_limits_with_redis_state(
    tmp_path: Path, sink: CaptureSink, redis_url: str
) -> None:
    web_port = free_port()
    cfg = deep_merge(
        base_config(tmp_path, sink.port),
        {
            "smtp": {"trusted_networks": ["127.0.0.1/32"]},
            "state": {
                "backend": "redis",
                "redis_url": redis_url,
                "redis_prefix": f"t{uuid.uuid4().hex}:",
            },
            "web": {
                "listen": f"127.0.0.1:{web_port}",
                "public_url": f"http://127.0.0.1:{web_port}",
            },
            "accounts": {ALICE: {"linking": {"enabled": True, "min_size": 10}}},
            "hijack": {"max_messages": 2, "window": "1h"},
        },
    )
    gw = await start_gateway(cfg)
    try:
        port = gw.smtp_ports[0]
        data = os.urandom(3000)
        assert (await send(port, ALICE, ["x@remote.test"], with_attachment(ALICE, data)))[0] == 250
        url = re.search(rb"http://127\.0\.0\.1:\d+/d/[A-Za-z0-9_\-.]+", sink.messages[0].content)
        assert url is not None
        async with (
            aiohttp.ClientSession() as http,
            http.get(url.group().decode() + "/file") as resp,
        ):
            assert resp.status == 200
            assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(data).digest()
        assert (await send(port, ALICE, ["y@remote.test"], message()))[0] == 250
        code, _ = await send(port, ALICE, ["z@remote.test"], message())
        assert code == 550  # the third message crosses max_messages = 2
    finally:
        await gw.close(drain=1)
    # A new process finds the freeze in Redis.
    gw = await start_gateway(cfg)
    try:
        code, _ = await send(gw.smtp_ports[0], ALICE, ["w@remote.test"], message())
        assert code == 550
    finally:
        await gw.close(drain=1)
