"""Administrator notifications: short, plain-text emails sent through the next hop.

A notification is a proper RFC 5322 message (``Date``, ``Message-ID``,
``From``, ``Auto-Submitted: auto-generated``) sent with the gateway's own
envelope sender through :class:`gateway.delivery.NextHop`, the same way as
the mail it relays. Each attempt is recorded in the state store
(``log_notification``), one row per recipient, so the admin page can list
what was sent and what failed.

De-duplication: a caller passes ``dedup_key`` and ``dedup_for``; the first
caller per key within that time (across every worker sharing the state
store, through ``claim_once``) sends, the others get ``False``. The claim is
taken before the message goes out, so the worker that took it owns the
notification: when the next hop was unreachable or answered 4xx, that worker
tries again after each of ``retry_delays`` (in the background; a 5xx or a
success ends it). Every failed attempt is logged at ERROR level.

A notification never raises into the SMTP session that caused it: any error
(the next hop, the state store) is logged and :meth:`Notifier.send` answers
``False``. Cancellation is passed on.

This module defines no exceptions of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formataddr, formatdate, make_msgid

from gateway import logs
from gateway.delivery import HopReply, NextHop
from storage.interfaces import Notification, StateStore
from web.metrics import Metrics

__all__ = ["Notifier", "build_notification"]

log = logging.getLogger("attachgate.notify")

DISPLAY_NAME = "attachgate"


def build_notification(
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    body: str,
    hostname: str,
    now: float,
    reply_to: str | None = None,
) -> bytes:
    """The notification as wire bytes (CRLF line ends). Pure apart from the
    random part of the Message-ID."""
    msg = EmailMessage()
    msg["From"] = formataddr((DISPLAY_NAME, sender))
    msg["To"] = ", ".join(recipients)
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid("attachgate", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP_POLICY)


class Notifier:
    """Sends administrator notifications through the next hop."""

    def __init__(
        self,
        *,
        next_hop: NextHop,
        hostname: str,
        sender: str | None,
        state: StateStore,
        clock: Callable[[], float] = time.time,
        retry_delays: Sequence[float] = (),
        metrics: Metrics | None = None,
        sign: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._sign = sign
        self._next_hop = next_hop
        self._hostname = hostname
        self._sender = sender or f"postmaster@{hostname}"
        self._state = state
        self._clock = clock
        self._retry_delays = tuple(retry_delays)
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def sender(self) -> str:
        return self._sender

    async def send(
        self,
        kind: str,
        recipients: Sequence[str],
        subject: str,
        body: str,
        *,
        dedup_key: str | None,
        dedup_for: float,
        reply_to: str | None = None,
    ) -> bool:
        """Send one notification; True when the next hop accepted it for at
        least one recipient. Never raises (except cancellation)."""
        rcpts = [r for r in recipients if r]
        if not rcpts:
            return False
        try:
            now = self._clock()
            if dedup_key is not None and not await self._state.claim_once(
                f"notify:{dedup_key}", now + dedup_for, now
            ):
                logs.event(log, "notification-deduplicated", kind=kind, key=dedup_key)
                self._metrics.inc("attachgate_notifications_total", result="deduplicated")
                return False
            content = build_notification(
                sender=self._sender,
                recipients=rcpts,
                subject=subject,
                body=body,
                hostname=self._hostname,
                now=now,
                reply_to=reply_to,
            )
            if self._sign is not None:
                # DKIM, when the notification's From domain has a key.
                content = self._sign(content)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification %s could not be sent", kind)
            await self._record(kind, subject, rcpts, {r: "error" for r in rcpts})
            self._metrics.inc("attachgate_notifications_total", result="failed")
            return False
        sent, temporary = await self._attempt(kind, subject, rcpts, content)
        if not sent and temporary and self._retry_delays:
            task = asyncio.get_running_loop().create_task(
                self._retry(kind, subject, rcpts, content)
            )
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
        elif not sent:
            self._metrics.inc("attachgate_notifications_total", result="failed")
        return sent

    async def _attempt(
        self, kind: str, subject: str, rcpts: list[str], content: bytes
    ) -> tuple[bool, bool]:
        """One delivery attempt: (sent to anyone, failure worth retrying)."""
        try:
            outcome = await self._deliver(rcpts, content)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification %s could not be sent", kind)
            await self._record(kind, subject, rcpts, {r: "error" for r in rcpts})
            return False, True
        await self._record(kind, subject, rcpts, outcome)
        sent = any(v == "sent" for v in outcome.values())
        if sent:
            self._metrics.inc("attachgate_notifications_total", result="sent")
        logs.event(
            log,
            "notification",
            logging.INFO if sent else logging.ERROR,
            kind=kind,
            rcpts=",".join(rcpts),
            outcome=",".join(f"{r}:{v}" for r, v in outcome.items()),
        )
        temporary = any(v.startswith("refused 4") for v in outcome.values())
        return sent, temporary

    async def _retry(self, kind: str, subject: str, rcpts: list[str], content: bytes) -> None:
        for delay in self._retry_delays:
            await asyncio.sleep(delay)
            sent, temporary = await self._attempt(kind, subject, rcpts, content)
            if sent:
                return
            if not temporary:
                self._metrics.inc("attachgate_notifications_total", result="failed")
                return
        logs.event(log, "notification-given-up", logging.ERROR, kind=kind, rcpts=",".join(rcpts))
        self._metrics.inc("attachgate_notifications_total", result="failed")

    @property
    def pending_retries(self) -> int:
        return len(self._retries)

    async def close(self) -> None:
        """Stop pending retries (shutdown)."""
        for task in list(self._retries):
            task.cancel()
        for task in list(self._retries):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _deliver(self, rcpts: list[str], content: bytes) -> dict[str, str]:
        """Per recipient: ``sent`` or the next hop's reply code."""
        opened = await self._next_hop.begin(self._sender, [])
        if isinstance(opened, HopReply):
            return {r: f"refused {opened.code}" for r in rcpts}
        outcome: dict[str, str] = {}
        try:
            for rcpt in rcpts:
                reply = await opened.rcpt(rcpt, [])
                outcome[rcpt] = "accepted" if reply.ok else f"refused {reply.code}"
            if not any(v == "accepted" for v in outcome.values()):
                await opened.abort()
                return outcome
            final = await opened.data(content)
        except BaseException:
            await asyncio.shield(opened.abort())
            raise
        for rcpt, value in outcome.items():
            if value == "accepted":
                outcome[rcpt] = "sent" if final.ok else f"refused {final.code}"
        return outcome

    async def _record(
        self, kind: str, subject: str, rcpts: list[str], outcome: dict[str, str]
    ) -> None:
        now = self._clock()
        try:
            for rcpt in rcpts:
                await self._state.log_notification(
                    Notification(
                        kind=kind,
                        subject=subject,
                        recipient=rcpt,
                        sent_at=now,
                        details={"status": outcome.get(rcpt, "error")},
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification %s could not be recorded", kind)
