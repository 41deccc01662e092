"""State store in one SQLite file, safe for several worker processes on a host.

Each store owns one connection, created and used only by one dedicated worker
thread (a ``ThreadPoolExecutor`` with one worker), so calls are serialised and
never block the event loop. Several processes may open the same file: the
database is in WAL mode and every write is a ``BEGIN IMMEDIATE`` transaction,
which takes the write lock up front (waiting up to ``busy_timeout``), so a
read-modify-write such as :meth:`SqliteStateStore.add_and_count` is atomic
across processes.

Durability: link records, account flags, bans, claims and notifications are
committed with ``synchronous=FULL`` (on disk before the call returns, so
before the message leaves). Sliding-window events and download counts use
``synchronous=NORMAL``: in WAL mode a power cut may lose the last few of
them, never corrupt the file.

Choices this backend makes where the interface leaves room:

* ``account_usage`` is the sum of ``size`` over the account's link records that
  are neither revoked nor removed by ``gc``; a file sent twice counts twice,
  since that is what the sender used. The sum is kept in a table updated in
  the same transaction as the records; ``recalc_usage(now)`` rebuilds it from
  the records live at ``now`` (this also drops expired records that ``gc``
  has not removed yet).
* ``gc(now)`` deletes records with ``expires <= now``. Revoked records stay
  until they expire (so a revoked link keeps answering "revoked"), but they
  no longer hold their blob: the orphan digests returned are those of the
  deleted and the revoked records that no unrevoked record references. A
  revoked record's digest is reported on every run until the record expires;
  deleting a blob twice is harmless. ``gc`` also removes expired bans and
  claims.
* ``add_and_count`` keeps a running total per key and window (table
  ``windows``: the sum of the events after an edge, ``now - w`` at the last
  call). A call adds its event, then moves each edge and subtracts the events
  that left; each event is read once per window on the way out, so the cost
  does not grow with the number of events in the window (a count over all
  of them took 0.5 ms at 5,000 events and 1.6 ms at 20,000). It prunes the
  key's events older than the longest window asked for (plus
  ``WINDOW_SLACK``), and drops the totals of windows not asked for, so every
  caller of one key must pass the same windows. ``gc`` removes the keys that
  nobody added to for longer than their longest window plus the slack. An event at time ``t`` is
  inside a window ``w`` at ``now`` when ``now - w < t``: it leaves the window
  at exactly ``t + w``.
* ``recent_notifications`` lists the newest first.
* ``list_account_states`` lists only accounts that are frozen or disabled.

Errors (the root is :class:`storage.interfaces.StorageError`): every sqlite
error — locked past ``busy_timeout``, disk I/O error, read-only file, corrupt
file, a schema newer than this code — and any call after ``close`` is raised
as :class:`storage.interfaces.StateUnavailable` with the original error as
``__cause__``::

    StorageError
     └── StateUnavailable
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from storage.interfaces import (
    WINDOW_SLACK,
    AccountState,
    Ban,
    GcResult,
    LinkRecord,
    Notification,
    StateUnavailable,
)

T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    for statement in (
        """CREATE TABLE links (
            link_id TEXT PRIMARY KEY,
            blob_digest TEXT NOT NULL,
            filename TEXT NOT NULL,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0,
            download_count INTEGER NOT NULL DEFAULT 0,
            last_download REAL
        )""",
        "CREATE INDEX links_blob ON links (blob_digest, revoked)",
        "CREATE INDEX links_message ON links (message_id)",
        "CREATE INDEX links_expires ON links (expires)",
        "CREATE TABLE usage (account TEXT PRIMARY KEY, bytes INTEGER NOT NULL)",
        "CREATE TABLE events (key TEXT NOT NULL, ts REAL NOT NULL, amount INTEGER NOT NULL)",
        "CREATE INDEX events_key_ts ON events (key, ts)",
        """CREATE TABLE accounts (
            account TEXT PRIMARY KEY,
            frozen INTEGER NOT NULL DEFAULT 0,
            frozen_reason TEXT NOT NULL DEFAULT '',
            frozen_at REAL,
            disabled INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE bans (
            ip TEXT PRIMARY KEY,
            until REAL NOT NULL,
            reason TEXT NOT NULL,
            created REAL NOT NULL
        )""",
        "CREATE TABLE claims (key TEXT PRIMARY KEY, until REAL NOT NULL)",
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            recipient TEXT NOT NULL,
            sent_at REAL NOT NULL,
            details TEXT NOT NULL
        )""",
    ):
        conn.execute(statement)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    # Running totals of the sliding windows (see add_and_count); rows are
    # created on a key's next event, from the events still stored.
    conn.execute(
        """CREATE TABLE windows (
            key TEXT NOT NULL,
            span REAL NOT NULL,
            total INTEGER NOT NULL,
            edge REAL NOT NULL,
            PRIMARY KEY (key, span)
        )"""
    )


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")


# MIGRATIONS[i] takes the schema from version i to version i + 1. A new
# version is one more function appended here; never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (_migrate_to_1, _migrate_to_2, _migrate_to_3)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in the database, 0 for a new file."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the schema to ``len(migrations)`` in one immediate transaction.

    Safe when several processes open a new file at once: the first takes the
    write lock and migrates, the others then find the work done. Raise
    StateUnavailable when the file is newer than the code.
    """
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        current = schema_version(conn)
        if current > target:
            raise StateUnavailable(
                f"state database has schema version {current}; this code knows up to {target}"
            )
        for version in range(current, target):
            migrations[version](conn)
        conn.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (target,),
        )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return target


def _link_from_row(row: sqlite3.Row) -> LinkRecord:
    return LinkRecord(
        link_id=row["link_id"],
        blob_digest=row["blob_digest"],
        filename=row["filename"],
        content_type=row["content_type"],
        size=row["size"],
        sender=row["sender"],
        message_id=row["message_id"],
        created=row["created"],
        expires=row["expires"],
        revoked=bool(row["revoked"]),
        download_count=row["download_count"],
        last_download=row["last_download"],
    )


def _account_from_row(row: sqlite3.Row) -> AccountState:
    return AccountState(
        account=row["account"],
        frozen=bool(row["frozen"]),
        frozen_reason=row["frozen_reason"],
        frozen_at=row["frozen_at"],
        disabled=bool(row["disabled"]),
    )


def _add_usage(conn: sqlite3.Connection, account: str, delta: int) -> None:
    conn.execute(
        "INSERT INTO usage (account, bytes) VALUES (?, ?)"
        " ON CONFLICT (account) DO UPDATE SET bytes = max(0, bytes + excluded.bytes)",
        (account, delta),
    )


def _release_usage(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> None:
    """Subtract the sizes of the unrevoked links matching ``where``."""
    rows = conn.execute(
        f"SELECT sender, sum(size) FROM links WHERE revoked = 0 AND ({where}) GROUP BY sender",  # noqa: S608 -- where is a constant of this module
        params,
    ).fetchall()
    for sender, total in rows:
        _add_usage(conn, sender, -int(total))


class SqliteStateStore:
    """A :class:`storage.interfaces.StateStore` in one SQLite file."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        """Use :meth:`open`; the connection belongs to the executor's thread."""
        self._executor = executor
        self._conn = conn
        self._synchronous = "FULL"
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, busy_timeout: float = 5.0) -> SqliteStateStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attachgate-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, busy_timeout)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise StateUnavailable(f"cannot open state database: {exc}") from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    # --- plumbing ------------------------------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StateUnavailable("state store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._guarded, fn)
        except RuntimeError as exc:  # the executor was shut down meanwhile
            raise StateUnavailable("state store is closed") from exc

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state database: {exc}") from exc

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> Callable[[sqlite3.Connection], T]:
        """Wrap ``fn`` in a BEGIN IMMEDIATE … COMMIT transaction (worker thread)."""

        def run(conn: sqlite3.Connection) -> T:
            wanted = "FULL" if durable else "NORMAL"
            if self._synchronous != wanted:
                conn.execute(f"PRAGMA synchronous = {wanted}")
                self._synchronous = wanted
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return result

        return run

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    # --- link records ------------------------------------------------------
    async def add_links(self, records: Sequence[LinkRecord]) -> None:
        rows = [
            (
                r.link_id,
                r.blob_digest,
                r.filename,
                r.content_type,
                r.size,
                r.sender,
                r.message_id,
                r.created,
                r.expires,
                int(r.revoked),
                r.download_count,
                r.last_download,
            )
            for r in records
        ]
        if not rows:
            return

        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO links (link_id, blob_digest, filename, content_type, size,"
                " sender, message_id, created, expires, revoked, download_count,"
                " last_download) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            totals: dict[str, int] = {}
            for r in records:
                if not r.revoked:
                    totals[r.sender] = totals.get(r.sender, 0) + r.size
            for account, total in totals.items():
                _add_usage(conn, account, total)

        await self._call(self._write(add))

    async def get_link(self, link_id: str) -> LinkRecord | None:
        def get(conn: sqlite3.Connection) -> LinkRecord | None:
            row = conn.execute("SELECT * FROM links WHERE link_id = ?", (link_id,)).fetchone()
            return None if row is None else _link_from_row(row)

        return await self._call(get)

    async def delete_links(self, link_ids: Sequence[str]) -> None:
        ids = list(link_ids)
        if not ids:
            return

        def delete(conn: sqlite3.Connection) -> None:
            for link_id in ids:
                _release_usage(conn, "link_id = ?", (link_id,))
                conn.execute("DELETE FROM links WHERE link_id = ?", (link_id,))

        await self._call(self._write(delete))

    async def revoke_link(self, link_id: str) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT revoked FROM links WHERE link_id = ?", (link_id,)).fetchone()
            if row is None:
                return False
            if not row["revoked"]:
                _release_usage(conn, "link_id = ?", (link_id,))
                conn.execute("UPDATE links SET revoked = 1 WHERE link_id = ?", (link_id,))
            return True

        return await self._call(self._write(revoke))

    async def record_download(self, link_id: str, now: float) -> None:
        def record(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE links SET download_count = download_count + 1, last_download = ?"
                " WHERE link_id = ?",
                (now, link_id),
            )

        await self._call(self._write(record, durable=False))

    async def links_for_message(self, message_id: str) -> list[LinkRecord]:
        def select(conn: sqlite3.Connection) -> list[LinkRecord]:
            rows = conn.execute(
                "SELECT * FROM links WHERE message_id = ? ORDER BY created, link_id",
                (message_id,),
            ).fetchall()
            return [_link_from_row(row) for row in rows]

        return await self._call(select)

    async def gc(self, now: float) -> GcResult:
        def collect(conn: sqlite3.Connection) -> GcResult:
            candidates = {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT blob_digest FROM links WHERE expires <= ? OR revoked = 1",
                    (now,),
                )
            }
            _release_usage(conn, "expires <= ?", (now,))
            expired = conn.execute("DELETE FROM links WHERE expires <= ?", (now,)).rowcount
            conn.execute("DELETE FROM bans WHERE until <= ?", (now,))
            conn.execute("DELETE FROM claims WHERE until <= ?", (now,))
            # Sliding-window keys nobody added to for longer than their longest
            # window plus the slack (an address that failed to log in once):
            # every event they hold is out of every window.
            idle = (
                "SELECT key FROM windows GROUP BY key HAVING max(edge + span) + max(span) + ? <= ?"
            )
            conn.execute(f"DELETE FROM events WHERE key IN ({idle})", (WINDOW_SLACK, now))  # noqa: S608 -- constant
            conn.execute(f"DELETE FROM windows WHERE key IN ({idle})", (WINDOW_SLACK, now))  # noqa: S608 -- constant
            orphans = sorted(
                digest
                for digest in candidates
                if conn.execute(
                    "SELECT 1 FROM links WHERE blob_digest = ? AND revoked = 0 LIMIT 1",
                    (digest,),
                ).fetchone()
                is None
            )
            return GcResult(expired_records=expired, orphan_digests=orphans)

        return await self._call(self._write(collect))

    async def referenced(self, digest: str) -> bool:
        def check(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM links WHERE blob_digest = ? AND revoked = 0 LIMIT 1", (digest,)
            ).fetchone()
            return row is not None

        return await self._call(check)

    async def account_usage(self, account: str) -> int:
        def usage(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT bytes FROM usage WHERE account = ?", (account,)).fetchone()
            return 0 if row is None else int(row[0])

        return await self._call(usage)

    async def recalc_usage(self, now: float) -> dict[str, int]:
        def recalc(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT sender, sum(size) FROM links WHERE revoked = 0 AND expires > ?"
                " GROUP BY sender ORDER BY sender",
                (now,),
            ).fetchall()
            totals = {str(sender): int(total) for sender, total in rows}
            conn.execute("DELETE FROM usage")
            conn.executemany("INSERT INTO usage (account, bytes) VALUES (?, ?)", totals.items())
            return totals

        return await self._call(self._write(recalc))

    # --- sliding windows ---------------------------------------------------
    async def add_and_count(
        self, key: str, amount: int, now: float, windows: Sequence[float]
    ) -> list[int]:
        spans = [float(w) for w in windows]
        if not spans or min(spans) <= 0:
            raise ValueError("add_and_count needs at least one positive window")
        unique = sorted(set(spans))
        marks = ",".join("?" for _ in unique)
        stale = f"DELETE FROM windows WHERE key = ? AND span NOT IN ({marks})"  # noqa: S608 -- only placeholders

        def between(conn: sqlite3.Connection, low: float, high: float) -> int:
            """The sum of the key's amounts with ``low < ts <= high``."""
            row = conn.execute(
                "SELECT coalesce(sum(amount), 0) FROM events WHERE key = ? AND ts > ? AND ts <= ?",
                (key, low, high),
            ).fetchone()
            return int(row[0])

        def add(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "INSERT INTO events (key, ts, amount) VALUES (?, ?, ?)", (key, now, amount)
            )
            saved = {
                float(span): (int(total), float(edge))
                for span, total, edge in conn.execute(
                    "SELECT span, total, edge FROM windows WHERE key = ?", (key,)
                )
            }
            totals: dict[float, int] = {}
            for span in unique:
                edge = now - span
                if span in saved:
                    # The row holds the sum of the events after its edge; the new
                    # event joins it, then the edge moves to now - span.
                    total, old_edge = saved[span]
                    if now > old_edge:
                        total += amount
                    if edge > old_edge:
                        total -= between(conn, old_edge, edge)
                    elif edge < old_edge:
                        total += between(conn, edge, old_edge)
                else:
                    total = between(conn, edge, float("inf"))
                totals[span] = total
            conn.executemany(
                "INSERT INTO windows (key, span, total, edge) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key, span) DO UPDATE"
                " SET total = excluded.total, edge = excluded.edge",
                [(key, span, totals[span], now - span) for span in unique],
            )
            if saved.keys() - totals.keys():
                conn.execute(stale, (key, *unique))
            conn.execute(
                "DELETE FROM events WHERE key = ? AND ts <= ?",
                (key, now - unique[-1] - WINDOW_SLACK),
            )
            return [totals[span] for span in spans]

        return await self._call(self._write(add, durable=False))

    async def count(self, key: str, now: float, window: float) -> int:
        def total(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT coalesce(sum(amount), 0) FROM events WHERE key = ? AND ts > ?",
                (key, now - window),
            ).fetchone()
            return int(row[0])

        return await self._call(total)

    async def reset_counter(self, key: str) -> None:
        def reset(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE key = ?", (key,))
            conn.execute("DELETE FROM windows WHERE key = ?", (key,))

        await self._call(self._write(reset, durable=False))

    # --- metrics -----------------------------------------------------------------
    async def add_counters(self, deltas: Mapping[str, int]) -> None:
        rows = list(deltas.items())

        def add(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                rows,
            )

        if rows:
            await self._call(self._write(add, durable=False))

    async def counters(self) -> dict[str, int]:
        def select(conn: sqlite3.Connection) -> dict[str, int]:
            return {
                str(name): int(value)
                for name, value in conn.execute("SELECT name, value FROM counters")
            }

        return await self._call(select)

    # --- account flags ---------------------------------------------------------
    async def get_account_state(self, account: str) -> AccountState:
        def get(conn: sqlite3.Connection) -> AccountState:
            row = conn.execute("SELECT * FROM accounts WHERE account = ?", (account,)).fetchone()
            return AccountState(account=account) if row is None else _account_from_row(row)

        return await self._call(get)

    async def freeze(self, account: str, reason: str, now: float) -> bool:
        def freeze(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO accounts (account, frozen, frozen_reason, frozen_at)"
                " VALUES (?, 1, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET frozen = 1,"
                " frozen_reason = excluded.frozen_reason, frozen_at = excluded.frozen_at"
                " WHERE frozen = 0",
                (account, reason, now),
            )
            return cursor.rowcount == 1

        return await self._call(self._write(freeze))

    async def unfreeze(self, account: str) -> bool:
        def unfreeze(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE accounts SET frozen = 0, frozen_reason = '', frozen_at = NULL"
                " WHERE account = ? AND frozen = 1",
                (account,),
            )
            return cursor.rowcount == 1

        return await self._call(self._write(unfreeze))

    async def set_disabled(self, account: str, disabled: bool) -> bool:
        """Disable or enable an account at runtime; True when this changed it.

        Not part of the StateStore interface (which has no setter for
        ``AccountState.disabled``).
        """

        def update(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT disabled FROM accounts WHERE account = ?", (account,)
            ).fetchone()
            if bool(row is not None and row["disabled"]) == disabled:
                return False
            conn.execute(
                "INSERT INTO accounts (account, disabled) VALUES (?, ?)"
                " ON CONFLICT (account) DO UPDATE SET disabled = excluded.disabled",
                (account, int(disabled)),
            )
            return True

        return await self._call(self._write(update))

    async def list_account_states(self) -> list[AccountState]:
        def select(conn: sqlite3.Connection) -> list[AccountState]:
            rows = conn.execute(
                "SELECT * FROM accounts WHERE frozen = 1 OR disabled = 1 ORDER BY account"
            ).fetchall()
            return [_account_from_row(row) for row in rows]

        return await self._call(select)

    # --- bans ----------------------------------------------------------------
    async def ban(self, ip: str, until: float, reason: str, now: float) -> None:
        def ban(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO bans (ip, until, reason, created) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (ip) DO UPDATE SET until = excluded.until,"
                " reason = excluded.reason, created = excluded.created",
                (ip, until, reason, now),
            )

        await self._call(self._write(ban))

    async def lift_ban(self, ip: str) -> bool:
        def lift(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM bans WHERE ip = ?", (ip,)).rowcount == 1

        return await self._call(self._write(lift))

    async def is_banned(self, ip: str, now: float) -> bool:
        def check(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM bans WHERE ip = ? AND until > ?", (ip, now)
            ).fetchone()
            return row is not None

        return await self._call(check)

    async def list_bans(self, now: float) -> list[Ban]:
        def select(conn: sqlite3.Connection) -> list[Ban]:
            rows = conn.execute(
                "SELECT ip, until, reason, created FROM bans WHERE until > ? ORDER BY ip", (now,)
            ).fetchall()
            return [
                Ban(ip=r["ip"], until=r["until"], reason=r["reason"], created=r["created"])
                for r in rows
            ]

        return await self._call(select)

    # --- notifications and tokens ------------------------------------------------
    async def claim_once(self, key: str, until: float, now: float) -> bool:
        def claim(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO claims (key, until) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET until = excluded.until WHERE until <= ?",
                (key, until, now),
            )
            return cursor.rowcount == 1

        return await self._call(self._write(claim))

    async def log_notification(self, note: Notification) -> None:
        details = json.dumps(note.details, sort_keys=True)

        def log(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO notifications (kind, subject, recipient, sent_at, details)"
                " VALUES (?, ?, ?, ?, ?)",
                (note.kind, note.subject, note.recipient, note.sent_at, details),
            )

        await self._call(self._write(log))

    async def recent_notifications(self, limit: int) -> list[Notification]:
        def select(conn: sqlite3.Connection) -> list[Notification]:
            rows = conn.execute(
                "SELECT kind, subject, recipient, sent_at, details FROM notifications"
                " ORDER BY id DESC LIMIT ?",
                (max(0, limit),),
            ).fetchall()
            return [
                Notification(
                    kind=r["kind"],
                    subject=r["subject"],
                    recipient=r["recipient"],
                    sent_at=r["sent_at"],
                    details=dict(json.loads(r["details"])),
                )
                for r in rows
            ]

        return await self._call(select)


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open, configure and migrate (runs in the store's worker thread)."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        # Several worker processes open the same file at once; switching to
        # WAL and migrating can meet a lock that SQLite reports at once
        # instead of waiting on it, so retry until the busy timeout is spent.
        deadline = time.monotonic() + busy_timeout
        delay = 0.005
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode {mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
                migrate(conn)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
    except BaseException:
        conn.close()
        raise
    return conn
