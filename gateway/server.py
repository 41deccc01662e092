"""aiosmtpd listeners: plain with STARTTLS, implicit TLS; connection limits,
bans at connect, unknown-command limit. No business logic here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.config import Settings, split_listen
from gateway.handler import Handler, names_with_prefix, state_of
from gateway.protocol import GatewaySMTP
from gateway.replies import R421_LOCAL_PROBLEM, R421_TOO_MANY_CONNECTIONS

log = logging.getLogger("attachgate.smtp")


class ConnectionTable:
    """Open connections per client IP, for this process."""

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total = total
        self._by_ip: Counter[str] = Counter()
        self._all = 0
        self.live: set[FrontSMTP] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, ip: str) -> bool:
        if self._all >= self.total or self._by_ip[ip] >= self.per_ip:
            return False
        self._by_ip[ip] += 1
        self._all += 1
        return True

    def leave(self, ip: str) -> None:
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]
        self._all -= 1

    @property
    def open(self) -> int:
        return self._all

    def opened(self, proto: FrontSMTP) -> None:
        self.live.add(proto)
        self._idle.clear()

    def closed(self, proto: FrontSMTP) -> None:
        self.live.discard(proto)
        if not self.live:
            self._idle.set()

    async def drain(self, within: float) -> None:
        """Wait for sessions to end, then close whatever is still open."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)
        for proto in list(self.live):
            proto.close_now()


class _Commands(dict[str, Any]):
    """aiosmtpd's command table, with a fallback for unknown commands."""

    def __init__(self, known: dict[str, Any], unknown: Any) -> None:
        super().__init__(known)
        self._unknown = unknown

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self._unknown)


class FrontSMTP(GatewaySMTP):
    """One client connection."""

    # aiosmtpd sizes its stream buffer by the longest command line it takes
    # (1001 bytes), so the socket is paused and resumed for every chunk of
    # message data. Commands stay bounded by aiosmtpd's command_size_limit.
    line_length_limit = 256 * 1024

    def __init__(
        self,
        handler: Handler,
        *,
        table: ConnectionTable,
        max_unknown: int,
        implicit_tls: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._ag_handler = handler
        self._ag_table = table
        self._ag_max_unknown = max_unknown
        self._ag_unknown = 0
        self._ag_implicit_tls = implicit_tls
        self._ag_counted: str | None = None
        # aiosmtpd counts unknown commands against a fixed budget; answering
        # them here makes the budget configurable.
        self._smtp_methods = _Commands(self._smtp_methods, self._ag_unknown_command)

    def __dir__(self) -> list[str]:
        # aiosmtpd's constructor finds its ``smtp_*`` commands and ``auth_*``
        # mechanisms with dir()/inspect.getmembers() on every connection,
        # which walks every attribute of this class; only those two families
        # are looked up that way, so list just them (computed once).
        return names_with_prefix(type(self), ("smtp_", "auth_"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None
        super().connection_made(transport)
        self._ag_table.opened(self)
        if self._ag_implicit_tls and not starttls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                # aiosmtpd only knows STARTTLS; make implicit TLS count as TLS
                # for AUTH and the Received header.
                self._tls_protocol = transport  # type: ignore[assignment]
                assert self.session is not None
                self.session.ssl = {
                    "cipher": ssl_object.cipher(),
                    "version": ssl_object.version(),
                }

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF but may keep the transport
        # half-open; under uvloop a client that connects and leaves at once
        # (a port check) then stays open until the idle timeout. Close it.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self._ag_table.closed(self)
        if self._ag_counted is not None:
            self._ag_table.leave(self._ag_counted)
            self._ag_counted = None
        session = self.session
        super().connection_lost(error)
        if session is not None:
            task = self.loop.create_task(self._ag_handler.connection_closed(session))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _handle_client(self) -> None:
        info = state_of(self.session)
        ip = str(info.ip)
        metrics = self._ag_handler.s.metrics
        if not self._ag_table.enter(ip):
            metrics.inc("attachgate_smtp_connections_refused_total", reason="limit")
            logs.event(log, "connection-refused", session=info.id, ip=ip, reason="limit")
            await self.push(str(R421_TOO_MANY_CONNECTIONS))
            self._ag_close()
            return
        self._ag_counted = ip
        try:
            refusal = await self._ag_handler.s.abuse.connection_refusal(info.ip)
        except Exception:
            log.exception("ban check failed session=%s", info.id)
            refusal = R421_LOCAL_PROBLEM
        if refusal is not None:
            reason = "error" if refusal is R421_LOCAL_PROBLEM else "banned"
            metrics.inc("attachgate_smtp_connections_refused_total", reason=reason)
            logs.event(log, "connection-refused", session=info.id, ip=ip, reply=refusal.code)
            await self.push(str(refusal))
            self._ag_close()
            return
        metrics.inc("attachgate_smtp_connections_total")
        logs.event(log, "connect", logging.DEBUG, session=info.id, ip=ip)
        await super()._handle_client()

    def data_refused(self, reason: str) -> None:
        # Refused by the DATA reader (too big, NUL): the handler never saw it.
        self._ag_handler.s.metrics.inc("attachgate_messages_total", outcome="failed")

    def _ag_close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_now(self) -> None:
        """Shutdown: the drain time is over."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    async def _ag_unknown_command(self, arg: str | None) -> None:
        self._ag_unknown += 1
        if self._ag_unknown > self._ag_max_unknown:
            await self.push("421 4.7.0 Too many unrecognized commands, goodbye")
            self._ag_close()
            return
        await self.push("500 5.5.2 Error: command not recognized")


_background: set[asyncio.Task[None]] = set()


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _bind(address: str, *, reuse_port: bool) -> socket.socket:
    host, port = split_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_listeners(
    settings: Settings, *, reuse_port: bool = False
) -> dict[str, list[socket.socket]]:
    """Bind every configured SMTP listener (before forking workers)."""
    return {
        "plain": [_bind(a, reuse_port=reuse_port) for a in settings.smtp.listen],
        "tls": [_bind(a, reuse_port=reuse_port) for a in settings.smtp.tls_listen],
    }


async def start_smtp(
    settings: Settings,
    handler: Handler,
    sockets: dict[str, list[socket.socket]],
    table: ConnectionTable,
) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    tls_ctx = None
    if settings.tls.cert_file and settings.tls.key_file:
        tls_ctx = server_tls_context(settings.tls.cert_file, settings.tls.key_file)
    smtp = settings.smtp

    def factory(implicit: bool) -> Callable[[], FrontSMTP]:
        def make() -> FrontSMTP:
            return FrontSMTP(
                handler,
                table=table,
                max_unknown=smtp.max_unknown_commands,
                implicit_tls=implicit,
                data_size_limit=smtp.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=smtp.hostname,
                ident="attachgate",
                tls_context=None if implicit else tls_ctx,
                timeout=smtp.command_timeout,
                auth_required=False,
                auth_require_tls=smtp.auth_require_tls,
                auth_exclude_mechanism=["CRAM-MD5"],
                loop=loop,
            )

        return make

    servers: list[asyncio.Server] = []
    for sock in sockets["plain"]:
        servers.append(await loop.create_server(factory(False), sock=sock))
    for sock in sockets["tls"]:
        assert tls_ctx is not None
        servers.append(await loop.create_server(factory(True), sock=sock, ssl=tls_ctx))
    return servers
