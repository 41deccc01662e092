"""Fixtures shared by the storage tests: the backends each contract runs on."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
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
