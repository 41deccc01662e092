"""Blob store on a local directory, content-addressed by sha256.

A blob with digest ``abcd…`` lives at ``root/ab/cd/abcd…``; the path is derived
from the digest alone, after checking that the digest is exactly 64 lower-case
hex characters, and is checked to stay inside ``root``.

Writes are atomic: the bytes go to a temp file in the final directory, the file
is fsynced, renamed to its final name and the directory is fsynced, so the
final name only ever names complete content. Temp files start with ``.tmp-``
and are never reported by :meth:`LocalBlobStore.iter_digests`; a crash can leave
one behind and :meth:`LocalBlobStore.sweep_temp` removes old ones.

Every file operation runs in a worker thread (``asyncio.to_thread``), never on
the event loop. Files are created 0600 and directories 0700.

Errors raised (the root is :class:`storage.interfaces.StorageError`)::

    StorageError                 (I/O failure: disk full, permission, …)
     └── BlobNotFound
          └── InvalidDigest      (also a ValueError: not 64 lower-case hex chars)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from storage.interfaces import BlobInfo, BlobNotFound, StorageError

CHUNK_SIZE = 256 * 1024
TEMP_PREFIX = ".tmp-"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class InvalidDigest(BlobNotFound, ValueError):
    """The digest is not 64 lower-case hex characters; no blob can have it."""


def is_valid_digest(digest: str) -> bool:
    """True for exactly 64 lower-case hex characters."""
    return _DIGEST_RE.fullmatch(digest) is not None


def relative_blob_path(digest: str) -> Path:
    """``ab/cd/abcd…`` for a valid digest; raise InvalidDigest otherwise."""
    if not is_valid_digest(digest):
        raise InvalidDigest(f"not a sha256 hex digest: {digest[:80]!r}")
    return Path(digest[0:2], digest[2:4], digest)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """A :class:`storage.interfaces.BlobStore` on a directory of this host."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self._root = root.resolve(strict=True)
        self._fsync = fsync

    @property
    def root(self) -> Path:
        return self._root

    # --- paths -------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        path = self._root / relative_blob_path(digest)
        # The digest was validated above; this is the second, independent
        # guard against a path that would leave the root (e.g. a symlink).
        try:
            path.resolve().relative_to(self._root)
        except ValueError:
            raise InvalidDigest(f"blob path leaves the store: {digest!r}") from None
        return path

    def local_path(self, digest: str) -> Path:
        """The blob's path (whether or not it exists; the caller stats it)."""
        return self._path(digest)

    # --- writing -----------------------------------------------------------
    async def put(self, data: bytes) -> BlobInfo:
        return await asyncio.to_thread(self._put_sync, data)

    def _put_sync(self, data: bytes) -> BlobInfo:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        info = BlobInfo(digest=digest, size=len(data))
        try:
            try:
                existing = path.stat()
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISREG(existing.st_mode) and existing.st_size == len(data):
                    # Already stored: only refresh the mtime so that a gc
                    # running now keeps it through its grace period.
                    os.utime(path)
                    return info
            self._ensure_dirs(path.parent)
            self._write_atomically(path, data)
        except OSError as exc:
            raise StorageError(f"cannot store blob {digest}: {exc.strerror}") from exc
        return info

    def _ensure_dirs(self, directory: Path) -> None:
        created: list[Path] = []
        for part in (directory.parent, directory):
            try:
                part.mkdir(mode=_DIR_MODE)
            except FileExistsError:
                continue
            created.append(part)
        if self._fsync:
            # A new directory entry is durable only once its parent is synced.
            for part in created:
                _fsync_dir(part.parent)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(8)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        if self._fsync:
            _fsync_dir(path.parent)

    async def delete(self, digest: str) -> None:
        path = self._path(digest)
        await asyncio.to_thread(self._delete_sync, path)

    def _delete_sync(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete blob {path.name}: {exc.strerror}") from exc
        if self._fsync:
            with contextlib.suppress(OSError):
                _fsync_dir(path.parent)

    # --- reading -----------------------------------------------------------
    async def exists(self, digest: str) -> bool:
        if not is_valid_digest(digest):
            return False
        path = self._path(digest)
        return await asyncio.to_thread(path.is_file)

    async def size(self, digest: str) -> int:
        path = self._path(digest)
        return await asyncio.to_thread(self._size_sync, path)

    @staticmethod
    def _size_sync(path: Path) -> int:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BlobNotFound(path.name) from None
        except OSError as exc:
            raise StorageError(f"cannot stat blob {path.name}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(path.name)
        return st.st_size

    async def open_range(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` inclusive, in chunks of at most 256 KiB.

        Raise BlobNotFound when absent and ValueError when the range is not
        inside the blob (the caller answers 416 before asking).
        """
        path = self._path(digest)
        fd = await asyncio.to_thread(self._open_sync, path)
        try:
            size = await asyncio.to_thread(lambda: os.fstat(fd).st_size)
            if start < 0 or end < start or end >= size:
                raise ValueError(f"range {start}-{end} outside a blob of {size} bytes")
            offset = start
            while offset <= end:
                want = min(CHUNK_SIZE, end + 1 - offset)
                chunk = await asyncio.to_thread(os.pread, fd, want, offset)
                if not chunk:
                    raise StorageError(f"blob {digest} shrank while being read")
                offset += len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(os.close, fd)

    @staticmethod
    def _open_sync(path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise BlobNotFound(path.name) from None
        except OSError as exc:
            raise StorageError(f"cannot open blob {path.name}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BlobNotFound(path.name)
        return fd

    async def iter_digests(self) -> AsyncIterator[tuple[str, float]]:
        """Every complete blob with its mtime; temp files and strays are skipped.

        The tree is listed one top-level directory per thread call, so memory
        stays bounded by one 1/256th of the store.
        """
        tops = await asyncio.to_thread(self._list_fanout, self._root)
        for top in tops:
            found = await asyncio.to_thread(self._scan_top, top)
            for item in found:
                yield item

    @staticmethod
    def _list_fanout(directory: Path) -> list[Path]:
        try:
            with os.scandir(directory) as entries:
                names = [
                    e.name
                    for e in entries
                    if _FANOUT_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {directory.name}: {exc.strerror}") from exc
        return [directory / name for name in sorted(names)]

    @classmethod
    def _scan_top(cls, top: Path) -> list[tuple[str, float]]:
        found: list[tuple[str, float]] = []
        for sub in cls._list_fanout(top):
            prefix = top.name + sub.name
            try:
                with os.scandir(sub) as entries:
                    for entry in entries:
                        name = entry.name
                        if not (is_valid_digest(name) and name.startswith(prefix)):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted while we were listing
                        if stat.S_ISREG(st.st_mode):
                            found.append((name, st.st_mtime))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot list {sub}: {exc.strerror}") from exc
        found.sort()
        return found

    # --- housekeeping ------------------------------------------------------
    async def sweep_temp(self, now: float, older_than: float) -> int:
        """Remove temp files a crash left behind whose mtime is at least
        ``older_than`` seconds before ``now``; return how many were removed."""
        return await asyncio.to_thread(self._sweep_temp_sync, now - older_than)

    def _sweep_temp_sync(self, cutoff: float) -> int:
        removed = 0
        for top in self._list_fanout(self._root):
            for sub in self._list_fanout(top):
                try:
                    with os.scandir(sub) as entries:
                        stale = [
                            Path(e.path)
                            for e in entries
                            if e.name.startswith(TEMP_PREFIX)
                            and e.stat(follow_symlinks=False).st_mtime <= cutoff
                        ]
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StorageError(f"cannot list {sub}: {exc.strerror}") from exc
                for path in stale:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        return removed

    async def close(self) -> None:
        """Nothing to release: every file is closed when its call ends."""
