"""Starting a real gateway for a test: settings on tmp_path, a capture sink
as next hop, listeners on port 0, and small SMTP dialogue helpers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import Settings
from gateway.passwords import hash_password

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORD = "correct horse battery staple"
SECRET = "test-secret-key-0123456789abcdef"

_HASH = hash_password(PASSWORD)

# The ``make_gw`` fixture: overrides in, a running gateway out.
GatewayFactory = Callable[..., Awaitable[Gateway]]


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_config(
    tmp_path: Path, sink_port: int, tls: tuple[Path, Path] | None = None
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "smtp": {
            "hostname": "gw.example.test",
            "listen": ["127.0.0.1:0"],
            "trusted_networks": [],
            "max_recipients": 5,
            "max_message_size": "1MiB",
        },
        "next_hop": {"host": "127.0.0.1", "port": sink_port, "starttls": "off", "timeout": "5s"},
        "web": {"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1:1"},
        "links": {"secret_keys": [SECRET]},
        "storage": {"path": str(tmp_path / "blobs")},
        "state": {"path": str(tmp_path / "state.db")},
        "policy": {"mode": "production"},
        "screening": {"failure_delay": 0, "max_failure_delay": 0},
        "domains": {DOMAIN: {}},
        "accounts": {
            ALICE: {"password_hash": _HASH, "send_as": [f"sales@{DOMAIN}"]},
            BOB: {"password_hash": _HASH},
        },
    }
    if tls is not None:
        cfg["tls"] = {"cert_file": str(tls[0]), "key_file": str(tls[1])}
    return cfg


async def start_gateway(config: dict[str, Any]) -> Gateway:
    gateway = Gateway(Settings(**config))
    await gateway.start()
    return gateway


def client_tls(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


class Dialogue:
    """A raw SMTP client: send exact bytes, read whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, source: str | None = None) -> Dialogue:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0) if source else None
        )
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("connection closed")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text[4:])
                if len(text) < 4 or text[3] != "-":
                    return int(text[:3]), "\n".join(lines)

    async def cmd(self, line: str | bytes, expect: int | None = None) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode() + b"\r\n"
        self.writer.write(data)
        await self.writer.drain()
        code, text = await self.reply()
        if expect is not None:
            assert code == expect, (line, code, text)
        return code, text

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        await self.cmd("STARTTLS", 220)
        await self.writer.start_tls(ctx, server_hostname="gw.example.test")

    async def auth_plain(self, login: str, password: str) -> tuple[int, str]:
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def message(sender: str = ALICE, to: str = "someone@remote.test", body: str = "Hello") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: test\r\n"
        f"Date: Tue, 24 Nov 2026 08:00:00 +0000\r\nMessage-ID: <t@example.test>\r\n\r\n{body}\r\n"
    ).encode()


def with_attachment(sender: str, data: bytes, name: str = "file.bin") -> bytes:
    """A message from ``sender`` with a short text part and ``data`` attached (base64)."""
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n").decode()
    return (
        f"From: <{sender}>\r\nTo: <x@remote.test>\r\nSubject: attached\r\n"
        "Date: Tue, 24 Nov 2026 08:00:00 +0000\r\nMessage-ID: <m@example.test>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n--b\r\n"
        f'Content-Type: application/octet-stream; name="{name}"\r\n'
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{b64}--b--\r\n"
    ).encode()


def free_port() -> int:
    """A loopback port nothing listens on right now (for configurations
    that need the number before the server starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
