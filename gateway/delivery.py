"""The next hop: a pool of aiosmtplib connections, one transaction at a time
on each, with the next hop's replies passed on faithfully.

Each client transaction holds one next-hop connection from MAIL FROM to the
end of DATA, so every RCPT gets the next hop's own answer and the client gets
``250`` only after the next hop accepted the message (before-queue relaying).

Exception tree::

    DeliveryError            (.reply: the Reply to give the client)
     └── NextHopUnavailable  (connect/TLS/AUTH failed, or the connection dropped)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from gateway.config import NextHopSettings
from gateway.replies import (
    R451_NEXT_HOP_TIMEOUT,
    R451_NEXT_HOP_UNAVAILABLE,
    Reply,
)

log = logging.getLogger("attachgate.delivery")

IDLE_TIMEOUT = 30.0


class DeliveryError(Exception):
    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


class NextHopUnavailable(DeliveryError):
    pass


@dataclass(frozen=True, slots=True)
class HopReply:
    """A reply as the next hop gave it."""

    code: int
    message: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def lines(self) -> str:
        """The reply formatted for aiosmtpd's ``push`` (multi-line aware)."""
        parts = [p for p in self.message.replace("\r", "").split("\n") if p] or ["OK"]
        head = [f"{self.code}-{p}" for p in parts[:-1]]
        return "\r\n".join([*head, f"{self.code} {parts[-1]}"])


def dot_stuff(content: bytes) -> bytes:
    """CRLF-only message → the DATA payload, end-of-data marker included."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    payload = content.replace(b"\r\n.", b"\r\n..")
    if payload.startswith(b"."):
        payload = b"." + payload
    return payload + b".\r\n"


def _timeout_error(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | asyncio.TimeoutError)


def _failure(exc: BaseException, what: str) -> DeliveryError:
    if _timeout_error(exc):
        return DeliveryError(R451_NEXT_HOP_TIMEOUT, f"next hop timed out during {what}: {exc}")
    return NextHopUnavailable(R451_NEXT_HOP_UNAVAILABLE, f"next hop failed during {what}: {exc!r}")


class _Connection:
    __slots__ = ("client", "eightbit", "last_used", "smtputf8")

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.last_used = time.monotonic()
        self.smtputf8 = client.supports_extension("smtputf8")
        self.eightbit = client.supports_extension("8bitmime")


class NextHop:
    """Connections to ``[next_hop]``, pooled and reused across transactions."""

    def __init__(self, settings: NextHopSettings, *, helo_name: str) -> None:
        self._settings = settings
        self.timeout = settings.timeout
        self._helo = settings.helo_name or helo_name
        self._idle: list[_Connection] = []
        self._closed = False
        self._tls = self._tls_context()

    def _tls_context(self) -> ssl.SSLContext:
        s = self._settings
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if not s.verify_certificate:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def _connect(self) -> _Connection:
        s = self._settings
        start_tls: bool | None
        if s.implicit_tls:
            start_tls = False
        else:
            start_tls = {"off": False, "opportunistic": None, "required": True}[s.starttls]
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=self._helo,
            timeout=s.timeout,
            use_tls=s.implicit_tls,
            start_tls=start_tls,
            tls_context=self._tls if (s.implicit_tls or start_tls is not False) else None,
            username=s.username,
            password=s.password.get_secret_value() if s.password else None,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise NextHopUnavailable(
                R451_NEXT_HOP_UNAVAILABLE, f"next hop refused the session: {exc.code} {exc.message}"
            ) from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            client.close()
            raise _failure(exc, "connect") from exc
        return _Connection(client)

    async def _take(self) -> tuple[_Connection, bool]:
        """A connection and whether it came from the pool."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.client.is_connected and now - conn.last_used < IDLE_TIMEOUT:
                return conn, True
            conn.client.close()
        return await self._connect(), False

    def _give_back(self, conn: _Connection) -> None:
        if (
            self._closed
            or not conn.client.is_connected
            or len(self._idle) >= self._settings.pool_size
        ):
            conn.client.close()
            return
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    async def begin(self, sender: str, options: list[str]) -> Transaction | HopReply:
        """Send MAIL FROM. A refusal comes back as the next hop's HopReply."""
        for attempt in (1, 2):
            conn, pooled = await self._take()
            try:
                opts = [o for o in options if self._keep_option(o, conn)]
                resp = await conn.client.execute_command(
                    b"MAIL", b"FROM:<" + sender.encode("utf-8") + b">", *[o.encode() for o in opts]
                )
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                conn.client.close()
                if pooled and attempt == 1 and not _timeout_error(exc):
                    # A pooled connection the next hop closed while idle.
                    continue
                raise _failure(exc, "MAIL FROM") from exc
            if resp.code == 421 or not conn.client.is_connected:
                conn.client.close()
                if pooled and attempt == 1:
                    continue
                return HopReply(resp.code, resp.message)
            if resp.code != 250:
                await self._reset(conn)
                return HopReply(resp.code, resp.message)
            return Transaction(self, conn)
        raise NextHopUnavailable(R451_NEXT_HOP_UNAVAILABLE, "next hop closed the connection")

    @staticmethod
    def _keep_option(option: str, conn: _Connection) -> bool:
        name = option.split("=", 1)[0].upper()
        if name == "SMTPUTF8":
            return conn.smtputf8
        if name == "BODY":
            return conn.eightbit
        # SIZE changes with the rewrite; AUTH= and unknown parameters stay here.
        return False

    async def _reset(self, conn: _Connection) -> None:
        try:
            resp = await conn.client.execute_command(b"RSET", timeout=10)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            conn.client.close()
            return
        if resp.code != 250:
            conn.client.close()
            return
        self._give_back(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.client.quit(), 2)
            conn.client.close()


class Transaction:
    """One MAIL transaction on a next-hop connection."""

    def __init__(self, hop: NextHop, conn: _Connection) -> None:
        self._hop = hop
        self._conn = conn
        self._done = False
        self.accepted = 0

    @property
    def smtputf8(self) -> bool:
        return self._conn.smtputf8

    @property
    def eightbit(self) -> bool:
        return self._conn.eightbit

    async def rcpt(self, recipient: str, options: list[str]) -> HopReply:
        try:
            resp = await self._conn.client.execute_command(
                b"RCPT", b"TO:<" + recipient.encode("utf-8") + b">"
            )
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self._fail()
            raise _failure(exc, "RCPT TO") from exc
        if resp.code in (250, 251):
            self.accepted += 1
        if not self._conn.client.is_connected:
            self._fail()
        return HopReply(resp.code, resp.message)

    async def data(self, content: bytes) -> HopReply:
        """Send the message. ``content`` has CRLF line ends only (the SMTP
        front normalised them); aiosmtplib's own DATA would normalise and
        dot-stuff again with regular expressions, which costs more than the
        rest of the relay path on large messages."""
        self._done = True
        client = self._conn.client
        timeout = self._hop.timeout
        try:
            resp = await client.execute_command(b"DATA")
            if resp.code != 354:
                await self._after_refusal()
                return HopReply(resp.code, resp.message)
            proto = client.protocol
            if proto is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            # The reply to the payload is expected (aiosmtplib would treat it
            # as unsolicited otherwise).
            proto._response_pending = True
            proto.write(dot_stuff(content))
            resp = await proto.read_response(timeout=timeout)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise _failure(exc, "DATA") from exc
        if resp.code != 250:
            await self._after_refusal()
            return HopReply(resp.code, resp.message)
        self._hop._give_back(self._conn)
        return HopReply(resp.code, resp.message)

    async def _after_refusal(self) -> None:
        if self._conn.client.is_connected:
            await self._hop._reset(self._conn)
        else:
            self._conn.client.close()

    async def abort(self) -> None:
        """The client gave up (RSET, QUIT, error): reset and return the connection."""
        if self._done:
            return
        self._done = True
        await self._hop._reset(self._conn)

    def _fail(self) -> None:
        self._done = True
        self._conn.client.close()
