"""Administrator notifications sent through a real next hop to a recording sink.

``CaptureSink`` (an aiosmtpd server on a loopback port chosen by the kernel,
in the test's own event loop) is also used by the abuse and admin tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import socket
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import dkim
import pytest

from gateway.config import NextHopSettings
from gateway.delivery import NextHop
from gateway.dkim import DkimKey, Signer, generate_key
from gateway.notify import Notifier, build_notification
from gateway.sink import Captured, CaptureSink
from storage.sqlite import SqliteStateStore
from tests.helpers.clock import T0, FakeClock
from tests.helpers.dnsserver import ZoneServer, txt_lookup
from web.metrics import Metrics


def parsed(captured: Captured) -> EmailMessage:
    return email.message_from_bytes(captured.content, _class=EmailMessage, policy=default_policy)


@contextlib.asynccontextmanager
async def running_recorder() -> AsyncIterator[CaptureSink]:
    """The capture sink on a loopback port of the kernel's choice."""
    sink = CaptureSink()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


@pytest.fixture
async def recorder() -> AsyncIterator[CaptureSink]:
    async with running_recorder() as sink:
        yield sink


def next_hop_for(port: int) -> NextHop:
    return NextHop(
        NextHopSettings(host="127.0.0.1", port=port, starttls="off"), helo_name="gw.test"
    )


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
    store = await SqliteStateStore.open(tmp_path / "state.db")
    yield store
    await store.close()


@pytest.fixture
async def hop(recorder: CaptureSink) -> AsyncIterator[NextHop]:
    next_hop = next_hop_for(recorder.port)
    yield next_hop
    await next_hop.close()


def test_built_message_is_well_formed() -> None:
    raw = build_notification(
        sender="postmaster@gw.test",
        recipients=["admin@example.com", "ops@example.com"],
        subject="[attachgate] Account alice@example.com frozen",
        body="Ümlaut line\n" + "x" * 200 + "\n",
        hostname="gw.test",
        now=T0,
        reply_to="attachgate-control@gw.test",
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert msg["From"] == "attachgate <postmaster@gw.test>"
    assert msg["To"] == "admin@example.com, ops@example.com"
    assert msg["Reply-To"] == "attachgate-control@gw.test"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Date"].datetime.timestamp() == T0
    assert msg["Message-ID"].endswith("@gw.test>")
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().replace("\r\n", "\n") == "Ümlaut line\n" + "x" * 200 + "\n"


async def test_send_reaches_the_next_hop_and_is_logged(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    clock = FakeClock()
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state, clock=clock)
    ok = await notifier.send(
        "hijack", ["admin@example.com"], "Subject here", "Body here\n", dedup_key=None, dedup_for=0
    )
    assert ok
    assert len(recorder.messages) == 1
    got = recorder.messages[0]
    assert got.mail_from == "postmaster@gw.test"
    assert got.rcpt_tos == ["admin@example.com"]
    msg = parsed(got)
    assert msg["Subject"] == "Subject here"
    assert msg["From"] == "attachgate <postmaster@gw.test>"
    notes = await state.recent_notifications(10)
    assert [(n.kind, n.recipient, n.details["status"]) for n in notes] == [
        ("hijack", "admin@example.com", "sent")
    ]
    assert notes[0].sent_at == T0


async def test_configured_sender_is_used(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender="alerts@example.com", state=state)
    assert await notifier.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
    assert recorder.messages[0].mail_from == "alerts@example.com"
    assert parsed(recorder.messages[0])["From"] == "attachgate <alerts@example.com>"


async def test_dedup_key_sends_once_per_period(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    clock = FakeClock()
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state, clock=clock)
    results = [
        await notifier.send("d", ["a@example.com"], "s", "b", dedup_key="k", dedup_for=600)
        for _ in range(3)
    ]
    assert results == [True, False, False]
    clock.advance(599)
    assert not await notifier.send("d", ["a@example.com"], "s", "b", dedup_key="k", dedup_for=600)
    clock.advance(1)
    assert await notifier.send("d", ["a@example.com"], "s", "b", dedup_key="k", dedup_for=600)
    assert len(recorder.messages) == 2


async def test_refused_recipient_is_recorded_and_others_still_get_it(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    recorder.faults.rcpt["gone@example.com"] = "550 5.1.1 No such user here"
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state)
    assert await notifier.send(
        "t", ["gone@example.com", "here@example.com"], "s", "b", dedup_key=None, dedup_for=0
    )
    assert recorder.messages[0].rcpt_tos == ["here@example.com"]
    statuses = {n.recipient: n.details["status"] for n in await state.recent_notifications(5)}
    assert statuses == {"gone@example.com": "refused 550", "here@example.com": "sent"}


async def test_all_recipients_refused_sends_nothing(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    recorder.faults.rcpt["gone@example.com"] = "550 5.1.1 No such user here"
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state)
    assert not await notifier.send("t", ["gone@example.com"], "s", "b", dedup_key=None, dedup_for=0)
    assert recorder.messages == []


async def test_unreachable_next_hop_returns_false_and_never_raises(
    state: SqliteStateStore,
) -> None:
    # A port that was just free: nothing listens there, the connect is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hop = next_hop_for(port)
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state)
    try:
        ok = await notifier.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
    finally:
        await hop.close()
    assert not ok
    notes = await state.recent_notifications(5)
    assert [n.details["status"] for n in notes] == ["error"]


async def test_broken_state_store_returns_false(
    recorder: CaptureSink, hop: NextHop, tmp_path: Path
) -> None:
    store = await SqliteStateStore.open(tmp_path / "closed.db")
    await store.close()
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=store)
    assert not await notifier.send("t", ["a@example.com"], "s", "b", dedup_key="k", dedup_for=60)
    assert recorder.messages == []


async def test_no_recipients_sends_nothing(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state)
    assert not await notifier.send("t", [], "s", "b", dedup_key=None, dedup_for=0)
    assert recorder.messages == []
    assert await state.recent_notifications(5) == []


async def test_temporary_failure_is_retried_in_the_background(tmp_path: Path, sink: Any) -> None:
    state = await SqliteStateStore.open(tmp_path / "state.db")
    hop = next_hop_for(sink.port)
    notifier = Notifier(
        next_hop=hop, hostname="gw.test", sender=None, state=state, retry_delays=(0.05, 0.05)
    )
    try:
        sink.faults.data = "451 4.3.0 try again later"
        sent = await notifier.send(
            "hijack", ["admin@example.com"], "s", "b", dedup_key="k", dedup_for=60
        )
        assert sent is False
        assert notifier.pending_retries == 1
        sink.faults.data = None
        messages = await sink.wait_for(1)
        assert messages[0].rcpt_tos == ["admin@example.com"]
        async with asyncio.timeout(5):
            while notifier.pending_retries:  # the retry records its outcome
                await asyncio.sleep(0.01)
        # A permanent refusal is not tried again.
        sink.faults.data = "554 5.7.1 no"
        sent = await notifier.send(
            "hijack", ["admin@example.com"], "s2", "b", dedup_key="k2", dedup_for=60
        )
        assert sent is False
        assert notifier.pending_retries == 0
    finally:
        await notifier.close()
        await hop.close()
        await state.close()


async def test_every_notification_ends_in_one_counted_result(tmp_path: Path, sink: Any) -> None:
    state = await SqliteStateStore.open(tmp_path / "state.db")
    hop = next_hop_for(sink.port)
    metrics = Metrics()
    notifier = Notifier(
        next_hop=hop,
        hostname="gw.test",
        sender=None,
        state=state,
        retry_delays=(0.01, 0.01),
        metrics=metrics,
    )

    async def settled() -> None:
        async with asyncio.timeout(5):
            while notifier.pending_retries:
                await asyncio.sleep(0.01)

    def results() -> dict[str, int]:
        return {
            k.split('"')[1]: v
            for k, v in metrics.pending.items()
            if k.startswith("attachgate_notifications_total")
        }

    try:
        to = ["a@example.com"]
        assert await notifier.send("t", to, "s", "b", dedup_key="k", dedup_for=60)
        assert not await notifier.send("t", to, "s", "b", dedup_key="k", dedup_for=60)
        assert results() == {"sent": 1, "deduplicated": 1}
        sink.faults.data = "554 5.7.1 no"  # refused for good at once
        await notifier.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
        assert results() == {"sent": 1, "deduplicated": 1, "failed": 1}
        sink.faults.data = "451 4.3.0 later"  # refused until the retries run out
        await notifier.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
        await settled()
        assert results() == {"sent": 1, "deduplicated": 1, "failed": 2}
        sink.faults.data = None
    finally:
        await notifier.close()
        await hop.close()
        await state.close()


async def test_notifications_are_dkim_signed_when_their_domain_has_a_key(
    recorder: CaptureSink, hop: NextHop, state: SqliteStateStore
) -> None:
    pem, txt = generate_key("ed25519")
    key = DkimKey("gw.test", "n1", "ed25519-sha256", pem)
    notifier = Notifier(
        next_hop=hop, hostname="gw.test", sender=None, state=state, sign=Signer([key]).sign
    )
    assert await notifier.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
    signed = recorder.messages[0].content
    assert signed.startswith(b"DKIM-Signature:")
    with ZoneServer([("n1._domainkey.gw.test", "TXT", txt)]) as zone:
        assert dkim.DKIM(signed).verify(dnsfunc=txt_lookup(zone))
    # Another domain's key signs nothing.
    other = DkimKey("example.com", "n1", "ed25519-sha256", pem)
    plain = Notifier(
        next_hop=hop, hostname="gw.test", sender=None, state=state, sign=Signer([other]).sign
    )
    assert await plain.send("t", ["a@example.com"], "s", "b", dedup_key=None, dedup_for=0)
    assert b"DKIM-Signature" not in recorder.messages[1].content
