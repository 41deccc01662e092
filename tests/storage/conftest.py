"""Fixtures shared by the storage tests: the backends each contract runs on."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.interfaces import BlobStore, StateStore
from storage.local import LocalBlobStore
from tests.storage.backends import open_state_store

BLOB_BACKENDS = ["local"]
STATE_BACKENDS = ["sqlite", "redis"]


async def open_blob_store(name: str, tmp_path: Path) -> BlobStore:
    if name == "local":
        return LocalBlobStore(tmp_path / "blobs")
    raise ValueError(f"unknown blob backend {name!r}")


@dataclass(frozen=True)
class StateBackend:
    """One state backend's data location; each ``open`` is a fresh store on it."""

    name: str
    spec: str

    async def open(self) -> StateStore:
        return await open_state_store(self.spec)


@pytest.fixture(params=BLOB_BACKENDS)
async def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    store = await open_blob_store(str(request.param), tmp_path)
    yield store
    await store.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """Start a private redis-server on a free loopback port; wait until ready."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: the Redis backend cannot be tested")
    for _ in range(5):
        port = free_port()
        server = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        for line in server.stdout:  # readiness comes from the server's own log
            if "Ready to accept connections" in line:
                return server, f"redis://127.0.0.1:{port}/0"
        server.wait()  # the port was taken meanwhile: try another
        server.stdout.close()
    pytest.fail("redis-server did not start on any free port")


def stop_redis(server: subprocess.Popen[str]) -> None:
    server.terminate()
    server.wait()
    if server.stdout is not None:
        server.stdout.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole session (tests use distinct key prefixes)."""
    server, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop_redis(server)


@pytest.fixture(params=STATE_BACKENDS)
def state_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    name = str(request.param)
    if name == "sqlite":
        return StateBackend(name, f"sqlite:{tmp_path / 'state.db'}")
    if name == "redis":
        url = request.getfixturevalue("redis_url")
        # A fresh key prefix per test keeps tests apart on the shared server.
        return StateBackend(name, f"redis:{url}#t{uuid.uuid4().hex}:")
    raise ValueError(f"unknown state backend {name!r}")


@pytest.fixture
async def state_store(state_backend: StateBackend) -> AsyncIterator[StateStore]:
    store = await state_backend.open()
    yield store
    await store.close()
