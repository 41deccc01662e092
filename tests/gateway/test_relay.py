"""The relay path over real sockets: a real gateway in front of a recording
next hop, clients speaking SMTP with aiosmtplib and raw sockets."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.sink import CaptureSink
from tests.gateway.test_protocol import SMUGGLING_VARIANTS
from tests.helpers.gw import (
    ALICE,
    BOB,
    DOMAIN,
    PASSWORD,
    Dialogue,
    GatewayFactory,
    base_config,
    client_tls,
    deep_merge,
    free_port,
    message,
    start_gateway,
)

TRUST_LOCAL = {"smtp": {"trusted_networks": ["127.0.0.1/32"]}}


async def authed(port: int, tls_files: tuple[Path, Path], login: str = ALICE) -> Dialogue:
    d = await Dialogue.open(port)
    await d.reply()
    await d.cmd("EHLO client.test", 250)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO client.test", 250)
    code, text = await d.auth_plain(login, PASSWORD)
    assert code == 235, text
    return d


async def plain(port: int, source: str | None = None) -> Dialogue:
    d = await Dialogue.open(port, source=source)
    await d.reply()
    await d.cmd("EHLO client.test", 250)
    return d


async def send_body(d: Dialogue, body: bytes) -> tuple[int, str]:
    await d.cmd("DATA", 354)
    return await d.cmd(body + b".\r\n")


# --- AUTH ----------------------------------------------------------------------


async def test_auth_offered_only_after_tls(
    make_gw: GatewayFactory, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw()
    d = await Dialogue.open(gw.smtp_ports[0])
    await d.reply()
    code, text = await d.cmd("EHLO client.test", 250)
    assert "STARTTLS" in text
    assert "AUTH" not in text
    code, _ = await d.cmd("AUTH PLAIN AGFsaWNlAHg=")
    assert code == 538
    await d.starttls(client_tls(tls_files[0]))
    _, text = await d.cmd("EHLO client.test", 250)
    assert re.search(r"^AUTH .*LOGIN.*PLAIN", text, re.M)
    await d.close()


async def test_auth_plain_login_and_wrong_password(
    make_gw: GatewayFactory, tls_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gw()
    port = gw.smtp_ports[0]
    d = await authed(port, tls_files)
    await d.close()
    # AUTH LOGIN, interactive.
    d = await Dialogue.open(port)
    await d.reply()
    await d.cmd("EHLO c", 250)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO c", 250)
    import base64

    await d.cmd("AUTH LOGIN", 334)
    await d.cmd(base64.b64encode(BOB.encode()).decode(), 334)
    await d.cmd(base64.b64encode(PASSWORD.encode()).decode(), 235)
    await d.close()
    # Wrong password and unknown user: the same answer.
    caplog.set_level(logging.WARNING, logger="attachgate.smtp")
    d = await Dialogue.open(port)
    await d.reply()
    await d.cmd("EHLO c", 250)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO c", 250)
    wrong = await d.auth_plain(ALICE, "nope")
    unknown = await d.auth_plain("nobody@example.test", PASSWORD)
    assert wrong == unknown == (535, "5.7.8 Authentication credentials invalid")
    await d.close()
    # One fail2ban-matchable line per failure.
    pattern = re.compile(r"auth-failed session=\S+ ip=(?P<host>[0-9a-fA-F.:]+) ")
    hosts = [m.group("host") for r in caplog.records if (m := pattern.search(r.getMessage()))]
    assert hosts == ["127.0.0.1", "127.0.0.1"]


# --- the relay matrix ---------------------------------------------------------


@pytest.mark.parametrize("who", ["auth", "trusted", "neither"])
@pytest.mark.parametrize("rcpt", [f"carol@{DOMAIN}", "someone@remote.test"])
@pytest.mark.parametrize("sender", ["own", "foreign"])
async def test_relay_matrix(
    make_gw: GatewayFactory,
    sink: CaptureSink,
    tls_files: tuple[Path, Path],
    who: str,
    rcpt: str,
    sender: str,
) -> None:
    gw = await make_gw(TRUST_LOCAL)
    port = gw.smtp_ports[0]
    if who == "auth":
        d = await authed(port, tls_files)
    elif who == "trusted":
        d = await plain(port)
    else:
        d = await plain(port, source="127.0.0.2")
    mail_from = ALICE if sender == "own" else "mallory@elsewhere.test"
    code, text = await d.cmd(f"MAIL FROM:<{mail_from}>")
    if who == "auth" and sender == "foreign":
        assert (code, text) == (553, "5.7.1 Sender address not allowed for this login")
        await d.close()
        assert sink.messages == []
        return
    assert code == 250, text
    code, text = await d.cmd(f"RCPT TO:<{rcpt}>")
    if who == "neither":
        assert (code, text) == (554, "5.7.1 Relay access denied")
        await d.close()
        assert sink.messages == []
        return
    assert code == 250, text
    code, text = await send_body(d, message(mail_from, rcpt))
    assert code == 250, text
    await d.close()
    assert [m.rcpt_tos for m in sink.messages] == [[rcpt]]
    assert sink.messages[0].mail_from == mail_from


# --- the reject policy ----------------------------------------------------------


CASES: list[tuple[str, dict[str, Any], str, str, tuple[str, str]]] = [
    # case, config, how, sender, (trial, production)
    ("unknown_account", TRUST_LOCAL, "trusted", f"nobody@{DOMAIN}", ("450 4.1.0", "550 5.1.0")),
    (
        "disabled_account",
        deep_merge(TRUST_LOCAL, {"accounts": {BOB: {"disabled": True}}}),
        "trusted",
        BOB,
        ("450 4.7.1", "550 5.7.1"),
    ),
    ("sender_not_allowed", {}, "auth", BOB, ("450 4.7.1", "553 5.7.1")),
    (
        "ip_shield",
        deep_merge(TRUST_LOCAL, {"domains": {DOMAIN: {"allowed_networks": ["10.0.0.0/8"]}}}),
        "trusted",
        ALICE,
        ("450 4.7.1", "550 5.7.1"),
    ),
]


@pytest.mark.parametrize("mode", ["trial", "production"])
@pytest.mark.parametrize(("case", "config", "how", "sender", "codes"), CASES)
async def test_reject_policy(
    make_gw: GatewayFactory,
    sink: CaptureSink,
    tls_files: tuple[Path, Path],
    mode: str,
    case: str,
    config: dict[str, Any],
    how: str,
    sender: str,
    codes: tuple[str, str],
) -> None:
    gw = await make_gw(config, {"policy": {"mode": mode}})
    port = gw.smtp_ports[0]
    d = await (authed(port, tls_files) if how == "auth" else plain(port))
    code, text = await d.cmd(f"MAIL FROM:<{sender}>")
    expected = codes[0] if mode == "trial" else codes[1]
    assert f"{code} {text}".startswith(expected), (case, code, text)
    await d.close()
    assert sink.messages == []


async def test_policy_case_override(make_gw: GatewayFactory) -> None:
    gw = await make_gw(TRUST_LOCAL, {"policy": {"mode": "trial", "unknown_account": "permanent"}})
    d = await plain(gw.smtp_ports[0])
    code, text = await d.cmd(f"MAIL FROM:<nobody@{DOMAIN}>")
    assert (code, text[:5]) == (550, "5.1.0")
    await d.close()


async def test_send_as_alias_and_trusted_alias(
    make_gw: GatewayFactory, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw(TRUST_LOCAL)
    d = await authed(gw.smtp_ports[0], tls_files)
    await d.cmd(f"MAIL FROM:<Sales@{DOMAIN}>", 250)
    await d.cmd("RCPT TO:<x@remote.test>", 250)
    code, _ = await send_body(d, message(f"sales@{DOMAIN}"))
    assert code == 250
    await d.close()
    assert len(sink.messages) == 1


# --- open relay probes -------------------------------------------------------

IP = "127.0.0.1"
PROBES = [
    ("", "relaytest@nmap.scanme.org"),
    ("antispam@nmap.scanme.org", "relaytest@nmap.scanme.org"),
    ("antispam@gw.example.test", "relaytest@nmap.scanme.org"),
    (f"antispam@[{IP}]", "relaytest@nmap.scanme.org"),
    (f"antispam@[{IP}]", f"relaytest%nmap.scanme.org@[{IP}]"),
    (f"antispam@[{IP}]", "relaytest%nmap.scanme.org@gw.example.test"),
    (f"antispam@[{IP}]", '"relaytest@nmap.scanme.org"'),
    (f"antispam@[{IP}]", '"relaytest%nmap.scanme.org"'),
    (f"antispam@[{IP}]", f"relaytest@nmap.scanme.org@[{IP}]"),
    (f"antispam@[{IP}]", f'"relaytest@nmap.scanme.org"@[{IP}]'),
    (f"antispam@[{IP}]", "relaytest@nmap.scanme.org@gw.example.test"),
    (f"antispam@[{IP}]", f"@[{IP}]:relaytest@nmap.scanme.org"),
    (f"antispam@[{IP}]", "@gw.example.test:relaytest@nmap.scanme.org"),
    (f"antispam@[{IP}]", "nmap.scanme.org!relaytest"),
    (f"antispam@[{IP}]", f"nmap.scanme.org!relaytest@[{IP}]"),
    (f"antispam@[{IP}]", "nmap.scanme.org!relaytest@gw.example.test"),
    # Postfix's routing cases, with a local domain.
    (ALICE, f"user%remote.test@{DOMAIN}"),
    (ALICE, f"remote.test!user@{DOMAIN}"),
    (ALICE, f'"user@remote.test"@{DOMAIN}'),
    (ALICE, "@a.test,@b.test:user@remote.test"),
    (ALICE, "@a,@b:user@remote"),
    (ALICE, "user@remote.test."),
    (ALICE, "user@[1.2.3.4]"),
]


@pytest.mark.parametrize("authenticated", [False, True])
async def test_open_relay_probes_never_reach_the_next_hop(
    make_gw: GatewayFactory, sink: CaptureSink, tls_files: tuple[Path, Path], authenticated: bool
) -> None:
    gw = await make_gw({"smtp": {"trusted_networks": ["127.0.0.1/32"], "max_recipients": 100}})
    port = gw.smtp_ports[0]
    for mail_from, rcpt in PROBES:
        if authenticated:
            d = await authed(port, tls_files, login=BOB)
        else:
            d = await plain(port, source="127.0.0.2")
        code, _ = await d.cmd(f"MAIL FROM:<{mail_from}>")
        if code == 250:
            code, text = await d.cmd(f"RCPT TO:<{rcpt}>")
            assert code >= 500, (mail_from, rcpt, code, text)
            code, _ = await d.cmd("DATA")
            assert code >= 500
        await d.close()
    assert sink.messages == []


# --- smuggling -------------------------------------------------------------------

SMUGGLE = SMUGGLING_VARIANTS


def bare(data: bytes) -> bool:
    stripped = data.replace(b"\r\n", b"")
    return b"\r" in stripped or b"\n" in stripped or b"\x00" in data


@pytest.mark.parametrize("variant", SMUGGLE, ids=[repr(v) for v in SMUGGLE])
async def test_smuggling_variants(
    make_gw: GatewayFactory, sink: CaptureSink, variant: bytes
) -> None:
    gw = await make_gw(TRUST_LOCAL)
    d = await plain(gw.smtp_ports[0])
    await d.cmd(f"MAIL FROM:<{ALICE}>", 250)
    await d.cmd("RCPT TO:<victim@remote.test>", 250)
    await d.cmd("DATA", 354)
    smuggled = (
        b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim2@remote.test>\r\n"
        b"DATA\r\nFrom: admin@example.test\r\n\r\nsmuggled\r\n"
    )
    d.writer.write(message() + b"line" + variant + smuggled + b"\r\n.\r\n")
    await d.writer.drain()
    code, text = await d.reply()
    # Whatever follows must be plain SMTP from a fresh state.
    code2, _ = await d.cmd("RCPT TO:<x@remote.test>")
    assert code2 == 503
    await d.cmd("QUIT", 221)
    await d.close()
    assert len(sink.messages) <= 1
    for m in sink.messages:
        assert not bare(m.content)
        assert m.rcpt_tos == ["victim@remote.test"]
    if b"\x00" in variant:
        assert code == 550 and sink.messages == []
    else:
        assert code == 250, text


async def test_starttls_injection_is_not_executed(
    make_gw: GatewayFactory, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw(TRUST_LOCAL)
    d = await plain(gw.smtp_ports[0])
    d.writer.write(f"STARTTLS\r\nMAIL FROM:<{ALICE}>\r\n".encode())
    await d.writer.drain()
    code, _ = await d.reply()
    if code == 220:
        await d.writer.start_tls(client_tls(tls_files[0]), server_hostname="gw.example.test")
        await d.cmd("EHLO c", 250)
        # Had the injected MAIL run, RCPT would be accepted.
        code, _ = await d.cmd("RCPT TO:<x@remote.test>")
        assert code == 503
    else:
        assert code == 421
    await d.close()


# --- the next hop misbehaves ------------------------------------------------------


async def deliver(port: int) -> list[tuple[int, str]]:
    d = await plain(port)
    replies = [await d.cmd(f"MAIL FROM:<{ALICE}>")]
    replies.append(await d.cmd("RCPT TO:<x@remote.test>"))
    if replies[-1][0] == 250:
        replies.append(await d.cmd("DATA"))
        if replies[-1][0] == 354:
            replies.append(await d.cmd(message() + b".\r\n"))
    await d.close()
    return replies


async def test_next_hop_down(make_gw: GatewayFactory) -> None:
    gw = await make_gw(TRUST_LOCAL, {"next_hop": {"port": free_port()}})
    replies = await deliver(gw.smtp_ports[0])
    assert replies[-1][0] == 451 and replies[-1][1].startswith("4.4.1")


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ({"mail": "451 4.3.2 busy"}, (451, "4.3.2 busy")),
        ({"mail": "550 5.7.1 sender rejected"}, (550, "5.7.1 sender rejected")),
        ({"rcpt": {"x@remote.test": "450 4.2.1 mailbox busy"}}, (450, "4.2.1 mailbox busy")),
        ({"rcpt": {"x@remote.test": "550 5.1.1 no such user"}}, (550, "5.1.1 no such user")),
        ({"data": "452 4.3.1 disk full"}, (452, "4.3.1 disk full")),
        ({"data": "554 5.6.0 content rejected"}, (554, "5.6.0 content rejected")),
        ({"data": "drop"}, (451, "4.4.1")),
    ],
)
async def test_next_hop_replies_passed_on(
    make_gw: GatewayFactory, sink: CaptureSink, fault: dict[str, Any], expect: tuple[int, str]
) -> None:
    for key, value in fault.items():
        setattr(sink.faults, key, value)
    gw = await make_gw(TRUST_LOCAL)
    replies = await deliver(gw.smtp_ports[0])
    code, text = replies[-1]
    assert code == expect[0] and text.startswith(expect[1]), replies
    assert sink.messages == []
    # The pooled connection (or a new one) still works afterwards.
    sink.faults.mail = None
    sink.faults.rcpt = {}
    sink.faults.data = None
    replies = await deliver(gw.smtp_ports[0])
    assert replies[-1][0] == 250
    assert len(sink.messages) == 1


async def test_next_hop_slow_past_timeout(make_gw: GatewayFactory, sink: CaptureSink) -> None:
    sink.faults.delay = 3.0
    gw = await make_gw(TRUST_LOCAL, {"next_hop": {"timeout": "0.5s"}})
    replies = await deliver(gw.smtp_ports[0])
    assert replies[-1][0] == 451 and replies[-1][1].startswith("4.4.2"), replies


async def test_many_messages_on_one_pooled_connection(
    make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    gw = await make_gw(TRUST_LOCAL)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_ports[0], start_tls=False) as c:
        for i in range(20):
            await c.sendmail(ALICE, [f"r{i}@remote.test"], message(body=f"n{i}"))
    assert len(sink.messages) == 20
    assert len({m.peer for m in sink.messages}) == 1
    assert sink.messages[5].content.startswith(b"Received: from ")


# --- limits -------------------------------------------------------------------


async def test_size_limit(make_gw: GatewayFactory, sink: CaptureSink) -> None:
    gw = await make_gw(TRUST_LOCAL)
    d = await plain(gw.smtp_ports[0])
    _, ehlo = await d.cmd("EHLO c", 250)
    assert "SIZE 1048576" in ehlo
    code, _ = await d.cmd(f"MAIL FROM:<{ALICE}> SIZE=2000000")
    assert code == 552
    await d.cmd(f"MAIL FROM:<{ALICE}>", 250)
    await d.cmd("RCPT TO:<x@remote.test>", 250)
    await d.cmd("DATA", 354)
    big = b"X: y\r\n\r\n" + (b"a" * 998 + b"\r\n") * 1100
    code, text = await d.cmd(big + b".\r\n")
    assert (code, text[:5]) == (552, "5.3.4")
    await d.close()
    assert sink.messages == []


async def test_recipient_limit(make_gw: GatewayFactory) -> None:
    gw = await make_gw(TRUST_LOCAL)
    d = await plain(gw.smtp_ports[0])
    await d.cmd(f"MAIL FROM:<{ALICE}>", 250)
    for i in range(5):
        await d.cmd(f"RCPT TO:<r{i}@remote.test>", 250)
    code, text = await d.cmd("RCPT TO:<r5@remote.test>")
    assert (code, text) == (452, "4.5.3 Too many recipients")
    await d.close()


async def test_connections_per_ip(make_gw: GatewayFactory) -> None:
    gw = await make_gw({"smtp": {"max_connections_per_ip": 2}})
    port = gw.smtp_ports[0]
    a = await plain(port)
    b = await plain(port)
    c = await Dialogue.open(port)
    code, _ = await c.reply()
    assert code == 421
    await a.close()
    await b.close()
    await c.close()


async def test_unknown_command_limit(make_gw: GatewayFactory) -> None:
    gw = await make_gw({"smtp": {"max_unknown_commands": 2}})
    d = await plain(gw.smtp_ports[0])
    assert (await d.cmd("FOO"))[0] == 500
    assert (await d.cmd("BAR"))[0] == 500
    assert (await d.cmd("BAZ"))[0] == 421
    assert await d.reader.read() == b""
    await d.close()


async def test_command_timeout(make_gw: GatewayFactory) -> None:
    gw = await make_gw({"smtp": {"command_timeout": "0.3s"}})
    d = await plain(gw.smtp_ports[0])
    async with asyncio.timeout(5):
        rest = await d.reader.read()
    assert b"421" in rest or rest == b""
    await d.close()


async def test_internal_failure_fails_closed(make_gw: GatewayFactory, sink: CaptureSink) -> None:
    gw = await make_gw(TRUST_LOCAL)
    assert gw.stores is not None
    await gw.stores.state.close()  # the state store is gone: nothing may pass
    d = await Dialogue.open(gw.smtp_ports[0])
    code, text = await d.reply()
    assert (code, text) == (421, "4.3.0 Temporary local problem, try again later")
    assert await d.reader.read() == b""
    await d.close()
    assert sink.messages == []


# --- TLS to the next hop -------------------------------------------------------


@pytest.fixture
async def tls_sink(tls_files: tuple[Path, Path]) -> AsyncIterator[CaptureSink]:
    from gateway.server import server_tls_context

    s = CaptureSink(tls=server_tls_context(*tls_files))
    await s.start()
    yield s
    await s.close()


@pytest.mark.parametrize(
    ("next_hop", "delivered"),
    [
        # The sink's certificate is known: STARTTLS, verified.
        ({"starttls": "required", "ca_file": "CA"}, True),
        # Unknown certificate: never sent, never acknowledged.
        ({"starttls": "required"}, False),
        # Verification explicitly off by the administrator.
        ({"starttls": "required", "verify_certificate": False}, True),
        ({"starttls": "opportunistic", "ca_file": "CA"}, True),
    ],
)
async def test_next_hop_starttls(
    make_gw: GatewayFactory,
    tls_sink: CaptureSink,
    tls_files: tuple[Path, Path],
    next_hop: dict[str, Any],
    delivered: bool,
) -> None:
    hop = {k: (str(tls_files[0]) if v == "CA" else v) for k, v in next_hop.items()}
    hop["port"] = tls_sink.port
    gw = await make_gw(TRUST_LOCAL, {"next_hop": hop})
    replies = await deliver(gw.smtp_ports[0])
    if delivered:
        assert replies[-1][0] == 250, replies
        assert len(tls_sink.messages) == 1
    else:
        assert replies[-1][0] == 451 and replies[-1][1].startswith("4.4.1"), replies
        assert tls_sink.messages == []


async def test_next_hop_without_starttls_when_required(
    make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    gw = await make_gw(TRUST_LOCAL, {"next_hop": {"starttls": "required"}})
    replies = await deliver(gw.smtp_ports[0])
    assert replies[-1][0] == 451, replies
    assert sink.messages == []


# --- failed-login screening ----------------------------------------------------------


async def test_password_guesser_is_banned_by_ip(
    make_gw: GatewayFactory, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw({"screening": {"max_auth_failures": 3, "window": "15m", "ban_for": "1h"}})
    port = gw.smtp_ports[0]
    d = await Dialogue.open(port)
    await d.reply()
    await d.cmd("EHLO c", 250)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO c", 250)
    for _ in range(3):
        assert (await d.auth_plain(ALICE, "wrong"))[0] == 535
    await d.close()
    # Banned: even the right password from this address is not heard.
    d = await Dialogue.open(port)
    code, text = await d.reply()
    assert (code, text[:5]) == (421, "4.7.0")
    await d.close()
    # Another address is not affected.
    d = await Dialogue.open(port, source="127.0.0.2")
    assert (await d.reply())[0] == 220
    await d.cmd("EHLO c", 250)
    await d.starttls(client_tls(tls_files[0]))
    await d.cmd("EHLO c", 250)
    assert (await d.auth_plain(ALICE, PASSWORD))[0] == 235
    await d.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_port_checks_leave_no_session_behind(tmp_path: Path, loop: str) -> None:
    """A load balancer's port check (connect, close) frees its slot at once,
    under either event loop (runs its own loop, hence a plain test)."""
    import uvloop

    async def scenario() -> tuple[int, int]:
        gw = await start_gateway(base_config(tmp_path, free_port()))
        try:
            port = gw.smtp_ports[0]
            for _ in range(5):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
            table = gw._table
            assert table is not None
            async with asyncio.timeout(5):
                while table.live or table.open:
                    await asyncio.sleep(0.01)
            return len(table.live), table.open
        finally:
            await gw.close(drain=1)

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    assert runner(scenario()) == (0, 0)


# --- a next hop without 8BITMIME -----------------------------------------------------


@pytest.fixture
async def seven_bit_sink() -> AsyncIterator[CaptureSink]:
    s = CaptureSink(eight_bit=False)
    await s.start()
    yield s
    await s.close()


async def test_eight_bit_body_converted_for_a_seven_bit_next_hop(
    make_gw: GatewayFactory, seven_bit_sink: CaptureSink
) -> None:
    import email
    import email.policy

    gw = await make_gw(TRUST_LOCAL, {"next_hop": {"port": seven_bit_sink.port}})
    text = "Grüße aus Köln – naïve café\r\n"
    raw = (
        f"From: <{ALICE}>\r\nTo: <x@remote.test>\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
    ).encode()
    d = await plain(gw.smtp_ports[0])
    await d.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME", 250)
    await d.cmd("RCPT TO:<x@remote.test>", 250)
    code, reply = await send_body(d, raw)
    assert code == 250, reply
    # 8-bit header: cannot be converted without SMTPUTF8.
    await d.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME", 250)
    await d.cmd("RCPT TO:<x@remote.test>", 250)
    code, reply = await send_body(d, raw.replace(b"Subject: s", "Subject: Grüße".encode()))
    assert (code, reply[:5]) == (554, "5.6.3"), reply
    await d.close()
    assert len(seven_bit_sink.messages) == 1
    out = seven_bit_sink.messages[0].content
    assert out.isascii()
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    body = msg.get_content()
    assert body.replace("\r\n", "\n") == text.replace("\r\n", "\n")


async def test_implicit_tls_listener(
    make_gw: GatewayFactory, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    gw = await make_gw({"smtp": {"listen": [], "tls_listen": ["127.0.0.1:0"]}})
    (port,) = gw.smtp_ports
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, use_tls=True, tls_context=client_tls(tls_files[0])
    ) as client:
        await client.ehlo()
        assert client.supports_extension("auth")
        assert not client.supports_extension("starttls")
        await client.login(ALICE, PASSWORD)
        await client.sendmail(ALICE, ["x@remote.test"], message())
    assert len(sink.messages) == 1
    assert b"with ESMTPSA" in sink.messages[0].content
