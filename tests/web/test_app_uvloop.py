"""The download service on uvloop, whose event loop has no ``sendfile``: files
go out through the chunked fallback, with the same bytes and ranges.

The test is synchronous and runs its own uvloop loop, so the rest of the
suite keeps pytest-asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import uvloop

from tests.helpers.clock import FakeClock
from tests.web.conftest import make_env
from web.links import LinkSigner

DATA = os.urandom(3 * 1024 * 1024 + 5)


def test_whole_file_and_ranges_on_uvloop(
    tmp_path: Path, listen_socket: socket.socket, signer: LinkSigner, clock: FakeClock
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        async for env in make_env(tmp_path, listen_socket, signer, clock, pathless=False):
            token = await env.add_file(DATA)
            url = env.file_url(token)
            async with env.session.get(url) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert hashlib.sha256(body).digest() == hashlib.sha256(DATA).digest()
            for header, start, end in [
                ("bytes=0-9", 0, 9),
                ("bytes=1048570-2097160", 1048570, 2097160),
                ("bytes=-7", len(DATA) - 7, len(DATA) - 1),
            ]:
                async with env.session.get(url, headers={"Range": header}) as resp:
                    assert resp.status == 206
                    assert await resp.read() == DATA[start : end + 1]
            assert await env.download_count(token) == 2

    uvloop.run(scenario())
