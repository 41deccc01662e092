"""Hijack limits through the whole gateway: real SMTP in, the notification at
the recording next hop, the administrator's reply as a real SMTP message,
state across a restart, and two worker processes sharing one SQLite file."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from gateway.sink import CaptureSink
from tests.gateway.test_retention import write_config
from tests.helpers.gw import ALICE, GatewayFactory, base_config, deep_merge, free_port, message

ADMIN = "postmaster@example.test"
CONTROL = "attachgate-control@gw.example.test"
HIJACK = {
    "smtp": {"trusted_networks": ["127.0.0.1/32"], "max_recipients": 50},
    "hijack": {"max_messages": 3, "max_recipients": 20, "window": "1h", "notify": [ADMIN]},
}


async def send(port: int, sender: str, rcpts: list[str], raw: bytes) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            _, text = await client.sendmail(sender, rcpts, raw)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return first.code, first.message
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
    return 250, text


def notifications(sink: CaptureSink) -> list[bytes]:
    return [m.content for m in sink.messages if ADMIN in m.rcpt_tos]


def reply_to(notice: bytes, sender: str = ADMIN) -> bytes:
    subject = str(email.message_from_bytes(notice, policy=email.policy.default)["Subject"])
    return (
        f"From: <{sender}>\r\nTo: <{CONTROL}>\r\n"
        f"Subject: Re: {subject}\r\n"
        "Date: Tue, 24 Nov 2026 09:00:00 +0000\r\nMessage-ID: <r@example.test>\r\n\r\n"
        "Checked with Alice, please re-enable.\r\n"
    ).encode()


@pytest.mark.parametrize(("mode", "expected"), [("trial", 450), ("production", 550)])
async def test_message_limit_freezes_notifies_once_and_reply_unfreezes(
    make_gw: GatewayFactory, sink: CaptureSink, mode: str, expected: int
) -> None:
    gw = await make_gw(HIJACK, {"policy": {"mode": mode}})
    port = gw.smtp_ports[0]
    for i in range(3):
        assert (await send(port, ALICE, [f"r{i}@remote.test"], message()))[0] == 250
    code, text = await send(port, ALICE, ["r3@remote.test"], message())
    assert (code, text[:5]) == (expected, f"{expected // 100}.7.1")
    # Frozen: every later message is refused at MAIL FROM, whatever its size.
    for i in range(5):
        code, _ = await send(port, ALICE, [f"later{i}@remote.test"], message())
        assert code == expected
    await sink.wait_for(4)
    assert gw.abuse is not None
    await gw.abuse.drain()
    notes = notifications(sink)
    assert len(notes) == 1, "one notification, not one per message"
    assert ALICE.encode() in notes[0]
    assert [m.rcpt_tos for m in sink.messages if ADMIN not in m.rcpt_tos] == [
        ["r0@remote.test"],
        ["r1@remote.test"],
        ["r2@remote.test"],
    ]
    # A reply from someone else does nothing; the administrator's does.
    code, _ = await send(
        port, "mallory@remote.test", [CONTROL], reply_to(notes[0], "mallory@remote.test")
    )
    assert code == 550
    assert (await send(port, ALICE, ["x@remote.test"], message()))[0] == expected
    code, text = await send(port, ADMIN, [CONTROL], reply_to(notes[0]))
    assert code == 250, text
    assert (await send(port, ALICE, ["again@remote.test"], message()))[0] == 250
    # The token is single-use.
    code, _ = await send(port, ADMIN, [CONTROL], reply_to(notes[0]))
    assert code == 550
    # The control message itself was consumed, never forwarded.
    assert not any(CONTROL in m.rcpt_tos for m in sink.messages)


async def test_recipient_limit_and_state_survive_a_restart(
    make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    gw = await make_gw(HIJACK)
    port = gw.smtp_ports[0]
    rcpts = [f"r{i}@remote.test" for i in range(25)]
    code, _ = await send(port, ALICE, rcpts, message())
    # The 21st recipient crosses the limit; the message goes nowhere.
    assert code == 550
    await gw.close(drain=1)
    gw2 = await make_gw(HIJACK)
    code, text = await send(gw2.smtp_ports[0], ALICE, ["x@remote.test"], message())
    assert (code, text[:5]) == (550, "5.7.1"), "the freeze survives a restart"


async def test_two_workers_share_the_limit(tmp_path: Path, sink: CaptureSink) -> None:
    port = free_port()
    cfg = deep_merge(
        base_config(tmp_path, sink.port),
        deep_merge(
            HIJACK,
            {
                "smtp": {"listen": [f"127.0.0.1:{port}"]},
                "web": {"enabled": False},
                "hijack": {"max_messages": 6, "freeze": False},
                "log": {"level": "info"},
            },
        ),
    )
    config = write_config(tmp_path, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTACHGATE_")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "attachgate"), "serve", "--workers", "2",
         "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    logs: list[str] = []
    try:
        loop = asyncio.get_running_loop()
        ready = 0
        while ready < 2:
            line = await loop.run_in_executor(None, proc.stderr.readline)
            assert line, "the server exited before it was ready"
            logs.append(line)
            ready += "attachgate serving" in line
        results = []
        for i in range(20):
            results.append((await send(port, ALICE, [f"r{i}@remote.test"], message()))[0])
        assert results.count(250) == 6, results
        assert set(results) == {250, 550}
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.get_running_loop().run_in_executor(None, proc.stderr.read)
        proc.wait(timeout=30)
        proc.stderr.close()
        logs.append(rest)
    served = r"attachgate\.smtp\[(\d+)\] INFO (?:message|rcpt-refused) "
    pids = {m.group(1) for m in re.finditer(served, "".join(logs))}
    assert len(pids) == 2, "both workers served sessions"
    assert len([m for m in sink.messages if ADMIN not in m.rcpt_tos]) == 6


async def test_locked_state_fails_closed(
    make_gw: GatewayFactory, sink: CaptureSink, tmp_path: Path
) -> None:
    import sqlite3

    gw = await make_gw(HIJACK, {"state": {"busy_timeout": "0.3s"}})
    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        # Another process holds the write lock past the timeout: the recipient
        # cannot be counted, so it is not accepted.
        holder.execute("BEGIN EXCLUSIVE")
        code, text = await send(gw.smtp_ports[0], ALICE, ["x@remote.test"], message())
        assert (code, text) == (451, "4.3.0 Temporary local problem, try again later")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sink.messages == []
    assert (await send(gw.smtp_ports[0], ALICE, ["x@remote.test"], message()))[0] == 250
