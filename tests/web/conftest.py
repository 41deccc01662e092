"""Fixtures for the download service: real stores, a real server, a real client.

``web_env`` starts the application on a socket bound to 127.0.0.1:0 (bound
first, so the public URL carries the real port), with a LocalBlobStore and a
SqliteStateStore on ``tmp_path`` and a controllable clock.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from storage.interfaces import BlobInfo, BlobStore, LinkRecord, StateStore
from storage.local import LocalBlobStore
from storage.sqlite import SqliteStateStore
from tests.helpers.clock import FakeClock
from web.app import WebOptions, build_app
from web.links import LinkSigner, new_link_id

DAY = 86_400.0
KEYS = ["current-key-0123456789", "previous-key-9876543210"]


class PathlessBlobStore:
    """A real LocalBlobStore seen through a store that cannot hand out paths.

    The S3 backend (the store without local paths) does not exist yet; this
    wrapper makes the service take its streaming branch (``open_range``) over
    real files, which is the behaviour such a backend gets.
    """

    def __init__(self, inner: LocalBlobStore) -> None:
        self._inner = inner

    async def put(self, data: bytes) -> BlobInfo:
        return await self._inner.put(data)

    async def exists(self, digest: str) -> bool:
        return await self._inner.exists(digest)

    async def size(self, digest: str) -> int:
        return await self._inner.size(digest)

    def local_path(self, digest: str) -> Path | None:
        return None

    def open_range(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self._inner.open_range(digest, start, end)

    async def delete(self, digest: str) -> None:
        await self._inner.delete(digest)

    def iter_digests(self) -> AsyncIterator[tuple[str, float]]:
        return self._inner.iter_digests()

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class WebEnv:
    base_url: str
    state: SqliteStateStore
    blobs: BlobStore
    signer: LinkSigner
    clock: FakeClock
    session: aiohttp.ClientSession
    records: dict[str, LinkRecord] = field(default_factory=dict)

    async def add_file(
        self,
        data: bytes,
        *,
        filename: str = "report.pdf",
        content_type: str = "application/pdf",
        sender: str = "alice@example.com",
        expires_in: float = 30 * DAY,
    ) -> str:
        """Store ``data`` with a link record; return the signed token."""
        info = await self.blobs.put(data)
        record = LinkRecord(
            link_id=new_link_id(),
            blob_digest=info.digest,
            filename=filename,
            content_type=content_type,
            size=info.size,
            sender=sender,
            message_id="<m1@example.com>",
            created=self.clock(),
            expires=self.clock() + expires_in,
        )
        await self.state.add_links([record])
        token = self.signer.sign(record.link_id)
        self.records[token] = record
        return token

    def page_url(self, token: str) -> str:
        return f"{self.base_url}/d/{token}"

    def file_url(self, token: str) -> str:
        return f"{self.base_url}/d/{token}/file"

    async def download_count(self, token: str) -> int:
        record = await self.state.get_link(self.records[token].link_id)
        assert record is not None
        return record.download_count


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signer(clock: FakeClock) -> LinkSigner:
    return LinkSigner(KEYS, max_age=30 * DAY, clock=clock)


@pytest.fixture
def listen_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    yield sock
    sock.close()


async def _serve(
    sock: socket.socket,
    state: StateStore,
    blobs: BlobStore,
    signer: LinkSigner,
    clock: FakeClock,
) -> web.AppRunner:
    host, port = sock.getsockname()[:2]
    app = build_app(
        state, blobs, signer, WebOptions(public_url=f"http://{host}:{port}/", clock=clock)
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def make_env(
    tmp_path: Path,
    sock: socket.socket,
    signer: LinkSigner,
    clock: FakeClock,
    *,
    pathless: bool,
) -> AsyncIterator[WebEnv]:
    local = LocalBlobStore(tmp_path / "blobs", fsync=False)
    blobs: BlobStore = PathlessBlobStore(local) if pathless else local
    state = await SqliteStateStore.open(tmp_path / "state.db")
    runner = await _serve(sock, state, blobs, signer, clock)
    host, port = sock.getsockname()[:2]
    # A short or stalled body must fail the test, not hang it.
    session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield WebEnv(f"http://{host}:{port}", state, blobs, signer, clock, session)
    finally:
        await session.close()
        await runner.cleanup()
        await state.close()
        await blobs.close()


@pytest.fixture
async def web_env(
    tmp_path: Path, listen_socket: socket.socket, signer: LinkSigner, clock: FakeClock
) -> AsyncIterator[WebEnv]:
    async for env in make_env(tmp_path, listen_socket, signer, clock, pathless=False):
        yield env


@pytest.fixture(params=["sendfile", "stream"])
async def any_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    listen_socket: socket.socket,
    signer: LinkSigner,
    clock: FakeClock,
) -> AsyncIterator[WebEnv]:
    """The service over a local store (sendfile) and over a pathless one (stream)."""
    pathless = request.param == "stream"
    async for env in make_env(tmp_path, listen_socket, signer, clock, pathless=pathless):
        yield env
