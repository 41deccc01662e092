"""The contract every BlobStore backend keeps (run once per backend)."""

from __future__ import annotations

import hashlib
import os

import pytest

from storage.interfaces import BlobNotFound, BlobStore

BAD_DIGESTS = [
    "../x",
    "/",
    "",
    "a" * 63,
    "a" * 65,
    "A" * 64,
    hashlib.sha256(b"x").hexdigest().upper(),
    "g" * 64,
    "../" + "a" * 61,
    "ab/cd/" + "a" * 58,
    "a" * 63 + "\n",
]


async def read_range(store: BlobStore, digest: str, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in store.open_range(digest, start, end)]


async def listed(store: BlobStore) -> dict[str, float]:
    return {digest: mtime async for digest, mtime in store.iter_digests()}


class TestBlobStoreContract:
    @pytest.fixture
    def store(self, blob_store: BlobStore) -> BlobStore:
        return blob_store

    async def test_put_returns_the_sha256_and_size(self, store: BlobStore) -> None:
        data = b"attachment bytes\x00\xff" * 100
        info = await store.put(data)
        assert info.digest == hashlib.sha256(data).hexdigest()
        assert info.size == len(data)
        assert await store.exists(info.digest)
        assert await store.size(info.digest) == len(data)
        assert b"".join(await read_range(store, info.digest, 0, len(data) - 1)) == data

    async def test_same_bytes_are_stored_once(self, store: BlobStore) -> None:
        first = await store.put(b"same file")
        second = await store.put(b"same file")
        other = await store.put(b"another file")
        assert first == second
        assert other.digest != first.digest
        assert sorted(await listed(store)) == sorted([first.digest, other.digest])

    async def test_empty_blob(self, store: BlobStore) -> None:
        info = await store.put(b"")
        assert info.size == 0
        assert await store.size(info.digest) == 0
        assert list(await listed(store)) == [info.digest]

    @pytest.mark.parametrize("digest", BAD_DIGESTS)
    async def test_bad_digests_are_refused(self, store: BlobStore, digest: str) -> None:
        await store.put(b"something stored")
        assert not await store.exists(digest)
        with pytest.raises(BlobNotFound):
            await store.size(digest)
        with pytest.raises(BlobNotFound):
            await read_range(store, digest, 0, 0)
        with pytest.raises((BlobNotFound, ValueError)):
            await store.delete(digest)
        assert len(await listed(store)) == 1

    async def test_absent_digest(self, store: BlobStore) -> None:
        digest = hashlib.sha256(b"never stored").hexdigest()
        assert not await store.exists(digest)
        with pytest.raises(BlobNotFound):
            await store.size(digest)
        with pytest.raises(BlobNotFound):
            await read_range(store, digest, 0, 0)
        await store.delete(digest)  # deleting what is absent is not an error

    @pytest.mark.parametrize(
        ("start", "end"),
        [
            (0, 0),
            (0, 700 * 1024 - 1),
            (1, 2),
            (256 * 1024 - 1, 256 * 1024),
            (256 * 1024, 512 * 1024 - 1),
            (100_000, 600_000),
            (700 * 1024 - 1, 700 * 1024 - 1),
        ],
    )
    async def test_ranges(self, store: BlobStore, start: int, end: int) -> None:
        data = os.urandom(700 * 1024)
        info = await store.put(data)
        chunks = await read_range(store, info.digest, start, end)
        assert b"".join(chunks) == data[start : end + 1]
        assert all(0 < len(chunk) <= 256 * 1024 for chunk in chunks)

    @pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, 100), (100, 100)])
    async def test_ranges_outside_the_blob_are_refused(
        self, store: BlobStore, start: int, end: int
    ) -> None:
        info = await store.put(b"x" * 100)
        with pytest.raises(ValueError, match="range"):
            await read_range(store, info.digest, start, end)

    async def test_delete(self, store: BlobStore) -> None:
        keep = await store.put(b"keep me")
        gone = await store.put(b"delete me")
        await store.delete(gone.digest)
        assert not await store.exists(gone.digest)
        assert await store.exists(keep.digest)
        assert list(await listed(store)) == [keep.digest]
        with pytest.raises(BlobNotFound):
            await store.size(gone.digest)
        await store.delete(gone.digest)
        again = await store.put(b"delete me")
        assert again == gone
        assert await store.exists(gone.digest)

    async def test_iter_digests_lists_every_blob_with_its_mtime(self, store: BlobStore) -> None:
        infos = [await store.put(f"blob {i}".encode()) for i in range(40)]
        found = await listed(store)
        assert sorted(found) == sorted(info.digest for info in infos)
        assert all(mtime > 0 for mtime in found.values())
