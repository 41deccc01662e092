"""aiosmtpd hooks → policy decisions → replies.

The handler only translates: it asks pure policy functions what to answer,
the abuse controls what the state says, the processor to rewrite and sign,
and the next hop to take the message. Any exception or timeout in those steps
ends in ``451 4.3.0`` with a generic text; the log has the session id and
the details. Nothing is acknowledged that the next hop has not accepted.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Protocol

from aiosmtpd.smtp import AuthResult

from gateway import logs
from gateway.addresses import Address, AddressError, parse_mailbox, parse_reverse_path
from gateway.config import Settings
from gateway.delivery import DeliveryError, HopReply, NextHop, Transaction
from gateway.passwords import PasswordChecker
from gateway.policy.accounts import Account, Directory, IPAddress
from gateway.policy.relay import Client, Refused, check_sender, may_relay
from gateway.replies import (
    R250_QUEUED,
    R451_INTERNAL,
    R452_TOO_MANY_RECIPIENTS,
    R535_AUTH_FAILED,
    R550_NUL,
    R550_ROUTED_ADDRESS,
    R553_BAD_ADDRESS,
    R554_NO_VALID_RECIPIENTS,
    R554_RELAY_DENIED,
    Reply,
)
from web.metrics import Metrics

log = logging.getLogger("attachgate.smtp")


@dataclass(slots=True)
class TxInfo:
    """What the processor needs to know about one message."""

    session_id: str
    client: Client
    helo: str
    sender: Address | None
    account: Account | None
    recipients: list[str]
    tls: bool
    # The next hop did not announce 8BITMIME: 8-bit bodies are converted
    # before signing (RFC 6152), or the message is refused.
    seven_bit: bool = False


class MessageRefused(Exception):
    """Raised by a processor for a refusal chosen by policy; ``reply`` goes to the client."""

    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Processed:
    content: bytes
    link_ids: list[str] = field(default_factory=list)
    linked_bytes: int = 0  # decoded size of what the links replaced
    signed: bool = False  # DKIM


class Processor(Protocol):
    async def process(self, tx: TxInfo, content: bytes) -> Processed:
        """``content`` has CRLF line ends only (the DATA reader saw to it); so
        must ``Processed.content``: it goes to the next hop as it is."""

    async def discard(self, processed: Processed) -> None:
        """The next hop did not take the message: undo what ``process`` stored."""


class Abuse(Protocol):
    async def connection_refusal(self, ip: IPAddress) -> Reply | None: ...

    async def auth_failed(self, ip: IPAddress, login: str, mechanism: str) -> float:
        """Record a failure; return the delay before answering."""

    async def sender_refusal(self, account: Account) -> Reply | None:
        """Frozen, over quota: checked at MAIL FROM."""

    async def recipient_refusal(self, tx: TxInfo, account: Account, count: int) -> Reply | None:
        """Counts a recipient (and, for the first, the message) in the windows."""

    def is_control_address(self, address: Address) -> bool: ...

    async def control_message(self, tx: TxInfo, content: bytes) -> Reply: ...


@dataclass(slots=True)
class Services:
    settings: Settings
    directory: Directory
    next_hop: NextHop
    passwords: PasswordChecker
    processor: Processor
    abuse: Abuse
    clock: Callable[[], float] = time.time
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(slots=True)
class SessionInfo:
    id: str
    ip: IPAddress
    login: str | None = None
    tx: Transaction | None = None
    tx_info: TxInfo | None = None
    control: bool = False  # this transaction is for the control address
    # A hijack limit crossed during this transaction: the message is refused
    # at DATA too, even for the recipients accepted before the crossing.
    crossed: Reply | None = None


def _client_ip(session: Any) -> IPAddress:
    peer = session.peer
    host = peer[0] if isinstance(peer, tuple) else "0.0.0.0"
    return ipaddress.ip_address(host.split("%", 1)[0])


def _session_id() -> str:
    return secrets.token_hex(6)


def state_of(session: Any) -> SessionInfo:
    info: SessionInfo | None = getattr(session, "ag", None)
    if info is None:
        info = SessionInfo(id=_session_id(), ip=_client_ip(session))
        session.ag = info
    return info


def _is_tls(session: Any) -> bool:
    return session.ssl is not None


def _protocol_name(session: Any, info: SessionInfo) -> str:
    name = "ESMTP" if session.extended_smtp else "SMTP"
    if _is_tls(session):
        name += "S"
    if info.login is not None:
        name += "A"
    return name


def received_header(hostname: str, tx: TxInfo, proto: str, now: float) -> bytes:
    helo = "".join(c for c in tx.helo if 0x21 <= ord(c) < 0x7F)[:255] or "unknown"
    for_part = f"\r\n\tfor <{tx.recipients[0]}>" if len(tx.recipients) == 1 else ""
    line = (
        f"Received: from {helo} ([{tx.client.ip}])\r\n\tby {hostname} (attachgate) "
        f"with {proto} id {tx.session_id}{for_part};\r\n\t{formatdate(now, usegmt=True)}\r\n"
    )
    return line.encode("utf-8", "replace")


_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def names_with_prefix(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The class's attribute names with those prefixes, computed once."""
    key = (cls, prefixes)
    names = _NAMES.get(key)
    if names is None:
        names = _NAMES[key] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return names


class Handler:
    """The aiosmtpd handler: one instance serves every session of a process.

    HELO/EHLO need no hook: aiosmtpd resets the envelope itself, and a
    next-hop transaction left open by a client that greets again is reset
    at its next MAIL FROM or when the connection closes.
    """

    def __dir__(self) -> list[str]:
        # aiosmtpd looks up ``handle_*`` hooks and ``auth_*`` mechanisms with
        # dir()/inspect.getmembers() for every connection; list just those.
        return names_with_prefix(type(self), ("handle_", "auth_"))

    def __init__(self, services: Services) -> None:
        self.s = services
        self._trusted = services.settings.smtp.trusted_networks

    # --- AUTH --------------------------------------------------------------

    @staticmethod
    async def _first_response(server: Any, args: list[str], challenge: str) -> bytes | None:
        """The client's first AUTH answer: inline (``AUTH X data``) or after a
        challenge. None when it was aborted or undecodable (already answered)."""
        if len(args) == 1:
            answer = await server.challenge_auth(challenge)
            return answer if isinstance(answer, bytes) else None
        try:
            return base64.b64decode(args[1].encode(), validate=True)
        except ValueError:
            await server.push("501 5.5.2 Cannot decode base64")
            return None

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        blob = await self._first_response(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split auth value")
            return AuthResult(success=False, handled=True)
        _authz, login, password = parts
        return await self._check_login(server, "PLAIN", login, password)

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        login = await self._first_response(server, args, server.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login(server, "LOGIN", login, password)

    async def _check_login(
        self, server: Any, mechanism: str, login_b: bytes, password: bytes
    ) -> AuthResult:
        session = server.session
        info = state_of(session)
        login = login_b.decode("utf-8", "replace")
        try:
            account = self.s.directory.account(login) if "@" in login else None
            ok = await self.s.passwords.verify(
                account.password_hash if account and not account.disabled else None, password
            )
        except Exception:
            log.exception("auth check failed session=%s", info.id)
            await server.push(str(R451_INTERNAL))
            return AuthResult(success=False, handled=True)
        if ok and account is not None:
            self.s.metrics.inc("attachgate_auth_total", result="ok")
            info.login = account.address
            logs.event(
                log, "auth-ok", session=info.id, ip=info.ip, mech=mechanism, login=account.address
            )
            return AuthResult(success=True, auth_data=account.address)
        self.s.metrics.inc("attachgate_auth_total", result="failed")
        logs.event(
            log,
            "auth-failed",
            logging.WARNING,
            session=info.id,
            ip=info.ip,
            proto="ESMTP",
            mech=mechanism,
            login=login,
        )
        try:
            delay = await self.s.abuse.auth_failed(info.ip, login, mechanism)
        except Exception:
            log.exception("screening failed session=%s", info.id)
            delay = 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        await server.push(str(R535_AUTH_FAILED))
        return AuthResult(success=False, handled=True)

    # --- transaction -----------------------------------------------------

    async def _abort_tx(self, info: SessionInfo) -> None:
        tx, info.tx, info.tx_info, info.control = info.tx, None, None, False
        info.crossed = None
        if tx is not None:
            try:
                await tx.abort()
            except Exception:
                log.exception("next hop reset failed session=%s", info.id)

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        await self._abort_tx(state_of(session))
        return "250 2.0.0 OK"

    async def connection_closed(self, session: Any) -> None:
        info: SessionInfo | None = getattr(session, "ag", None)
        if info is not None:
            await self._abort_tx(info)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        info = state_of(session)
        await self._abort_tx(info)
        try:
            return await self._mail(server, session, envelope, info, address, mail_options)
        except Exception:
            log.exception("MAIL FROM failed session=%s", info.id)
            await self._abort_tx(info)
            return str(R451_INTERNAL)

    async def _mail(
        self,
        server: Any,
        session: Any,
        envelope: Any,
        info: SessionInfo,
        address: str,
        mail_options: list[str],
    ) -> str:
        smtputf8 = bool(envelope.smtp_utf8)
        try:
            sender = parse_reverse_path(address, smtputf8=smtputf8)
        except AddressError as exc:
            logs.event(log, "mail-refused", session=info.id, ip=info.ip, reason=str(exc))
            return str(R553_BAD_ADDRESS.with_text(f"Invalid sender address: {exc}"))
        if sender is not None and sender.had_route:
            return str(R550_ROUTED_ADDRESS)
        client = Client(ip=info.ip, login=info.login, tls=_is_tls(session))
        decision = check_sender(
            client, sender, self.s.directory, self.s.settings.policy, self._trusted
        )
        if isinstance(decision, Refused):
            self.s.metrics.inc("attachgate_refusals_total", case=decision.case)
            return self._mail_refused(info, sender, decision.case, decision.reply)
        account = decision.account
        if account is not None:
            refusal = await self.s.abuse.sender_refusal(account)
            if refusal is not None:
                return self._mail_refused(info, sender, "account-state", refusal, account)
        info.tx_info = TxInfo(
            session_id=info.id,
            client=client,
            helo=str(session.host_name or ""),
            sender=sender,
            account=account,
            recipients=[],
            tls=client.tls,
        )
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    @staticmethod
    def _mail_refused(
        info: SessionInfo,
        sender: Address | None,
        case: str,
        reply: Reply,
        account: Account | None = None,
    ) -> str:
        logs.event(
            log,
            "mail-refused",
            session=info.id,
            ip=info.ip,
            login=info.login,
            sender=sender,
            account=account.address if account else None,
            case=case,
            reply=reply.code,
        )
        return str(reply)

    async def _open_next_hop(self, info: SessionInfo, envelope: Any) -> Transaction | HopReply:
        tx_info = info.tx_info
        assert tx_info is not None
        sender = "" if tx_info.sender is None else str(tx_info.sender)
        return await self.s.next_hop.begin(sender, list(envelope.mail_options))

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        info = state_of(session)
        try:
            return await self._rcpt(session, envelope, info, address)
        except DeliveryError as exc:
            logs.event(log, "next-hop-failed", logging.WARNING, session=info.id, detail=str(exc))
            self.s.metrics.inc("attachgate_next_hop_failures_total")
            info.tx = None
            return str(exc.reply)
        except Exception:
            log.exception("RCPT TO failed session=%s", info.id)
            return str(R451_INTERNAL)

    async def _rcpt(self, session: Any, envelope: Any, info: SessionInfo, address: str) -> str:
        tx_info = info.tx_info
        if tx_info is None:
            return "503 5.5.1 Need MAIL command"
        try:
            rcpt = parse_mailbox(address, smtputf8=bool(envelope.smtp_utf8))
        except AddressError as exc:
            return str(R553_BAD_ADDRESS.with_text(f"Invalid recipient address: {exc}"))
        if rcpt.had_route:
            return str(R550_ROUTED_ADDRESS)
        if self.s.abuse.is_control_address(rcpt):
            if tx_info.recipients and not info.control:
                return "452 4.5.3 Send control messages on their own"
            info.control = True
            tx_info.recipients.append(str(rcpt))
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Recipient OK"
        if info.control:
            return "452 4.5.3 Send control messages on their own"
        if not may_relay(tx_info.client, self._trusted):
            logs.event(log, "relay-denied", logging.WARNING, session=info.id, ip=info.ip, rcpt=rcpt)
            self.s.metrics.inc("attachgate_refusals_total", case="relay_denied")
            return str(R554_RELAY_DENIED)
        if len(tx_info.recipients) >= self.s.settings.smtp.max_recipients:
            return str(R452_TOO_MANY_RECIPIENTS)
        if tx_info.account is not None:
            refusal = await self.s.abuse.recipient_refusal(
                tx_info, tx_info.account, len(tx_info.recipients) + 1
            )
            if refusal is not None:
                info.crossed = refusal
                logs.event(
                    log,
                    "rcpt-refused",
                    session=info.id,
                    ip=info.ip,
                    account=tx_info.account.address,
                    reply=refusal.code,
                )
                return str(refusal)
        if info.tx is None:
            opened = await self._open_next_hop(info, envelope)
            if isinstance(opened, HopReply):
                logs.event(log, "next-hop-refused-sender", session=info.id, reply=opened.lines())
                return opened.lines()
            info.tx = opened
        hop = await info.tx.rcpt(str(rcpt), [])
        if hop.ok:
            tx_info.recipients.append(str(rcpt))
            envelope.rcpt_tos.append(address)
        return hop.lines()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        info = state_of(session)
        tx_info = info.tx_info
        size = len(envelope.content or b"")
        outcome = "failed"
        reply_text = ""
        try:
            if tx_info is None or not tx_info.recipients:
                reply_text = str(R554_NO_VALID_RECIPIENTS)
                return reply_text
            content: bytes = envelope.content
            if b"\x00" in content:
                reply_text = str(R550_NUL)
                return reply_text
            if info.crossed is not None:
                reply_text = str(info.crossed)
                return reply_text
            if info.control:
                reply = await self.s.abuse.control_message(tx_info, content)
                outcome = "control"
                reply_text = str(reply)
                return reply_text
            reply_text, outcome = await self._deliver(session, info, tx_info, content)
            return reply_text
        except MessageRefused as exc:
            logs.event(log, "data-refused", session=info.id, detail=str(exc))
            reply_text = str(exc.reply)
            return reply_text
        except Exception:
            log.exception("DATA failed session=%s", info.id)
            reply_text = str(R451_INTERNAL)
            return reply_text
        finally:
            if info.tx is not None and outcome != "delivered":
                await self._abort_tx(info)
            info.tx = None
            info.tx_info = None
            info.control = False
            info.crossed = None
            metrics = self.s.metrics
            metrics.inc("attachgate_messages_total", outcome=outcome)
            if outcome == "delivered" and tx_info is not None:
                metrics.inc("attachgate_delivered_bytes_total", size)
                metrics.inc("attachgate_delivered_recipients_total", len(tx_info.recipients))
            logs.event(
                log,
                "message",
                session=info.id,
                ip=info.ip,
                tls="yes" if _is_tls(session) else "no",
                login=info.login,
                sender=tx_info.sender if tx_info else None,
                account=tx_info.account.address if tx_info and tx_info.account else None,
                rcpts=len(tx_info.recipients) if tx_info else 0,
                size=size,
                reply=reply_text.replace("\r\n", " | "),
                outcome=outcome,
            )

    async def _deliver(
        self, session: Any, info: SessionInfo, tx_info: TxInfo, content: bytes
    ) -> tuple[str, str]:
        tx = info.tx
        assert tx is not None
        now = self.s.clock()
        header = received_header(
            self.s.settings.smtp.hostname, tx_info, _protocol_name(session, info), now
        )
        tx_info.seven_bit = not tx.eightbit
        processed = await self.s.processor.process(tx_info, header + content)
        try:
            hop = await tx.data(processed.content)
        except DeliveryError as exc:
            info.tx = None
            await self.s.processor.discard(processed)
            logs.event(log, "next-hop-failed", logging.WARNING, session=info.id, detail=str(exc))
            self.s.metrics.inc("attachgate_next_hop_failures_total")
            return str(exc.reply), "deferred"
        except BaseException:
            info.tx = None
            await asyncio.shield(self.s.processor.discard(processed))
            raise
        info.tx = None
        if not hop.ok:
            await self.s.processor.discard(processed)
            return hop.lines(), "refused-by-next-hop"
        metrics = self.s.metrics
        if processed.link_ids:
            metrics.inc("attachgate_attachments_linked_total", len(processed.link_ids))
            metrics.inc("attachgate_attachment_bytes_linked_total", processed.linked_bytes)
        if processed.signed:
            metrics.inc("attachgate_dkim_signed_total")
        if not hop.message.strip():
            return str(R250_QUEUED), "delivered"
        return hop.lines(), "delivered"

    async def handle_exception(self, error: Exception) -> str:
        log.error("session error: %r", error)
        return str(R451_INTERNAL)
