"""Metrics end to end: a real gateway with ``[metrics] listen`` on port 0,
real SMTP in, real HTTP downloads, and the counts read back by scraping
``/metrics`` over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import VERSION, Gateway
from gateway.dkim import generate_key, write_private_key
from gateway.sink import CaptureSink
from storage.sqlite import SqliteStateStore
from tests.helpers.gw import (
    ALICE,
    BOB,
    DOMAIN,
    PASSWORD,
    SECRET,
    Dialogue,
    GatewayFactory,
    client_tls,
    message,
    with_attachment,
)
from tests.web.test_metrics import parse_exposition
from web.links import LinkSigner, new_link_id
from web.metrics import CONTENT_TYPE, COUNTERS

MIN_SIZE = 1000
DAY = 86_400.0
METRICS_ON: dict[str, Any] = {
    "metrics": {"listen": "127.0.0.1:0"},
    "smtp": {"trusted_networks": ["127.0.0.1/32"]},
    "accounts": {ALICE: {"linking": {"enabled": True, "min_size": MIN_SIZE}}},
}
TOKEN_RE = re.compile(rb"/d/([A-Za-z0-9_\-.]+)")


async def plain(port: int, source: str | None = None) -> Dialogue:
    d = await Dialogue.open(port, source=source)
    code, _ = await d.reply()
    assert code == 220
    await d.cmd("EHLO client.test", 250)
    return d


async def transaction(d: Dialogue, sender: str, rcpts: list[str], raw: bytes) -> tuple[int, str]:
    await d.cmd(f"MAIL FROM:<{sender}>", 250)
    for rcpt in rcpts:
        await d.cmd(f"RCPT TO:<{rcpt}>", 250)
    await d.cmd("DATA", 354)
    return await d.cmd(raw + b".\r\n")


async def quit_(d: Dialogue) -> None:
    await d.cmd("QUIT", 221)
    await d.close()


async def scrape(port: int | None) -> dict[str, float]:
    assert port is not None
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        return parse_exposition(await resp.text())


def counted(samples: dict[str, float]) -> dict[str, float]:
    """The counter samples that are not zero (gauges and info left out)."""
    return {k: v for k, v in samples.items() if v and k.split("{", 1)[0] in COUNTERS}


def token_in(content: bytes) -> str:
    tokens: set[bytes] = set(TOKEN_RE.findall(content.replace(b"=\r\n", b"")))
    assert len(tokens) == 1, tokens
    return tokens.pop().decode()


async def get(url: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


async def send_linked(gw: Gateway, sink: CaptureSink, data: bytes, rcpts: list[str]) -> bytes:
    """A trusted client (127.0.0.1) sends ``data`` as an attachment; the raw message."""
    raw = with_attachment(ALICE, data)
    d = await plain(gw.smtp_ports[0])
    before = len(sink.messages)
    code, text = await transaction(d, ALICE, rcpts, raw)
    assert code == 250, text
    await quit_(d)
    await sink.wait_for(before + 1)
    return raw


async def test_counts_of_a_session_mix_scraped_over_http(
    make_gw: GatewayFactory, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw(METRICS_ON)
    assert gw.metrics_port is not None
    assert gw.metrics_port not in (gw.web_port, *gw.smtp_ports)
    port = gw.smtp_ports[0]

    # (a) A trusted client, a linking account, an attachment over the
    # threshold, two recipients: delivered with the attachment linked.
    data = os.urandom(5000)
    raw = await send_linked(gw, sink, data, ["one@remote.test", "two@remote.test"])
    assert len(sink.messages) == 1
    token = token_in(sink.messages[0].content)

    # (b) An untrusted, unauthenticated client tries to relay.
    d = await plain(port, source="127.0.0.2")
    await d.cmd("MAIL FROM:<mallory@elsewhere.test>", 250)
    assert await d.cmd("RCPT TO:<victim@remote.test>") == (554, "5.7.1 Relay access denied")
    await quit_(d)

    # (c) One wrong password, then the right one (same connection).
    d = await plain(port)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO client.test", 250)
    assert (await d.auth_plain(BOB, "wrong"))[0] == 535
    assert (await d.auth_plain(BOB, PASSWORD))[0] == 235
    await quit_(d)

    # Downloads over the gateway's own web port.
    base = f"http://127.0.0.1:{gw.web_port}"
    status, page = await get(f"{base}/d/{token}")
    assert status == 200 and b"file.bin" in page
    assert await get(f"{base}/d/{token}/file") == (200, data)
    # Neither HEAD nor a resumed range counts as a download.
    async with aiohttp.ClientSession() as http, http.head(f"{base}/d/{token}/file") as resp:
        assert resp.status == 200
    assert await get(f"{base}/d/{token}/file", Range="bytes=10-19") == (206, data[10:20])
    # A forged token and a well-signed one for no link: 404 twice.
    assert (await get(f"{base}/d/{token[:-6]}forged"))[0] == 404
    assert gw.link_signer is not None
    assert (await get(f"{base}/d/{gw.link_signer.sign(new_link_id())}"))[0] == 404
    # The public web port does not serve the metrics.
    assert (await get(f"{base}/metrics"))[0] == 404

    samples = await scrape(gw.metrics_port)
    assert counted(samples) == {
        "attachgate_smtp_connections_total": 3,
        'attachgate_messages_total{outcome="delivered"}': 1,
        "attachgate_delivered_bytes_total": len(raw),
        "attachgate_delivered_recipients_total": 2,
        "attachgate_attachments_linked_total": 1,
        "attachgate_attachment_bytes_linked_total": len(data),
        'attachgate_refusals_total{case="relay_denied"}': 1,
        'attachgate_auth_total{result="failed"}': 1,
        'attachgate_auth_total{result="ok"}': 1,
        "attachgate_landing_views_total": 1,
        "attachgate_downloads_total": 1,
        'attachgate_download_refusals_total{status="404"}': 2,
    }
    assert samples["attachgate_frozen_accounts"] == 0
    assert samples["attachgate_banned_addresses"] == 0
    assert samples[f'attachgate_info{{version="{VERSION}"}}'] == 1

    # A revoked link: 410. A second scrape adds only what happened since.
    assert gw.stores is not None
    record = await gw.stores.state.get_link(gw.link_signer.verify(token))
    assert record is not None
    assert await gw.stores.state.revoke_link(record.link_id)
    assert (await get(f"{base}/d/{token}"))[0] == 410
    assert (await get(f"{base}/d/{token}/file"))[0] == 410
    # A token signed with the right key longer ago than links live: 410 too.
    old = LinkSigner([SECRET], gw.link_signer.max_age, clock=lambda: time.time() - 90 * DAY)
    assert (await get(f"{base}/d/{old.sign(new_link_id())}"))[0] == 410
    again = counted(await scrape(gw.metrics_port))
    assert again == {
        **counted(samples),
        'attachgate_download_refusals_total{status="410"}': 3,
    }


async def test_outcomes_of_messages_that_are_not_delivered(
    tmp_path: Path, make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    pem, _ = generate_key("ed25519")
    key_file = tmp_path / "ed1.key"
    write_private_key(key_file, pem)
    dkim = {"domains": {DOMAIN: {"dkim_keys": [{"selector": "ed1", "key_file": str(key_file)}]}}}
    gw = await make_gw(METRICS_ON, dkim, {"smtp": {"max_message_size": "64KiB"}})
    d = await plain(gw.smtp_ports[0])
    # A linking account's message without attachments: passed as it was.
    assert (await transaction(d, ALICE, ["x@remote.test"], message()))[0] == 250
    # Its author's domain has no key: delivered, not signed.
    foreign = message("someone@elsewhere.test")
    assert (await transaction(d, BOB, ["x@remote.test"], foreign))[0] == 250
    # The next hop refuses the content, once with an attachment taken out: the
    # links are removed again, so nothing counts as linked (nor as signed).
    sink.faults.data = "554 5.6.0 content rejected"
    assert (await transaction(d, BOB, ["x@remote.test"], message(BOB)))[0] == 554
    linked = with_attachment(ALICE, os.urandom(5000))
    assert (await transaction(d, ALICE, ["x@remote.test"], linked))[0] == 554
    # Refused by the DATA reader before the handler sees the message.
    too_big = message(BOB).replace(b"\r\n\r\n", b"\r\n\r\n" + b"x" * 70 * 1024, 1)
    assert (await transaction(d, BOB, ["x@remote.test"], too_big))[0] == 552
    nul = message(BOB).replace(b"\r\n\r\n", b"\r\n\r\nnul \x00 here\r\n", 1)
    assert (await transaction(d, BOB, ["x@remote.test"], nul))[0] == 550
    # The next hop drops the connection at DATA: deferred.
    sink.faults.data = "drop"
    assert (await transaction(d, BOB, ["x@remote.test"], message(BOB)))[0] == 451
    sink.faults.data = None
    # Two From fields: refused by us before signing (RFC 6376 section 8.15).
    twice = message(BOB).replace(b"To:", f"From: <{ALICE}>\r\nTo:".encode(), 1)
    code, text = await transaction(d, BOB, ["x@remote.test"], twice)
    assert code == 550, text
    await quit_(d)
    assert len(sink.messages) == 2

    assert counted(await scrape(gw.metrics_port)) == {
        "attachgate_smtp_connections_total": 1,
        'attachgate_messages_total{outcome="delivered"}': 2,
        'attachgate_messages_total{outcome="refused-by-next-hop"}': 2,
        'attachgate_messages_total{outcome="deferred"}': 1,
        'attachgate_messages_total{outcome="failed"}': 3,
        "attachgate_delivered_bytes_total": len(message()) + len(foreign),
        "attachgate_delivered_recipients_total": 2,
        'attachgate_linking_passed_total{reason="no-attachments"}': 1,
        "attachgate_next_hop_failures_total": 1,
        "attachgate_dkim_signed_total": 1,
        'attachgate_refusals_total{case="duplicate_headers"}': 1,
    }


async def test_no_listener_without_metrics_listen(
    tmp_path: Path, make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    gw = await make_gw({"smtp": {"trusted_networks": ["127.0.0.1/32"]}})
    assert gw.settings.metrics.listen is None
    assert gw.metrics_port is None
    assert gw.web_port is not None
    assert (await get(f"http://127.0.0.1:{gw.web_port}/metrics"))[0] == 404
    # Counting still happens in memory...
    await quit_(await plain(gw.smtp_ports[0]))
    assert dict(gw.metrics.pending) == {"attachgate_smtp_connections_total": 1}
    # ...but with nobody to read them the counts are not written to the store.
    assert gw.stores is not None
    assert await gw.stores.state.counters() == {}
    await gw.close(drain=1)
    store = await SqliteStateStore.open(tmp_path / "state.db")
    try:
        assert await store.counters() == {}
    finally:
        await store.close()


async def test_counts_are_flushed_periodically(
    make_gw: GatewayFactory, sink: CaptureSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.app.FLUSH_INTERVAL", 0.05)
    gw = await make_gw(METRICS_ON)
    await quit_(await plain(gw.smtp_ports[0]))
    assert gw.stores is not None
    # No scrape: the flusher alone writes the count to the store.
    async with asyncio.timeout(10):
        while await gw.stores.state.counters() != {"attachgate_smtp_connections_total": 1}:
            await asyncio.sleep(0.02)
    assert gw.metrics.pending == {}


async def test_counts_survive_a_restart(
    make_gw: GatewayFactory, sink: CaptureSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic flush during the test: only closing can write the counts.
    monkeypatch.setattr("gateway.app.FLUSH_INTERVAL", 3600.0)
    first = await make_gw(METRICS_ON)
    data = os.urandom(3000)
    raw = await send_linked(first, sink, data, ["x@remote.test"])
    token = token_in(sink.messages[0].content)
    assert await get(f"http://127.0.0.1:{first.web_port}/d/{token}/file") == (200, data)
    assert first.stores is not None
    assert await first.stores.state.counters() == {}
    assert first.metrics.pending != {}
    async with asyncio.timeout(30):  # the flusher must stop when told to
        await first.close(drain=1)
    assert first.metrics.pending == {}  # closing flushed them

    expected = {
        "attachgate_smtp_connections_total": 1,
        'attachgate_messages_total{outcome="delivered"}': 1,
        "attachgate_delivered_bytes_total": len(raw),
        "attachgate_delivered_recipients_total": 1,
        "attachgate_attachments_linked_total": 1,
        "attachgate_attachment_bytes_linked_total": len(data),
        "attachgate_downloads_total": 1,
    }
    second = await make_gw(METRICS_ON)
    assert counted(await scrape(second.metrics_port)) == expected
    # The new process counts on from there.
    more = os.urandom(2000)
    raw2 = await send_linked(second, sink, more, ["x@remote.test", "y@remote.test"])
    assert counted(await scrape(second.metrics_port)) == {
        **expected,
        "attachgate_smtp_connections_total": 2,
        'attachgate_messages_total{outcome="delivered"}': 2,
        "attachgate_delivered_bytes_total": len(raw) + len(raw2),
        "attachgate_delivered_recipients_total": 3,
        "attachgate_attachments_linked_total": 2,
        "attachgate_attachment_bytes_linked_total": len(data) + len(more),
    }


async def test_a_link_whose_file_is_gone_counts_as_410(
    make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    gw = await make_gw(METRICS_ON)
    assert gw.stores is not None and gw.link_signer is not None
    await send_linked(gw, sink, os.urandom(5000), ["x@remote.test"])
    token = token_in(sink.messages[-1].content)
    record = await gw.stores.state.get_link(gw.link_signer.verify(token))
    assert record is not None
    await gw.stores.blobs.delete(record.blob_digest)
    status, _ = await get(f"http://127.0.0.1:{gw.web_port}/d/{token}/file")
    assert status == 410
    samples = await scrape(gw.metrics_port)
    assert samples['attachgate_download_refusals_total{status="410"}'] == 1
    assert samples["attachgate_downloads_total"] == 0
