"""What only the directory blob store promises: layout, modes, atomic writes."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.interfaces import BlobNotFound, StorageError
from storage.local import TEMP_PREFIX, InvalidDigest, LocalBlobStore, relative_blob_path


async def listed(store: LocalBlobStore) -> dict[str, float]:
    return {digest: mtime async for digest, mtime in store.iter_digests()}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_layout_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "new" / "blobs"
    store = LocalBlobStore(root)
    assert mode(root) == 0o700
    info = await store.put(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    path = root / digest[:2] / digest[2:4] / digest
    assert store.local_path(info.digest) == path
    assert path.read_bytes() == b"hello"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert mode(path.parent.parent) == 0o700
    assert files_under(root) == [path]


async def test_same_bytes_make_one_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for _ in range(3):
        await store.put(b"twice and thrice")
    assert len(files_under(tmp_path)) == 1


def test_relative_path_is_derived_from_the_digest_only() -> None:
    digest = "0123456789abcdef" * 4
    assert relative_blob_path(digest) == Path("01", "23", digest)
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63):
        with pytest.raises(InvalidDigest):
            relative_blob_path(bad)
    assert issubclass(InvalidDigest, ValueError)
    assert issubclass(InvalidDigest, BlobNotFound)


async def test_bad_digest_touches_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    outside = tmp_path / "x"
    outside.write_bytes(b"not a blob")
    store = LocalBlobStore(root)
    with pytest.raises(InvalidDigest):
        await store.delete("../x")
    with pytest.raises(InvalidDigest):
        store.local_path("../x")
    assert outside.read_bytes() == b"not a blob"


async def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = LocalBlobStore(root)
    digest = hashlib.sha256(b"target").hexdigest()
    (elsewhere / digest).write_bytes(b"target")
    (root / digest[:2]).mkdir()
    (root / digest[:2] / digest[2:4]).symlink_to(elsewhere)
    with pytest.raises(InvalidDigest):
        store.local_path(digest)
    with pytest.raises(BlobNotFound):
        await store.size(digest)
    assert await listed(store) == {}


async def test_rename_only_ever_names_complete_synced_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spies on the real os functions (they still run): the only way to see
    # the moment of the rename from outside the store.
    store = LocalBlobStore(tmp_path)
    data = os.urandom(3 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    final = store.local_path(digest)
    synced: list[int] = []
    seen: list[tuple[str, bool, bytes]] = []
    real_fsync: Callable[[int], None] = os.fsync
    real_replace = os.replace

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        src_path, dst_path = Path(src), Path(dst)
        assert src_path.stat().st_ino in synced
        seen.append((src_path.name, dst_path.exists(), src_path.read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await store.put(data)
    monkeypatch.undo()

    [(temp_name, final_existed, content)] = seen
    assert temp_name.startswith(TEMP_PREFIX)
    assert temp_name != digest
    assert not final_existed
    assert content == data
    assert final.read_bytes() == data
    assert [p.name for p in final.parent.iterdir()] == [digest]


async def test_a_crash_leaves_a_temp_file_that_is_never_listed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"complete content" * 1000
    digest = hashlib.sha256(data).hexdigest()
    directory = tmp_path / digest[:2] / digest[2:4]
    directory.mkdir(parents=True)
    temp = directory / f"{TEMP_PREFIX}{digest}-deadbeef"
    temp.write_bytes(data[:100])  # the crash: written halfway, never renamed
    assert not await store.exists(digest)
    assert await listed(store) == {}

    await store.put(data)
    assert store.local_path(digest).read_bytes() == data
    assert list(await listed(store)) == [digest]

    os.utime(temp, (1_000.0, 1_000.0))
    assert await store.sweep_temp(now=1_500.0, older_than=600.0) == 0
    assert temp.exists()
    assert await store.sweep_temp(now=1_600.0, older_than=600.0) == 1
    assert not temp.exists()
    assert store.local_path(digest).read_bytes() == data


async def test_strays_in_the_tree_are_not_listed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    info = await store.put(b"real")
    (tmp_path / "README").write_text("not a blob")
    (tmp_path / "zz").mkdir()
    (tmp_path / info.digest[:2] / info.digest[2:4] / ("f" * 64)).write_bytes(b"misplaced")
    assert list(await listed(store)) == [info.digest]


async def test_storing_again_refreshes_the_mtime(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    info = await store.put(b"old file")
    path = store.local_path(info.digest)
    os.utime(path, (1_000.0, 1_000.0))
    assert (await listed(store))[info.digest] == 1_000.0
    await store.put(b"old file")
    assert (await listed(store))[info.digest] > 1_000.0


async def test_a_damaged_blob_is_rewritten(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    info = await store.put(b"the whole file")
    path = store.local_path(info.digest)
    path.write_bytes(b"the wh")
    await store.put(b"the whole file")
    assert path.read_bytes() == b"the whole file"


async def test_io_failure_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)
    digest = hashlib.sha256(b"blocked").hexdigest()
    (tmp_path / digest[:2]).write_bytes(b"a file where a directory belongs")
    with pytest.raises(StorageError) as caught:
        await store.put(b"blocked")
    assert not isinstance(caught.value, BlobNotFound)
    assert isinstance(caught.value.__cause__, OSError)


async def test_without_fsync_the_content_is_the_same(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)
    info = await store.put(b"fast path")
    assert store.local_path(info.digest).read_bytes() == b"fast path"
    await store.delete(info.digest)
    assert not await store.exists(info.digest)
