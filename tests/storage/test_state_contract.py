"""The contract every StateStore backend keeps (run once per backend)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from storage.interfaces import (
    WINDOW_SLACK,
    AccountState,
    Ban,
    LinkRecord,
    Notification,
    StateStore,
    StateUnavailable,
)
from tests.storage.conftest import StateBackend

REPO = Path(__file__).resolve().parents[2]
T0 = 1_000_000.0
DAY = 86_400.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def digest(n: int) -> str:
    return f"{n:064x}"


def link(
    link_id: str,
    *,
    blob: int = 1,
    size: int = 100,
    sender: str = "alice@example.com",
    message_id: str = "<m1@example.com>",
    created: float = T0,
    expires: float = T0 + 30 * DAY,
) -> LinkRecord:
    return LinkRecord(
        link_id=link_id,
        blob_digest=digest(blob),
        filename=f"Rechnung {link_id} – März.pdf",
        content_type="application/pdf",
        size=size,
        sender=sender,
        message_id=message_id,
        created=created,
        expires=expires,
    )


class TestStateStoreContract:
    @pytest.fixture
    def store(self, state_store: StateStore) -> StateStore:
        return state_store

    # --- link records ----------------------------------------------------------
    async def test_links_add_get_and_list_by_message(self, store: StateStore) -> None:
        a, b = link("a", created=T0), link("b", blob=2, created=T0 + 1)
        other = link("c", message_id="<m2@example.com>")
        await store.add_links([a, b])
        await store.add_links([other])
        assert await store.get_link("a") == a
        assert await store.get_link("b") == b
        assert await store.get_link("nope") is None
        assert await store.links_for_message("<m1@example.com>") == [a, b]
        assert await store.links_for_message("<m2@example.com>") == [other]
        assert await store.links_for_message("<m3@example.com>") == []

    async def test_revoke(self, store: StateStore) -> None:
        await store.add_links([link("a")])
        assert await store.revoke_link("a")
        assert await store.revoke_link("a")  # still exists, still revoked
        assert not await store.revoke_link("nope")
        record = await store.get_link("a")
        assert record is not None
        assert record.revoked

    async def test_download_count(self, store: StateStore) -> None:
        await store.add_links([link("a")])
        await store.record_download("a", T0 + 10)
        await store.record_download("a", T0 + 20)
        await store.record_download("nope", T0 + 20)
        record = await store.get_link("a")
        assert record is not None
        assert (record.download_count, record.last_download) == (2, T0 + 20)

    async def test_delete_links(self, store: StateStore) -> None:
        await store.add_links([link("a"), link("b"), link("c")])
        await store.delete_links(["a", "c", "nope"])
        assert await store.get_link("a") is None
        assert await store.get_link("c") is None
        assert await store.get_link("b") == link("b")

    async def test_usage_follows_the_records(self, store: StateStore) -> None:
        await store.add_links([link("a", size=100), link("b", size=200, blob=2)])
        await store.add_links([link("c", size=100, message_id="<m2@example.com>")])
        await store.add_links([link("d", size=50, sender="bob@example.com")])
        # The same file sent twice counts twice.
        assert await store.account_usage("alice@example.com") == 400
        assert await store.account_usage("bob@example.com") == 50
        assert await store.account_usage("carol@example.com") == 0
        await store.revoke_link("b")
        await store.revoke_link("b")
        assert await store.account_usage("alice@example.com") == 200
        await store.delete_links(["a", "b"])
        assert await store.account_usage("alice@example.com") == 100

    async def test_gc_deletes_expired_records_and_names_orphans(self, store: StateStore) -> None:
        clock = Clock()
        await store.add_links(
            [
                link("shared-old", blob=1, expires=T0 + 100),
                link("shared-new", blob=1, expires=T0 + 1000),
                link("alone-old", blob=2, expires=T0 + 100),
                link("revoked", blob=3, expires=T0 + 1000),
                link("later", blob=4, expires=T0 + 101),
            ]
        )
        await store.revoke_link("revoked")
        assert await store.account_usage("alice@example.com") == 400

        result = await store.gc(clock.advance(99))
        assert result.expired_records == 0
        assert result.orphan_digests == [digest(3)]  # a revoked link holds no blob

        result = await store.gc(clock.advance(1))  # exactly at expiry: gone
        assert result.expired_records == 2
        assert sorted(result.orphan_digests) == [digest(2), digest(3)]
        assert await store.get_link("shared-old") is None
        assert await store.get_link("alone-old") is None
        assert await store.get_link("shared-new") is not None
        revoked = await store.get_link("revoked")
        assert revoked is not None
        assert revoked.revoked  # kept until it expires
        assert await store.referenced(digest(1))
        assert not await store.referenced(digest(2))
        assert not await store.referenced(digest(3))
        assert await store.referenced(digest(4))
        assert await store.account_usage("alice@example.com") == 200

        result = await store.gc(clock.advance(1000))
        assert result.expired_records == 3
        assert sorted(result.orphan_digests) == [digest(1), digest(3), digest(4)]
        assert await store.account_usage("alice@example.com") == 0

    async def test_recalc_usage_counts_what_is_live_now(self, store: StateStore) -> None:
        await store.add_links(
            [
                link("a", size=100, expires=T0 + 10),
                link("b", size=200, expires=T0 + 20),
                link("c", size=300, expires=T0 + 20, sender="bob@example.com"),
                link("d", size=400, expires=T0 + 30, sender="bob@example.com"),
            ]
        )
        await store.revoke_link("d")
        totals = await store.recalc_usage(T0 + 10)
        assert totals == {"alice@example.com": 200, "bob@example.com": 300}
        assert await store.account_usage("alice@example.com") == 200
        assert await store.account_usage("bob@example.com") == 300
        assert await store.recalc_usage(T0 + 20) == {}
        assert await store.account_usage("bob@example.com") == 0

    # --- sliding windows ---------------------------------------------------------
    async def test_window_boundary_is_exact(self, store: StateStore) -> None:
        clock = Clock()
        assert await store.add_and_count("msgs:alice", 1, clock.now, [60]) == [1]
        assert await store.add_and_count("msgs:alice", 2, clock.advance(30), [60]) == [3]
        # 59.5 s after the first event it still counts; at exactly 60 s it is out.
        assert await store.count("msgs:alice", T0 + 59.5, 60) == 3
        assert await store.add_and_count("msgs:alice", 4, clock.advance(30), [60]) == [6]
        assert await store.count("msgs:alice", clock.now, 60) == 6
        assert await store.add_and_count("msgs:alice", 8, clock.advance(30), [60]) == [12]
        assert await store.count("msgs:alice", clock.now, 60) == 12
        assert await store.count("msgs:alice", clock.advance(59), 60) == 8
        assert await store.count("msgs:alice", clock.advance(1), 60) == 0

    async def test_several_windows_at_once(self, store: StateStore) -> None:
        clock = Clock()
        windows = [10.0, 60.0, 3600.0]
        assert await store.add_and_count("k", 1, clock.now, windows) == [1, 1, 1]
        assert await store.add_and_count("k", 10, clock.advance(5), windows) == [11, 11, 11]
        assert await store.add_and_count("k", 100, clock.advance(10), windows) == [100, 111, 111]
        assert await store.add_and_count("k", 1000, clock.advance(50), windows) == [
            1000,
            1100,
            1111,
        ]
        assert await store.add_and_count("k", 0, clock.advance(3600 - 65), windows) == [
            0,
            0,
            1110,
        ]
        # The first event is older than the longest window, but kept for the slack.
        assert await store.count("k", clock.now, 1e9) == 1111
        assert await store.add_and_count("k", 0, clock.advance(WINDOW_SLACK), windows) == [0, 0, 0]
        assert await store.count("k", clock.now, 1e9) == 1110

    @pytest.mark.parametrize("seed", range(4))
    async def test_windows_match_a_list_of_every_event(self, store: StateStore, seed: int) -> None:
        # The backends keep running totals; a plain list of every event is the
        # reference. The clock mostly moves on, sometimes steps back a little
        # (a caller that read its clock before waiting for the lock), and
        # sometimes jumps past every window.
        rng = random.Random(seed)
        windows = [30.0, 300.0]
        clock = Clock()
        events: list[tuple[float, int]] = []

        def expected(now: float, window: float) -> int:
            return sum(amount for ts, amount in events if ts > now - window)

        for _ in range(250):
            roll = rng.random()
            if roll < 0.03:
                clock.advance(1000.0)
            elif roll < 0.15:
                clock.advance(-rng.uniform(0, 5))
            else:
                clock.advance(rng.choice([0.0, rng.uniform(0, 20)]))
            if roll > 0.97:
                await store.reset_counter("k")
                events.clear()
                continue
            if roll > 0.9:
                assert await store.count("k", clock.now, 300.0) == expected(clock.now, 300.0)
                continue
            amount = rng.choice([1, 1, 1, 2, 5, -1])
            events.append((clock.now, amount))
            got = await store.add_and_count("k", amount, clock.now, windows)
            assert got == [expected(clock.now, w) for w in windows]

    async def test_gc_forgets_keys_idle_past_their_windows(self, store: StateStore) -> None:
        # One failed login from an address that never comes back must not stay forever.
        await store.add_and_count("authfail:ip:192.0.2.1", 1, T0, [60])
        await store.add_and_count("busy", 1, T0, [60, 600])
        late = T0 + 60 + WINDOW_SLACK
        await store.add_and_count("busy", 1, late - 1, [60, 600])
        await store.gc(late - 1)
        assert await store.count("authfail:ip:192.0.2.1", late, 1e9) == 1  # not idle long enough
        await store.gc(late)
        assert await store.count("authfail:ip:192.0.2.1", late, 1e9) == 0
        assert await store.count("busy", late, 1e9) == 2  # added to a second ago
        assert await store.add_and_count("authfail:ip:192.0.2.1", 1, late, [60]) == [1]
        assert await store.add_and_count("busy", 1, late, [60, 600]) == [2, 3]

    async def test_a_window_dropped_and_asked_again_starts_right(self, store: StateStore) -> None:
        # A configuration change drops the hour window, events age out under the
        # shorter one alone, then the hour window comes back: its total must be
        # rebuilt from what is stored, not carried on from before.
        assert await store.add_and_count("k", 5, T0, [60, 3600]) == [5, 5]
        later = T0 + 3600 + WINDOW_SLACK + 1
        assert await store.add_and_count("k", 1, later, [60]) == [1]
        assert await store.add_and_count("k", 1, later + 10, [60, 3600]) == [2, 2]

    async def test_a_window_asked_twice_counts_once(self, store: StateStore) -> None:
        assert await store.add_and_count("k", 2, T0, [60, 60, 10]) == [2, 2, 2]
        assert await store.add_and_count("k", 3, T0 + 20, [60, 60, 10]) == [5, 5, 3]

    async def test_counters_are_per_key_and_reset(self, store: StateStore) -> None:
        await store.add_and_count("rcpts:alice", 25, T0, [3600])
        await store.add_and_count("rcpts:bob", 3, T0, [3600])
        assert await store.count("rcpts:alice", T0, 3600) == 25
        assert await store.count("rcpts:bob", T0, 3600) == 3
        await store.reset_counter("rcpts:alice")
        assert await store.count("rcpts:alice", T0, 3600) == 0
        assert await store.count("rcpts:bob", T0, 3600) == 3
        assert await store.count("never", T0, 3600) == 0

    async def test_concurrent_adds_see_distinct_totals(self, store: StateStore) -> None:
        totals = await asyncio.gather(*(store.add_and_count("k", 1, T0, [60]) for _ in range(50)))
        assert sorted(t[0] for t in totals) == list(range(1, 51))

    async def test_window_must_be_positive(self, store: StateStore) -> None:
        with pytest.raises(ValueError, match="window"):
            await store.add_and_count("k", 1, T0, [])
        with pytest.raises(ValueError, match="window"):
            await store.add_and_count("k", 1, T0, [60, 0])

    # --- metrics -------------------------------------------------------------------
    async def test_counters_add_up(self, store: StateStore) -> None:
        assert await store.counters() == {}
        await store.add_counters({"a_total": 2, 'b_total{case="x"}': 1})
        await store.add_counters({"a_total": 3})
        await store.add_counters({})
        assert await store.counters() == {"a_total": 5, 'b_total{case="x"}': 1}

    async def test_counters_from_two_writers_add_up(self, state_backend: StateBackend) -> None:
        one, two = await state_backend.open(), await state_backend.open()
        try:
            await asyncio.gather(
                *(s.add_counters({"n_total": 1}) for _ in range(20) for s in (one, two))
            )
            assert await one.counters() == {"n_total": 40}
        finally:
            await one.close()
            await two.close()

    # --- account flags -------------------------------------------------------------
    async def test_unknown_account_has_default_state(self, store: StateStore) -> None:
        assert await store.get_account_state("x@example.com") == AccountState("x@example.com")
        assert await store.list_account_states() == []

    async def test_first_freezer_wins(self, store: StateStore) -> None:
        results = await asyncio.gather(
            *(store.freeze("alice@example.com", f"limit {i}", T0 + i) for i in range(10))
        )
        assert results.count(True) == 1
        winner = results.index(True)
        state = await store.get_account_state("alice@example.com")
        assert state == AccountState(
            "alice@example.com", frozen=True, frozen_reason=f"limit {winner}", frozen_at=T0 + winner
        )
        assert not await store.freeze("alice@example.com", "again", T0 + 100)
        assert (await store.get_account_state("alice@example.com")).frozen_reason == (
            f"limit {winner}"
        )
        assert await store.list_account_states() == [state]

        assert await store.unfreeze("alice@example.com")
        assert not await store.unfreeze("alice@example.com")
        assert not await store.unfreeze("bob@example.com")
        assert not (await store.get_account_state("alice@example.com")).frozen
        assert await store.list_account_states() == []
        assert await store.freeze("alice@example.com", "second time", T0 + 200)

    # --- bans ------------------------------------------------------------------------
    async def test_bans_expire(self, store: StateStore) -> None:
        await store.ban("192.0.2.7", T0 + 3600, "10 failed logins", T0)
        await store.ban("2001:db8::1", T0 + 60, "scanner", T0)
        assert await store.is_banned("192.0.2.7", T0 + 3599)
        assert not await store.is_banned("192.0.2.7", T0 + 3600)
        assert not await store.is_banned("192.0.2.8", T0)
        assert await store.list_bans(T0 + 30) == [
            Ban("192.0.2.7", T0 + 3600, "10 failed logins", T0),
            Ban("2001:db8::1", T0 + 60, "scanner", T0),
        ]
        assert await store.list_bans(T0 + 60) == [
            Ban("192.0.2.7", T0 + 3600, "10 failed logins", T0)
        ]

    async def test_ban_again_and_lift(self, store: StateStore) -> None:
        await store.ban("192.0.2.7", T0 + 60, "first", T0)
        await store.ban("192.0.2.7", T0 + 7200, "second", T0 + 30)
        assert await store.is_banned("192.0.2.7", T0 + 3600)
        assert await store.list_bans(T0 + 30) == [Ban("192.0.2.7", T0 + 7200, "second", T0 + 30)]
        assert await store.lift_ban("192.0.2.7")
        assert not await store.lift_ban("192.0.2.7")
        assert not await store.is_banned("192.0.2.7", T0 + 3600)

    # --- claims and notifications ---------------------------------------------------
    async def test_claim_once_until_it_expires(self, store: StateStore) -> None:
        assert await store.claim_once("notify:frozen:alice", T0 + 600, T0)
        assert not await store.claim_once("notify:frozen:alice", T0 + 1200, T0 + 599)
        assert await store.claim_once("notify:frozen:bob", T0 + 600, T0 + 599)
        assert await store.claim_once("notify:frozen:alice", T0 + 1200, T0 + 600)
        assert not await store.claim_once("notify:frozen:alice", T0 + 1800, T0 + 1199)

    async def test_claim_once_has_one_winner(self, store: StateStore) -> None:
        results = await asyncio.gather(
            *(store.claim_once("token:abc", T0 + 60, T0) for _ in range(20))
        )
        assert results.count(True) == 1

    async def test_notifications_newest_first(self, store: StateStore) -> None:
        notes = [
            Notification(
                "frozen", f"alice frozen {i}", "postmaster@example.com", T0 + i, {"n": str(i)}
            )
            for i in range(5)
        ]
        for note in notes:
            await store.log_notification(note)
        assert await store.recent_notifications(3) == [notes[4], notes[3], notes[2]]
        assert await store.recent_notifications(100) == notes[::-1]
        assert await store.recent_notifications(0) == []

    # --- lifecycle ---------------------------------------------------------------------
    async def test_state_survives_close_and_reopen(self, state_backend: StateBackend) -> None:
        store = await state_backend.open()
        await store.add_links([link("a", size=123)])
        await store.revoke_link("a")
        await store.add_links([link("b", size=77)])
        await store.record_download("b", T0 + 5)
        await store.add_and_count("k", 7, T0, [3600])
        await store.freeze("alice@example.com", "hijack", T0)
        await store.ban("192.0.2.7", T0 + 3600, "auth", T0)
        await store.claim_once("once", T0 + 600, T0)
        note = Notification("ban", "192.0.2.7 banned", "postmaster@example.com", T0)
        await store.log_notification(note)
        await store.close()

        store = await state_backend.open()
        try:
            revoked = await store.get_link("a")
            assert revoked == replace(link("a", size=123), revoked=True)
            assert await store.get_link("b") == replace(
                link("b", size=77), download_count=1, last_download=T0 + 5
            )
            assert await store.account_usage("alice@example.com") == 77
            assert await store.count("k", T0 + 1, 3600) == 7
            assert (await store.get_account_state("alice@example.com")).frozen
            assert await store.is_banned("192.0.2.7", T0 + 1)
            assert not await store.claim_once("once", T0 + 600, T0 + 1)
            assert await store.recent_notifications(10) == [note]
        finally:
            await store.close()

    async def test_calls_after_close_are_refused(self, state_backend: StateBackend) -> None:
        store = await state_backend.open()
        await store.close()
        await store.close()
        with pytest.raises(StateUnavailable):
            await store.get_link("a")
        with pytest.raises(StateUnavailable):
            await store.add_and_count("k", 1, T0, [60])

    async def test_two_processes_count_exactly(self, state_backend: StateBackend) -> None:
        n = 150
        args = ["-m", "tests.storage.counter_worker", state_backend.spec, "k", str(n)]
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        try:
            for worker in workers:
                assert worker.stdout is not None
                assert await worker.stdout.readline() == b"ready\n"
            outputs = await asyncio.wait_for(
                asyncio.gather(*(worker.communicate(b"go\n") for worker in workers)), 120
            )
        finally:
            for worker in workers:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        seen: list[int] = []
        for worker, (out, _) in zip(workers, outputs, strict=True):
            assert worker.returncode == 0
            totals = json.loads(out)
            assert len(totals) == n
            assert totals == sorted(totals)  # each process sees its own calls grow
            seen.extend(totals)
        assert sorted(seen) == list(range(1, 2 * n + 1))  # exact, no total seen twice
        store = await state_backend.open()
        try:
            assert await store.count("k", 1_000_000.0, 3600) == 2 * n
        finally:
            await store.close()
