"""The whole path with linking and DKIM on: real SMTP in, the real download
service out, the corpus of other projects' messages as input.

What every corpus message must get: delivered to the next hop; parts that were
not replaced byte-identical; signed/encrypted messages untouched; the DKIM
signature verifies (dkimpy, key served by a DNS server on loopback); every link
downloads exactly the bytes that were taken out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest

from gateway.app import Gateway
from gateway.dkim import generate_key, with_header_separator, write_private_key
from gateway.mime import Extraction, LinkingRules, Passthrough, plan
from gateway.sink import CaptureSink
from tests.gateway.mime.checks import check_rendered
from tests.gateway.mime.conftest import corpus_files, load
from tests.helpers.dnsserver import ZoneServer, txt_lookup
from tests.helpers.gw import ALICE, DOMAIN, base_config, deep_merge, free_port, start_gateway

URL_RE = re.compile(rb"http://127\.0\.0\.1:\d+/d/[A-Za-z0-9_\-.]+")


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("dkim")
    out: dict[str, Any] = {"records": []}
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        pem, record = generate_key(algorithm, 2048)  # type: ignore[arg-type]
        path = base / f"{selector}.key"
        write_private_key(path, pem)
        out[selector] = path
        out["records"].append((f"{selector}._domainkey.{DOMAIN}", "TXT", record))
    return out


@pytest.fixture(scope="module")
def zone(dkim_keys: dict[str, Any]) -> Iterator[ZoneServer]:
    with ZoneServer(dkim_keys["records"]) as server:
        yield server


@pytest.fixture
async def linking_gw(
    tmp_path: Path, sink: CaptureSink, dkim_keys: dict[str, Any]
) -> AsyncIterator[Gateway]:
    web_port = free_port()
    cfg = deep_merge(
        base_config(tmp_path, sink.port),
        {
            "smtp": {
                "trusted_networks": ["127.0.0.1/32"],
                "max_message_size": "20MiB",
                "max_recipients": 10,
            },
            "web": {
                "listen": f"127.0.0.1:{web_port}",
                "public_url": f"http://127.0.0.1:{web_port}",
            },
            "domains": {
                DOMAIN: {
                    "dkim_keys": [
                        {"selector": "rsa1", "key_file": str(dkim_keys["rsa1"])},
                        {"selector": "ed1", "key_file": str(dkim_keys["ed1"])},
                    ]
                }
            },
            "accounts": {ALICE: {"linking": {"enabled": True, "min_size": 1}}},
            "hijack": {"max_messages": 10000, "max_recipients": 10000},
        },
    )
    gw = await start_gateway(cfg)
    yield gw
    await gw.close(drain=1)


def with_sender(raw: bytes) -> bytes:
    """Give the message a From in the signing domain (replacing the first)."""
    if raw.startswith(b"From "):  # an mbox separator line
        raw = raw.split(b"\r\n", 1)[1]
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    replaced = False
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        if not replaced and line.lower().startswith(b"from:"):
            out.append(f"From: Alice <{ALICE}>".encode())
            replaced = True
            skipping = True
            continue
        out.append(line)
    if not replaced:
        out.insert(0, f"From: Alice <{ALICE}>".encode())
    return b"\r\n".join(out) + sep + body


def strip_added(content: bytes) -> bytes:
    """Remove the DKIM-Signature and Received fields the gateway prepended."""
    for name in (b"dkim-signature:", b"dkim-signature:", b"received:"):
        if content[: len(name)].lower() == name:
            end = 0
            while True:
                end = content.index(b"\r\n", end) + 2
                if content[end : end + 1] not in (b" ", b"\t"):
                    break
            content = content[end:]
    return content


async def send(port: int, raw: bytes) -> tuple[int, str]:
    import aiosmtplib

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            errors, text = await client.sendmail(ALICE, ["someone@remote.test"], raw)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
    assert not errors
    return 250, text


CORPUS = corpus_files()


@pytest.mark.skipif(
    not CORPUS, reason="corpus not found: set ATTACHGATE_CORPUS or ../shared/corpus"
)
@pytest.mark.parametrize("name", CORPUS)
async def test_corpus_through_the_gateway(
    name: str, linking_gw: Gateway, sink: CaptureSink, zone: ZoneServer
) -> None:
    raw = with_sender(load(name))
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"  # SMTP data ends with a line end; the client adds it anyway
    duplicate_from = len(re.findall(rb"(?im)^from:", raw.partition(b"\r\n\r\n")[0])) > 1
    code, text = await send(linking_gw.smtp_ports[0], raw)
    if duplicate_from:
        # RFC 6376 §8.15: refused before signing, nothing stored.
        assert code == 550 and text.startswith("5.7.1"), text
        assert sink.messages == []
        return
    assert code == 250, (code, text)
    delivered = sink.messages[0].content
    assert dkim.verify(delivered, dnsfunc=txt_lookup(zone)), "DKIM signature does not verify"
    sigs = re.findall(rb"(?m)^DKIM-Signature:.*\ba=([a-z0-9-]+)", delivered)
    assert sorted(sigs) == [b"ed25519-sha256", b"rsa-sha256"]
    body = strip_added(delivered)
    # The gateway saw the message with its Received field on top.
    received = delivered[delivered.index(b"Received:") :]
    received = received[: len(received) - len(body)]
    expected = plan(received + raw, LinkingRules(min_size=1))
    if isinstance(expected, Passthrough):
        # The signer adds the empty line a header section without one lacks
        # (nothing else may change).
        assert body == with_header_separator(raw), f"{name}: passthrough ({expected.reason})"
        assert not URL_RE.search(delivered)
        return
    assert isinstance(expected, Extraction)
    urls = [u.decode() for u in URL_RE.findall(body.replace(b"=\r\n", b""))]
    urls = list(dict.fromkeys(urls))
    assert len(urls) == len(expected.attachments), (name, urls)
    check_rendered(received + raw, expected, received + body, urls)
    wanted = sorted(hashlib.sha256(a.data).hexdigest() for a in expected.attachments)
    got = []
    async with aiohttp.ClientSession() as http:
        for url in urls:
            async with http.get(url + "/file") as resp:
                assert resp.status == 200
                got.append(hashlib.sha256(await resp.read()).hexdigest())
    assert sorted(got) == wanted


async def test_records_removed_when_next_hop_refuses(
    linking_gw: Gateway, sink: CaptureSink
) -> None:
    sink.faults.data = "554 5.7.1 no thanks"
    mixed = (
        f"From: <{ALICE}>\r\nTo: <x@remote.test>\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
        'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        "JVBERi0xLjQKJcfsj6IK\r\n--b--\r\n"
    ).encode()
    code, _ = await send(linking_gw.smtp_ports[0], mixed)
    assert code == 554
    assert linking_gw.stores is not None
    usage = await linking_gw.stores.state.recalc_usage(0)
    assert usage.get(ALICE, 0) == 0
    sink.faults.data = None
    code, _ = await send(linking_gw.smtp_ports[0], mixed)
    assert code == 250
    usage = await linking_gw.stores.state.recalc_usage(0)
    assert usage[ALICE] == 15  # the decoded bytes of the PDF


async def test_duplicate_singleton_headers_refused_before_signing(
    linking_gw: Gateway, sink: CaptureSink
) -> None:
    raw = (
        f"From: <{ALICE}>\r\nTo: <x@remote.test>\r\nSubject: one\r\nSubject: two\r\n"
        "Date: Tue, 24 Nov 2026 08:00:00 +0000\r\nMessage-ID: <d@example.test>\r\n\r\nbody\r\n"
    ).encode()
    code, text = await send(linking_gw.smtp_ports[0], raw)
    assert (code, text[:5]) == (550, "5.7.1"), text
    assert sink.messages == []


async def test_eight_bit_body_is_converted_before_signing(
    tmp_path: Path, dkim_keys: dict[str, Any], zone: ZoneServer
) -> None:
    """A next hop without 8BITMIME: the body is converted to 7 bit first, so
    the signature covers the bytes that leave (RFC 6152, RFC 6376 §5.3)."""
    seven_bit = CaptureSink(eight_bit=False)
    await seven_bit.start()
    cfg = deep_merge(
        base_config(tmp_path, seven_bit.port),
        {
            "smtp": {"trusted_networks": ["127.0.0.1/32"]},
            "domains": {DOMAIN: {"dkim_selector": "rsa1", "dkim_key_file": str(dkim_keys["rsa1"])}},
        },
    )
    gw = await start_gateway(cfg)
    try:
        raw = (
            f"From: <{ALICE}>\r\nTo: <x@remote.test>\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            "Date: Tue, 24 Nov 2026 08:00:00 +0000\r\nMessage-ID: <e@example.test>\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Grüße aus Köln\r\n"
        ).encode()
        code, text = await send(gw.smtp_ports[0], raw)
        assert code == 250, text
        out = seven_bit.messages[0].content
        assert out.isascii()
        assert b"Content-Transfer-Encoding: quoted-printable" in out
        assert dkim.verify(out, dnsfunc=txt_lookup(zone))
    finally:
        await gw.close(drain=1)
        await seven_bit.close()
