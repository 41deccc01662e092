"""The two storage interfaces every backend implements.

``BlobStore`` keeps attachment bytes, content-addressed by sha256.
``StateStore`` keeps everything else that must survive a restart: link
records, sliding-window counters, account flags, IP bans, notification
de-duplication and single-use tokens.

Every method takes the current time from its caller (``now``, seconds since
the epoch) so that tests drive a controllable clock instead of sleeping.

Exception tree::

    StorageError
     ├── BlobNotFound
     └── StateUnavailable      (locked past the timeout, unwritable, server gone)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

WINDOW_SLACK = 300.0
"""Seconds a sliding-window event is kept past the longest window asked for,
so that a caller whose ``now`` is a little older than the last writer's (it
read its clock, then waited for the lock) still finds the events it counts."""


class StorageError(Exception):
    """Root of every error raised by a storage backend."""


class BlobNotFound(StorageError):
    """No blob with that digest."""


class StateUnavailable(StorageError):
    """The state backend could not complete an operation (fail closed)."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str  # lower-case hex sha256
    size: int


class BlobStore(Protocol):
    async def put(self, data: bytes) -> BlobInfo:
        """Store ``data`` durably (temp file, fsync file and directory, rename).

        Storing bytes that are already present is cheap and returns the same
        digest.
        """

    async def exists(self, digest: str) -> bool: ...

    async def size(self, digest: str) -> int:
        """Raise BlobNotFound when absent."""

    def local_path(self, digest: str) -> Path | None:
        """A path a web server may sendfile from, or None for remote stores."""

    def open_range(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` inclusive, in chunks."""

    async def delete(self, digest: str) -> None: ...

    def iter_digests(self) -> AsyncIterator[tuple[str, float]]:
        """Every stored digest with its modification time (for gc)."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LinkRecord:
    link_id: str
    blob_digest: str
    filename: str  # the original (decoded) name as the sender gave it
    content_type: str
    size: int
    sender: str  # account address
    message_id: str
    created: float
    expires: float
    revoked: bool = False
    download_count: int = 0
    last_download: float | None = None


@dataclass(frozen=True, slots=True)
class AccountState:
    account: str
    frozen: bool = False
    frozen_reason: str = ""
    frozen_at: float | None = None
    disabled: bool = False  # disabled at runtime (not the config flag)


@dataclass(frozen=True, slots=True)
class Ban:
    ip: str
    until: float
    reason: str
    created: float


@dataclass(frozen=True, slots=True)
class Notification:
    kind: str
    subject: str
    recipient: str
    sent_at: float
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GcResult:
    expired_records: int
    orphan_digests: list[str]


class StateStore(Protocol):
    # --- link records -------------------------------------------------
    async def add_links(self, records: Sequence[LinkRecord]) -> None:
        """Insert all records in one durable transaction."""

    async def get_link(self, link_id: str) -> LinkRecord | None: ...

    async def delete_links(self, link_ids: Sequence[str]) -> None:
        """Remove records (used when the next hop refused the message)."""

    async def revoke_link(self, link_id: str) -> bool:
        """True when the link existed."""

    async def record_download(self, link_id: str, now: float) -> None: ...

    async def links_for_message(self, message_id: str) -> list[LinkRecord]: ...

    async def gc(self, now: float) -> GcResult:
        """Delete expired records; return digests that no record references."""

    async def referenced(self, digest: str) -> bool: ...

    async def account_usage(self, account: str) -> int:
        """Bytes of live (unexpired, unrevoked) links the account holds."""

    async def recalc_usage(self, now: float) -> dict[str, int]: ...

    # --- sliding windows ----------------------------------------------
    async def add_and_count(
        self, key: str, amount: int, now: float, windows: Sequence[float]
    ) -> list[int]:
        """Atomically record ``amount`` at ``now`` and return the totals over
        each window (seconds back from ``now``), the new amount included.

        An event at ``t`` counts in window ``w`` while ``now - w < t``. Every
        caller of one key passes the same windows: a call forgets the key's
        events older than its longest window plus ``WINDOW_SLACK``. The cost
        must not grow with the number of events in a window (a busy account
        holds tens of thousands per hour)."""

    async def count(self, key: str, now: float, window: float) -> int: ...

    async def reset_counter(self, key: str) -> None: ...

    # --- metrics -----------------------------------------------------------
    async def add_counters(self, deltas: Mapping[str, int]) -> None:
        """Add each amount to the counter of that name (created at 0)."""

    async def counters(self) -> dict[str, int]:
        """Every counter and its value."""

    # --- account flags -------------------------------------------------
    async def get_account_state(self, account: str) -> AccountState: ...

    async def freeze(self, account: str, reason: str, now: float) -> bool:
        """True when the account was not frozen before (first freezer wins)."""

    async def unfreeze(self, account: str) -> bool: ...

    async def list_account_states(self) -> list[AccountState]: ...

    # --- bans ------------------------------------------------------------
    async def ban(self, ip: str, until: float, reason: str, now: float) -> None: ...

    async def lift_ban(self, ip: str) -> bool: ...

    async def is_banned(self, ip: str, now: float) -> bool: ...

    async def list_bans(self, now: float) -> list[Ban]: ...

    # --- notifications and tokens ----------------------------------------
    async def claim_once(self, key: str, until: float, now: float) -> bool:
        """True for the first caller per ``key`` until ``until`` (de-duplication
        of notifications and single-use tokens alike)."""

    async def log_notification(self, note: Notification) -> None: ...

    async def recent_notifications(self, limit: int) -> list[Notification]: ...

    async def close(self) -> None: ...
