"""A capture sink: an SMTP server that records what it receives.

The demo uses it as the next hop; the tests use it as a recording peer that
can refuse, delay or drop at any command.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass(frozen=True, slots=True)
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: str


@dataclass
class Faults:
    """What the sink does instead of accepting. Replies are full SMTP lines
    (``"451 4.3.0 try later"``); ``"drop"`` closes the connection."""

    mail: str | None = None
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient → reply
    data: str | None = None
    delay: float = 0.0  # before answering DATA


class _SinkHandler:
    def __init__(self, sink: CaptureSink) -> None:
        self.sink = sink

    async def _fault(self, server: Any, reply: str | None) -> str | None:
        if reply == "drop":
            server.transport.close()
            return "421 4.3.0 dropped"
        return reply

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        fault = await self._fault(server, self.sink.faults.mail)
        if fault:
            return fault
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        fault = await self._fault(server, self.sink.faults.rcpt.get(address.lower()))
        if fault:
            return fault
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.sink.faults.delay:
            await asyncio.sleep(self.sink.faults.delay)
        fault = await self._fault(server, self.sink.faults.data)
        if fault:
            return fault
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        raw = envelope.original_content if isinstance(envelope.content, str) else envelope.content
        msg = Captured(envelope.mail_from, list(envelope.rcpt_tos), bytes(raw), peer)
        self.sink.messages.append(msg)
        self.sink.arrived.set()
        return f"250 2.0.0 Ok: queued as SINK{len(self.sink.messages)}"


class _SinkSMTP(SMTP):
    # Real next hops take long lines (the corpus has 7000-character ones);
    # aiosmtpd's default would refuse them.
    line_length_limit = 1 << 20

    def __init__(self, live: set[asyncio.BaseTransport], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live = live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._live.add(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.transport is not None:
            self._live.discard(self.transport)
        super().connection_lost(error)


class CaptureSink:
    """Start with ``await sink.start()``; ``sink.port`` is the bound port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        eight_bit: bool = True,
    ) -> None:
        self.host = host
        self._port = port
        self._tls = tls
        # Without 8BITMIME the sink is a 7-bit next hop (aiosmtpd announces
        # it only when it does not decode the data).
        self._eight_bit = eight_bit
        self.messages: list[Captured] = []
        self.faults = Faults()
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handler = _SinkHandler(self)
        self._live: set[asyncio.BaseTransport] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def make() -> SMTP:
            return _SinkSMTP(
                self._live,
                self._handler,
                hostname="sink.test",
                ident="capture-sink",
                data_size_limit=0,
                tls_context=self._tls,
                enable_SMTPUTF8=self._eight_bit,
                decode_data=not self._eight_bit,
                loop=loop,
            )

        self._server = await loop.create_server(make, self.host, self._port)

    async def wait_for(self, count: int, within: float = 10.0) -> list[Captured]:
        async with asyncio.timeout(within):
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self._live):
                transport.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
