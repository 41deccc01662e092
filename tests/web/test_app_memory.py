"""A large file goes out without being held in memory, and broken downloads
leave the server healthy."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import re
from pathlib import Path

import pytest

from tests.web.conftest import WebEnv

MIB = 1024 * 1024
BIG = 100 * MIB
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is refused."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not STATUS.exists(), reason="needs /proc/self/status (Linux)")
async def test_100_mib_file_is_streamed_not_buffered(any_env: WebEnv) -> None:
    block = os.urandom(MIB)
    expected = hashlib.sha256()
    for _ in range(BIG // MIB):
        expected.update(block)
    data = block * (BIG // MIB)
    token = await any_env.add_file(data, filename="big.bin", content_type="application/zip")
    del data
    gc.collect()

    peak_known = _reset_peak()
    before = _status_kib("VmRSS")
    got = hashlib.sha256()
    received = 0
    async with any_env.session.get(any_env.file_url(token)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(BIG)
        async for chunk in resp.content.iter_chunked(MIB):
            got.update(chunk)
            received += len(chunk)
    after = _status_kib("VmRSS")

    assert received == BIG
    assert got.hexdigest() == expected.hexdigest()
    bound_kib = 40 * 1024  # generous: the file is 100 MiB
    assert after - before < bound_kib, f"RSS grew by {(after - before) // 1024} MiB"
    if peak_known:
        peak = _status_kib("VmHWM")
        assert peak - before < bound_kib, f"peak RSS grew by {(peak - before) // 1024} MiB"


async def test_client_that_goes_away_mid_download(any_env: WebEnv) -> None:
    token = await any_env.add_file(os.urandom(8 * MIB), filename="big.bin")
    host, port = any_env.base_url.removeprefix("http://").split(":")
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /d/{token}/file HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(64 * 1024)
        writer.transport.abort()
    # The server is still fine, and every aborted GET was counted once.
    async with any_env.session.get(any_env.file_url(token), headers={"Range": "bytes=-10"}) as resp:
        assert resp.status == 206
        assert len(await resp.read()) == 10
    async with any_env.session.get(f"{any_env.base_url}/healthz") as resp:
        assert resp.status == 200
    assert await any_env.download_count(token) == 3
