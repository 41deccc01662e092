"""Quota and retention: over-quota senders are refused at MAIL FROM; ``gc``
removes expired links and their blobs, never a blob a live link needs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.sink import CaptureSink
from tests.helpers.gw import (
    ALICE,
    BOB,
    GatewayFactory,
    base_config,
    deep_merge,
    with_attachment,
)


async def send(port: int, sender: str, raw: bytes) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            _, text = await client.sendmail(sender, ["x@remote.test"], raw)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
    return 250, text


LINKING = {
    "smtp": {"trusted_networks": ["127.0.0.1/32"]},
    "accounts": {
        ALICE: {"linking": {"enabled": True, "min_size": 10, "quota": 1000}},
        BOB: {"linking": {"enabled": True, "min_size": 10}},
    },
}


@pytest.mark.parametrize(
    ("mode", "expected"), [("trial", "452 4.2.2"), ("production", "552 5.2.2")]
)
async def test_over_quota_refused_at_mail_from(
    make_gw: GatewayFactory, sink: CaptureSink, mode: str, expected: str
) -> None:
    gw = await make_gw(deep_merge(LINKING, {"policy": {"mode": mode}}))
    port = gw.smtp_ports[0]
    assert (await send(port, ALICE, with_attachment(ALICE, os.urandom(600))))[0] == 250
    assert (await send(port, ALICE, with_attachment(ALICE, os.urandom(600))))[0] == 250
    # 1200 bytes stored against a 1000-byte quota: the next message is refused.
    code, text = await send(port, ALICE, with_attachment(ALICE, os.urandom(600)))
    assert f"{code} {text}".startswith(expected), (code, text)
    assert len(sink.messages) == 2
    # Another account is not affected.
    assert (await send(port, BOB, with_attachment(BOB, os.urandom(600))))[0] == 250


def attachgate(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "attachgate"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTACHGATE_")}
    return subprocess.run(
        [str(exe), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def write_config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        return str(v)

    lines = []
    for section, body in cfg.items():
        for key, v in body.items():
            if isinstance(v, dict) and section in ("domains", "accounts"):
                lines.append(f'[{section}."{key}"]')
                lines += [f"{k} = {value(x)}" for k, x in v.items()]
            elif not isinstance(v, dict):
                lines.insert(0, f"{section}.{key} = {value(v)}")
    path = tmp_path / "gc.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_gc_removes_expired_links_and_their_blobs_only(
    tmp_path: Path, make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    extra = deep_merge(LINKING, {"links": {"expire_after": "1d"}, "storage": {"gc_grace": "0s"}})
    old = await make_gw(extra, clock=lambda: time.time() - 3 * 86400)
    port = old.smtp_ports[0]
    shared = os.urandom(500)
    assert (await send(port, BOB, with_attachment(BOB, shared, "old.bin")))[0] == 250
    assert (await send(port, BOB, with_attachment(BOB, os.urandom(500), "gone.bin")))[0] == 250
    await old.close(drain=1)
    # The same file again, today: its blob is shared with an expired link.
    new = await make_gw(extra)
    assert (await send(new.smtp_ports[0], BOB, with_attachment(BOB, shared, "new.bin")))[0] == 250
    await new.close(drain=1)

    blobs = tmp_path / "blobs"
    before = sorted(p.name for p in blobs.rglob("*") if p.is_file() and len(p.name) == 64)
    assert len(before) == 2
    config = write_config(tmp_path, deep_merge(base_config(tmp_path, sink.port), extra))
    res = attachgate("gc", config=config)
    assert res.returncode == 0, res.stderr
    assert "expired records deleted: 2; blobs deleted: 1" in res.stdout
    after = sorted(p.name for p in blobs.rglob("*") if p.is_file() and len(p.name) == 64)
    import hashlib

    assert after == [hashlib.sha256(shared).hexdigest()]
    res = attachgate("quota", "recalc", config=config)
    assert res.returncode == 0, res.stderr
    assert f"{BOB}  500" in res.stdout


async def test_notice_templates_with_bare_line_feeds_leave_as_crlf(
    tmp_path: Path, make_gw: GatewayFactory, sink: CaptureSink
) -> None:
    from gateway.mime import notice
    from tests.gateway.test_relay import bare

    templates = tmp_path / "templates"
    templates.mkdir()
    defaults = Path(notice.__file__).parent / "templates"
    for name in ("notice.txt", "notice.html"):
        text = (defaults / name).read_bytes().replace(b"\r\n", b"\n")
        (templates / name).write_bytes(text + b"\nthird line\rwith a bare CR\n")
    gw = await make_gw(deep_merge(LINKING, {"linking": {"templates_dir": str(templates)}}))
    assert (await send(gw.smtp_ports[0], BOB, with_attachment(BOB, os.urandom(600))))[0] == 250
    out = sink.messages[0].content
    assert b"third line" in out
    assert not bare(out)
