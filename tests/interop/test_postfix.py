"""Outside clients judge the gateway: a private Postfix relays through it as its
smarthost (STARTTLS, verified against the test certificate, AUTH as ALICE), and
``swaks`` talks to it once as a second, independent SMTP client.

The gateway runs in this test's event loop, so everything that blocks on the
Postfix side (starting, stopping, reading its queue and log) runs in a thread.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import aiosmtplib
import pytest

from gateway.app import Gateway
from gateway.sink import CaptureSink
from tests.helpers.gw import ALICE, PASSWORD, base_config, start_gateway
from tests.helpers.postfix import PostfixInstance, Smarthost, missing_postfix

_MISSING = missing_postfix()
pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

RECIPIENT = "someone@remote.test"


def _message(subject: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 08:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "Hello from behind Postfix.\r\n.leading dot stays\r\n"
    ).encode()


@asynccontextmanager
async def _gateway(
    tmp_path: Path, sink: CaptureSink, tls: tuple[Path, Path]
) -> AsyncIterator[Gateway]:
    gw = await start_gateway(base_config(tmp_path, sink.port, tls))
    try:
        yield gw
    finally:
        await gw.close()


@asynccontextmanager
async def _postfix(smarthost: Smarthost) -> AsyncIterator[PostfixInstance]:
    pf = PostfixInstance(smarthost=smarthost)
    try:
        await asyncio.to_thread(pf.start)
        yield pf
    finally:
        await asyncio.to_thread(pf.stop)
        pf.remove()


def _queue_id(reply: str) -> str:
    found = re.search(r"queued as ([0-9A-Za-z]+)", reply)
    assert found is not None, reply
    return found.group(1)


async def test_postfix_relays_through_the_gateway(
    tmp_path: Path, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    async with _gateway(tmp_path, sink, tls_files) as gw:
        port = gw.smtp_ports[0]
        hop = Smarthost("127.0.0.1", port, ALICE, PASSWORD, ca_file=tls_files[0])
        async with _postfix(hop) as pf:
            _errors, reply = await aiosmtplib.send(
                _message("via postfix"),
                sender=ALICE,
                recipients=[RECIPIENT],
                hostname="127.0.0.1",
                port=pf.port,
                start_tls=False,
                local_hostname="client.example.test",
            )
            queue_id = _queue_id(reply)
            (got,) = await sink.wait_for(1, 15)
            sent = await asyncio.to_thread(
                pf.wait_for_log, rf"{queue_id}: to=<{re.escape(RECIPIENT)}>, .*status=sent \((.*)\)"
            )
            log = pf.log_text()

    # The sink got exactly what Postfix was given, from the gateway.
    assert got.mail_from == ALICE
    assert got.rcpt_tos == [RECIPIENT]
    assert got.content.endswith(b"Hello from behind Postfix.\r\n.leading dot stays\r\n")
    headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(got.content)
    received = [str(h) for h in headers.get_all("Received", [])]
    assert len(received) == 2, received
    # Newest first: the gateway's stamp (TLS and AUTH: ESMTPSA), then Postfix's.
    assert "by gw.example.test (attachgate) with ESMTPSA" in received[0]
    assert received[0].startswith(f"from {pf.hostname} ([127.0.0.1])")
    assert f"by {pf.hostname} (Postfix) with ESMTP id {queue_id}" in received[1]
    assert "client.example.test" in received[1]

    # Postfix saw the gateway's own 250 reply (the sink's text, passed on faithfully).
    relay_line = sent.group(0)
    assert f"relay=127.0.0.1[127.0.0.1]:{port}" in relay_line
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as SINK1", sent.group(1)), sent.group(1)
    # STARTTLS happened and the chain verified against the test certificate.
    assert re.search(
        rf"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{port}", log
    )
    assert "status=deferred" not in log


async def test_wrong_password_keeps_the_message_deferred(
    tmp_path: Path, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    async with _gateway(tmp_path, sink, tls_files) as gw:
        port = gw.smtp_ports[0]
        hop = Smarthost("127.0.0.1", port, ALICE, "not the password", ca_file=tls_files[0])
        async with _postfix(hop) as pf:
            # This time through sendmail(1): postdrop → pickup → qmgr → smtp.
            await asyncio.to_thread(pf.sendmail, _message("refused"), ALICE, [RECIPIENT])
            deferred = await asyncio.to_thread(
                pf.wait_for_log, r"([0-9A-F]+): to=<[^>]+>, .*status=deferred \((.*)\)"
            )
            queue_id, reason = deferred.group(1), deferred.group(2)
            queue = await asyncio.to_thread(pf.queue)
            log = pf.log_text()

    assert "SASL authentication failed" in reason
    assert re.search(r"server 127\.0\.0\.1\[127\.0\.0\.1\] said: 535 5\.7\.8", reason), reason
    assert re.search(r"SASL authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\]", log)
    # Still Postfix's to deliver: in its queue, not sent, not bounced.
    assert [(q.queue_id, q.recipients) for q in queue] == [(queue_id, [RECIPIENT])]
    # With the short retry times of the test instance it may already be back
    # in line for the next attempt.
    assert queue[0].queue_name in ("deferred", "active", "incoming")
    assert "status=sent" not in log
    assert "status=bounced" not in log
    assert sink.messages == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_auth_plain_over_starttls(
    tmp_path: Path, sink: CaptureSink, tls_files: tuple[Path, Path]
) -> None:
    swaks = shutil.which("swaks")
    assert swaks is not None
    async with _gateway(tmp_path, sink, tls_files) as gw:
        proc = await asyncio.create_subprocess_exec(
            swaks,
            "--server",
            f"127.0.0.1:{gw.smtp_ports[0]}",
            "--helo",
            "swaks.example.test",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(tls_files[0]),
            "--tls-sni",
            "gw.example.test",
            "--auth",
            "PLAIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            PASSWORD,
            "--from",
            ALICE,
            "--to",
            RECIPIENT,
            "--header",
            "Subject: via swaks",
            "--body",
            "Hello from swaks.",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(20):
            out_bytes, _ = await proc.communicate()
        out = out_bytes.decode(errors="replace")
        assert proc.returncode == 0, out
        (got,) = await sink.wait_for(1)

    # swaks prints the dialogue: "<~" marks what came back inside TLS.
    assert re.search(r"<~ +235 ", out), out
    assert re.search(r"<~ +250 2\.0\.0 Ok: queued as SINK1", out), out
    assert got.mail_from == ALICE
    assert got.rcpt_tos == [RECIPIENT]
    headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(got.content)
    assert headers["Subject"] == "via swaks"
    assert "by gw.example.test (attachgate) with ESMTPSA" in str(headers["Received"])
    assert b"Hello from swaks." in got.content
