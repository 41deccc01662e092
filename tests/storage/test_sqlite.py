"""What only the SQLite state store promises: schema, locking, failure modes."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.interfaces import LinkRecord, StateUnavailable
from storage.sqlite import MIGRATIONS, SqliteStateStore, migrate, schema_version

T0 = 1_000_000.0


def record(link_id: str, size: int = 10) -> LinkRecord:
    return LinkRecord(
        link_id=link_id,
        blob_digest="a" * 64,
        filename="f.pdf",
        content_type="application/pdf",
        size=size,
        sender="alice@example.com",
        message_id="<m@example.com>",
        created=T0,
        expires=T0 + 100,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


async def test_new_file_is_wal_with_schema_version_3(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    await store.close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert schema_version(conn) == len(MIGRATIONS) == 3
    finally:
        conn.close()


async def test_a_version_1_file_keeps_counting_its_events(db_path: Path) -> None:
    # Version 1 had no running totals: the first event after the upgrade sums
    # the events stored before it, and later ones carry on from there.
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert migrate(conn, MIGRATIONS[:1]) == 1
        conn.executemany(
            "INSERT INTO events (key, ts, amount) VALUES (?, ?, ?)",
            [("k", T0 - 100, 5), ("k", T0 - 30, 7), ("other", T0 - 30, 100)],
        )
    finally:
        conn.close()
    store = await SqliteStateStore.open(db_path)
    try:
        assert await store.add_and_count("k", 1, T0, [60, 3600]) == [8, 13]
        assert await store.add_and_count("k", 1, T0 + 30, [60, 3600]) == [2, 14]
    finally:
        await store.close()


async def test_a_second_migration_is_one_more_function(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    await store.add_links([record("kept")])
    await store.close()

    def add_tags(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE tags (link_id TEXT NOT NULL, tag TEXT NOT NULL)")

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert migrate(conn, (*MIGRATIONS, add_tags)) == 4
        assert schema_version(conn) == 4
        conn.execute("INSERT INTO tags VALUES ('kept', 'x')")
        assert migrate(conn, (*MIGRATIONS, add_tags)) == 4  # applied once only
        assert conn.execute("SELECT count(*) FROM links").fetchone() == (1,)
    finally:
        conn.close()

    # This code knows version 3 only: a newer file is refused, not misread.
    with pytest.raises(StateUnavailable, match="schema version 4"):
        await SqliteStateStore.open(db_path)


async def test_locked_past_the_timeout_is_unavailable(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path, busy_timeout=0.2)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StateUnavailable) as caught:
            await store.add_and_count("k", 1, T0, [60])
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StateUnavailable):
            await store.freeze("alice@example.com", "x", T0)
        with pytest.raises(StateUnavailable):
            await SqliteStateStore.open(db_path, busy_timeout=0.1)
        holder.execute("ROLLBACK")
        # Once the lock is gone the same store works again.
        assert await store.add_and_count("k", 1, T0, [60]) == [1]
    finally:
        holder.close()
        await store.close()


async def test_a_waiting_writer_gets_through_when_the_lock_is_released(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path, busy_timeout=30)
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO events VALUES ('k', ?, 5)", (T0,))
        started = threading.Event()
        trace: list[str] = []

        def note(statement: str) -> None:
            trace.append(statement)
            if statement == "BEGIN IMMEDIATE":
                started.set()

        # The hook has to be installed from the connection's own thread.
        store._executor.submit(store._conn.set_trace_callback, note).result()
        pending = store.add_and_count("k", 1, T0, [60])
        task = asyncio.ensure_future(pending)
        await asyncio.to_thread(started.wait, 10)
        holder.execute("COMMIT")
        assert await task == [6]
    finally:
        holder.close()
        await store.close()


@pytest.fixture
def read_only_file(db_path: Path) -> Iterator[Path]:
    """Make ``db_path`` read-only even for root (chattr +i), else by mode."""
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    if os.geteuid() != 0:
        db_path.chmod(0o444)
        yield db_path
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root without chattr: cannot make a file read-only")
    made = subprocess.run([chattr, "+i", str(db_path)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed: {made.stderr.decode().strip()}")
    try:
        yield db_path
    finally:
        subprocess.run([chattr, "-i", str(db_path)], check=True)


async def test_a_read_only_file_is_unavailable(read_only_file: Path) -> None:
    with pytest.raises(StateUnavailable) as caught:
        await SqliteStateStore.open(read_only_file)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


async def test_a_corrupt_file_is_unavailable(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database, just text " * 200)
    with pytest.raises(StateUnavailable) as caught:
        await SqliteStateStore.open(db_path)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


async def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StateUnavailable):
        await SqliteStateStore.open(tmp_path / "no" / "such" / "dir" / "state.db")


async def test_a_failed_batch_adds_nothing(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    try:
        await store.add_links([record("a")])
        with pytest.raises(StateUnavailable) as caught:
            await store.add_links([record("b", 20), record("a", 30)])
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        assert await store.get_link("b") is None
        assert await store.account_usage("alice@example.com") == 10
    finally:
        await store.close()


async def test_recalc_repairs_a_usage_table_that_drifted(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    try:
        await store.add_links([record("a", 10), record("b", 32)])
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("UPDATE usage SET bytes = 999999")
        other.close()
        assert await store.account_usage("alice@example.com") == 999999
        assert await store.recalc_usage(T0) == {"alice@example.com": 42}
        assert await store.account_usage("alice@example.com") == 42
    finally:
        await store.close()


async def test_set_disabled(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    try:
        assert not await store.set_disabled("alice@example.com", False)
        assert await store.list_account_states() == []
        assert await store.set_disabled("alice@example.com", True)
        assert not await store.set_disabled("alice@example.com", True)
        state = await store.get_account_state("alice@example.com")
        assert state.disabled
        assert not state.frozen
        assert await store.list_account_states() == [state]
        assert await store.set_disabled("alice@example.com", False)
        assert not (await store.get_account_state("alice@example.com")).disabled
    finally:
        await store.close()


async def test_every_statement_runs_on_one_thread_off_the_loop(db_path: Path) -> None:
    store = await SqliteStateStore.open(db_path)
    seen: list[tuple[int, str]] = []

    def note(statement: str) -> None:
        seen.append((threading.get_ident(), statement))

    try:
        # The trace hook has to be installed on the connection's own thread.
        store._executor.submit(store._conn.set_trace_callback, note).result()
        await store.add_and_count("k", 1, T0, [60])
        await store.add_links([record("a")])
        await store.get_link("a")
        await store.gc(T0 + 1000)
    finally:
        await store.close()
    threads = {ident for ident, _ in seen}
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    statements = [text for _, text in seen]
    # Counters commit without waiting for the disk, link records with it.
    normal = statements.index("PRAGMA synchronous = NORMAL")
    full = statements.index("PRAGMA synchronous = FULL")
    events_insert = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO events"))
    links_insert = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO links"))
    assert normal < events_insert < full < links_insert
