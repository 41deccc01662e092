"""Abuse controls: hijack limits, freezing, notifications, re-enabling, and
failed-AUTH screening.

:class:`AbuseControl` implements :class:`gateway.handler.Abuse`. Every
decision reads or writes the shared state store, so the limits hold across
worker processes and restarts; the decisions themselves (which limit was
crossed, how long to delay, where the token is, who the sender is) are pure
functions of this module.

Hijack limits
    Each message from an account is counted once (at its first accepted
    recipient) in ``hijack:msg:<account>`` and each recipient in
    ``hijack:rcpt:<account>``, over every configured window at once (a true
    sliding window: an event leaves a window of ``w`` seconds exactly ``w``
    seconds after it happened). DSNs (null sender) and mail to the control
    address are not counted. The recipient that crosses a limit is refused
    with the ``frozen_account`` policy reply and not counted (the counters
    hold what was let through). With ``freeze = true`` the account is frozen;
    the first freezer (across every worker) sends the one notification. With
    ``freeze = false`` every message is refused while a window is over its
    limit, and the administrator hears about it at most once per window.
    The client IPs listed in the notification are the last few this process
    saw for the account (kept in memory, not in the state store).

Re-enabling
    The notification carries a signed single-use ticket (seven days; see
    ``web.admin``) three ways: ``[unfreeze:TOKEN]`` in the subject, for a
    reply sent to the control address; a link to the web confirm page; and
    the command ``attachgate accounts unfreeze ADDRESS``. A reply counts only
    when both its envelope sender and its header ``From`` are among the
    ``hijack.notify`` addresses. Unfreezing also empties the account's
    hijack windows, so the next message does not cross the same limit again.
    ``hijack.thaw_after`` unfreezes automatically at the next MAIL FROM.

Failed-AUTH screening
    Failures are counted per client IP (``authfail:ip:<ip>``) and per login
    (``authfail:login:<login>``). After ``max_auth_failures`` from one IP in
    ``window`` the IP is banned for ``ban_for``; a banned IP gets ``421
    4.7.0`` at connect. Networks in ``allow_networks`` are counted but never
    banned. Logins are never banned: a login ban would let anybody lock a
    user out from anywhere by guessing wrong on purpose. The per-login count
    is reported in the digest instead, and only for logins that are real
    accounts (unknown names share one counter, so a guesser cannot grow the
    state without bound). Each failure within a session waits longer before
    the answer: ``failure_delay * 2**(n-1)``, at most ``max_failure_delay``.
    A ban queues a digest email (at most one per ``notify_every`` across all
    workers) listing the failures this process saw since its last digest.

Failing closed
    A state store error raises out of every method that decides
    (``StorageError``); the handler answers ``451 4.3.0``, so no message is
    accepted that was not counted. Notifications run in the background and
    never fail a session.

Exception tree::

    AbuseError
     └── UnfreezeUnavailable   (no ``links.secret_keys``: no tokens, no links)

Storage errors are ``storage.interfaces.StorageError`` and pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any

from gateway import logs
from gateway.addresses import Address, AddressError, parse_mailbox
from gateway.config import Settings
from gateway.handler import TxInfo
from gateway.notify import Notifier
from gateway.policy.accounts import Account, Directory, IPAddress, WindowLimit, in_networks
from gateway.replies import R250_CONTROL, R421_BANNED, Reply, policy_reply
from storage.interfaces import StateStore
from web.admin import (
    claim_ticket,
    hijack_counter_keys,
    issue_unfreeze_token,
    make_unfreeze_signer,
    read_unfreeze_token,
    unfreeze_account,
)
from web.links import BadToken, ExpiredToken, LinkSigner
from web.metrics import Metrics

__all__ = [
    "AbuseControl",
    "AbuseError",
    "AuthFailure",
    "Crossing",
    "UnfreezeUnavailable",
    "accounts_report",
    "bans_report",
    "cli_unfreeze",
    "failure_delay",
    "find_crossing",
    "find_unfreeze_tokens",
    "format_duration",
    "header_from_address",
    "lift_ban",
]

log = logging.getLogger("attachgate.abuse")


class AbuseError(Exception):
    """Root of the errors of the abuse controls."""


class UnfreezeUnavailable(AbuseError):
    """No secret keys are configured, so no unfreeze ticket can be signed."""


R550_CONTROL_REFUSED = Reply(550, "5.7.1", "Control message refused")
RECENT_IPS = 5
MAX_DIGEST_FAILURES = 500
MAX_TOKENS_TRIED = 4
MAX_CONTROL_SCAN = 1024 * 1024
MAX_CONTROL_PARTS = 50
UNKNOWN_LOGIN = "(unknown)"


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Crossing:
    """One limit that a count went over."""

    what: str  # "messages" | "recipients"
    count: int
    limit: int
    window: float

    def describe(self) -> str:
        return f"{self.count} {self.what} in {format_duration(self.window)} (limit {self.limit})"


def find_crossing(
    limits: Sequence[WindowLimit],
    message_counts: Sequence[int] | None,
    recipient_counts: Sequence[int],
) -> Crossing | None:
    """The first limit over which the counts (one per window, in order) went.

    ``message_counts`` is None when this recipient did not start a message.
    """
    for i, limit in enumerate(limits):
        if (
            message_counts is not None
            and limit.max_messages is not None
            and message_counts[i] > limit.max_messages
        ):
            return Crossing("messages", message_counts[i], limit.max_messages, limit.window)
        if limit.max_recipients is not None and recipient_counts[i] > limit.max_recipients:
            return Crossing("recipients", recipient_counts[i], limit.max_recipients, limit.window)
    return None


def failure_delay(failures: int, base: float, cap: float) -> float:
    """``base * 2**(failures-1)``, at most ``cap``; 0 before the first failure."""
    if failures < 1 or base <= 0:
        return 0.0
    exponent = min(failures - 1, 62)
    return float(min(base * (2**exponent), cap))


def format_duration(seconds: float) -> str:
    """``3600`` → ``"1 h"``; ``5400`` → ``"90 min"``; ``86400`` → ``"1 d"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_TOKEN_RE = re.compile(r"\[unfreeze:(\.?[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+){2})\]")


def find_unfreeze_tokens(texts: Sequence[str]) -> list[str]:
    """Distinct ``[unfreeze:TOKEN]`` tokens in the texts, in order of appearance."""
    found: list[str] = []
    for text in texts:
        for match in _TOKEN_RE.finditer(text):
            token = match.group(1)
            if token not in found:
                found.append(token)
    return found


_PHRASE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~. \t"
)


def _check_display_name(name: str) -> None:
    """A display name is atoms, dots, spaces and quoted strings; nothing else
    (no comments, no second address, no unquoted ``@ < > , ; :``)."""
    i = 0
    while i < len(name):
        char = name[i]
        if char == '"':
            i += 1
            while i < len(name) and name[i] != '"':
                if name[i] == "\\":
                    i += 1
                i += 1
            if i >= len(name):
                raise AddressError("unterminated quoted display name")
        elif char not in _PHRASE_CHARS and ord(char) < 0x80:
            raise AddressError(f"character {char!r} not allowed in a display name")
        i += 1


def header_from_address(raw: str) -> Address:
    """The one mailbox of a raw ``From`` header value, strictly.

    Accepts ``addr-spec`` and ``display-name <addr-spec>``; refuses groups,
    lists, comments and anything ambiguous. The addr-spec goes through
    :func:`gateway.addresses.parse_mailbox`.
    """
    value = re.sub(r"\r?\n(?=[ \t])", "", raw).strip()
    if "<" not in value:
        return parse_mailbox(value, smtputf8=True)
    if not value.endswith(">"):
        raise AddressError("malformed From header")
    # A quoted display name may hold brackets, the addr-spec cannot.
    start = value.rfind("<")
    name, spec = value[:start], value[start + 1 : -1]
    _check_display_name(name)
    return parse_mailbox(spec, smtputf8=True)


# --------------------------------------------------------------------------
# Notification texts (pure)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthFailure:
    when: float
    ip: str
    mechanism: str
    login: str


def _printable(text: str, limit: int = 120) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class WindowCounts:
    limit: WindowLimit
    messages: int
    recipients: int


def hijack_notice(
    *,
    account: str,
    crossing: Crossing,
    counts: Sequence[WindowCounts],
    ips: Sequence[str],
    now: float,
    frozen: bool,
    token: str | None,
    link: str | None,
    control_address: str,
    administrators: Sequence[str],
) -> tuple[str, str]:
    """Subject and body of the hijack notification."""
    if frozen:
        subject = f"[attachgate] Account {account} frozen: sending limit exceeded"
    else:
        subject = f"[attachgate] Account {account} over its sending limit"
    if token is not None:
        subject += f" [unfreeze:{token}]"
    lines = [
        f"attachgate refused mail from the account {account} at {format_time(now)}.",
        "",
        f"Limit crossed: {crossing.describe()}.",
        "",
        "Accepted for sending in each window:",
    ]
    for wc in counts:
        limits = []
        if wc.limit.max_messages is not None:
            limits.append(f"{wc.limit.max_messages} messages")
        if wc.limit.max_recipients is not None:
            limits.append(f"{wc.limit.max_recipients} recipients")
        lines.append(
            f"  last {format_duration(wc.limit.window)}: {wc.messages} messages, "
            f"{wc.recipients} recipients (limits: {', '.join(limits) or 'none'})"
        )
    lines += [
        "",
        "Client IP addresses used recently: " + (", ".join(ips) or "unknown"),
        "",
    ]
    if not frozen:
        lines += [
            "The account is not frozen (hijack.freeze = false): its messages are",
            "refused until the window has slid below the limit.",
        ]
        return subject, "\n".join(lines) + "\n"
    lines += [
        "The account is frozen: every message from it is refused until it is",
        "re-enabled. Such a burst often means that its password was guessed or",
        "stolen; change the password before re-enabling the account.",
        "",
        "To re-enable the account, do one of these:",
    ]
    if token is not None:
        lines += [
            f"  - reply to this email (it goes to {control_address}); keep",
            f"    [unfreeze:{token}] in the subject.",
            "    Only replies from " + ", ".join(administrators) + " are accepted;",
            "    the ticket works once and expires after 7 days.",
        ]
    if link is not None:
        lines += [f"  - open {link}", "    and confirm on that page."]
    lines.append(f"  - run: attachgate accounts unfreeze {account}")
    return subject, "\n".join(lines) + "\n"


def screening_digest(
    *,
    failures: Sequence[AuthFailure],
    banned: Sequence[tuple[str, float]],
    per_login: Sequence[tuple[str, int]],
    window: float,
    now: float,
) -> tuple[str, str]:
    """Subject and body of the failed-login digest."""
    ips = ", ".join(ip for ip, _ in banned) or "none"
    subject = f"[attachgate] Failed logins: {len(failures)} recorded, banned: {ips}"
    lines = [f"attachgate failed-login report, {format_time(now)}.", ""]
    if banned:
        lines.append("Banned addresses:")
        lines += [f"  {ip} until {format_time(until)}" for ip, until in banned]
        lines.append("")
    if per_login:
        lines.append(f"Failures per login in the last {format_duration(window)}:")
        lines += [f"  {_printable(login)}: {n}" for login, n in per_login]
        lines.append("")
    lines.append("Failures (time, address, mechanism, login):")
    lines += [
        f"  {format_time(f.when)}  {f.ip}  {f.mechanism}  {_printable(f.login)}" for f in failures
    ]
    lines += ["", "Lift a ban with: attachgate bans lift ADDRESS"]
    return subject, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Control messages
# --------------------------------------------------------------------------


def _control_texts(content: bytes) -> tuple[list[str], list[str]]:
    """The raw ``From`` values and the texts to search for a token (the
    decoded Subject first, then the text parts)."""
    msg = BytesParser(policy=email_policy.default).parsebytes(content[:MAX_CONTROL_SCAN])
    froms = [str(v) for k, v in msg.raw_items() if k.lower() == "from"]
    texts: list[str] = []
    with contextlib.suppress(ValueError, IndexError, TypeError):
        texts.append(str(msg.get("Subject", "")))
    for i, part in enumerate(msg.walk()):
        if i >= MAX_CONTROL_PARTS:
            break
        if part.get_content_maintype() != "text" or part.is_multipart():
            continue
        texts.append(_part_text(part))
    return froms, texts


def _part_text(part: Message) -> str:
    try:
        if isinstance(part, EmailMessage):
            content = part.get_content()
            if isinstance(content, str):
                return content
    except (LookupError, ValueError, TypeError, AssertionError):
        pass
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


# --------------------------------------------------------------------------
# The controls
# --------------------------------------------------------------------------


class AbuseControl:
    """Hijack limits, freezing and screening over a shared state store."""

    def __init__(
        self,
        *,
        settings: Settings,
        directory: Directory,
        state: StateStore,
        notifier: Notifier,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._settings = settings
        self._directory = directory
        self._state = state
        self._notifier = notifier
        self._clock = clock
        keys = [k.get_secret_value() for k in settings.links.secret_keys]
        self._signer: LinkSigner | None = make_unfreeze_signer(keys, clock=clock) if keys else None
        hj = settings.hijack
        control = hj.control_address or f"attachgate-control@{settings.smtp.hostname}"
        self._control = parse_mailbox(control, smtputf8=True)
        self._admins = frozenset(parse_mailbox(a, smtputf8=True).key for a in hj.notify)
        self._ips: dict[str, deque[str]] = {}
        self._clean: dict[str, float] = {}
        self._failures: deque[AuthFailure] = deque(maxlen=MAX_DIGEST_FAILURES)
        self._banned: list[tuple[str, float]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # --- plumbing ------------------------------------------------------------
    @property
    def unfreeze_signer(self) -> LinkSigner | None:
        """The signer the web service needs for the unfreeze page."""
        return self._signer

    @property
    def control_address(self) -> str:
        return str(self._control)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until the queued notifications are sent (or have failed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _policy(self, case: str) -> Reply:
        self._metrics.inc("attachgate_refusals_total", case=case)
        pol = self._settings.policy
        return policy_reply(case, pol.mode, getattr(pol, case))

    # --- connect and AUTH --------------------------------------------------------
    def _never_banned(self, ip: IPAddress) -> bool:
        return in_networks(ip, self._settings.screening.allow_networks)

    async def connection_refusal(self, ip: IPAddress) -> Reply | None:
        if not self._settings.screening.enabled or self._never_banned(ip):
            return None
        address = str(ip)
        now = self._clock()
        # An address found clean is not looked up again for a moment: one
        # state read per connection is the largest share of a short session.
        if self._clean.get(address, 0.0) > now:
            return None
        if await self._state.is_banned(address, now):
            return R421_BANNED
        if len(self._clean) >= CLEAN_CACHE_SIZE:
            self._clean.clear()
        self._clean[address] = now + CLEAN_CACHE_SECONDS
        return None

    async def auth_failed(self, ip: IPAddress, login: str, mechanism: str) -> float:
        sc = self._settings.screening
        if not sc.enabled:
            return 0.0
        now = self._clock()
        login_key = login.lower() if self._directory.account(login) else UNKNOWN_LOGIN
        (ip_count,) = await self._state.add_and_count(f"authfail:ip:{ip}", 1, now, [sc.window])
        await self._state.add_and_count(f"authfail:login:{login_key}", 1, now, [sc.window])
        self._failures.append(AuthFailure(now, str(ip), mechanism, _printable(login, 320)))
        if ip_count >= sc.max_auth_failures and not self._never_banned(ip):
            until = now + sc.ban_for
            reason = f"{ip_count} failed logins in {format_duration(sc.window)}"
            await self._state.ban(str(ip), until, reason, now)
            self._clean.pop(str(ip), None)
            self._banned.append((str(ip), until))
            self._metrics.inc("attachgate_ip_bans_total")
            logs.event(
                log,
                "ip-banned",
                logging.WARNING,
                ip=ip,
                failures=ip_count,
                window=format_duration(sc.window),
                until=format_time(until),
                login=login,
                mech=mechanism,
            )
            if sc.notify:
                self._spawn(self._send_digest(now))
        return failure_delay(ip_count, sc.failure_delay, sc.max_failure_delay)

    async def _send_digest(self, now: float) -> None:
        sc = self._settings.screening
        if not await self._state.claim_once("screening-digest", now + sc.notify_every, now):
            return  # sent recently; these failures go into the next digest
        failures, self._failures = list(self._failures), deque(maxlen=MAX_DIGEST_FAILURES)
        banned, self._banned = self._banned, []
        keys = sorted(
            {
                f.login.lower() if self._directory.account(f.login) else UNKNOWN_LOGIN
                for f in failures
            }
        )
        per_login = [
            (key, await self._state.count(f"authfail:login:{key}", now, sc.window)) for key in keys
        ]
        subject, body = screening_digest(
            failures=failures, banned=banned, per_login=per_login, window=sc.window, now=now
        )
        await self._notifier.send(
            "screening", list(sc.notify), subject, body, dedup_key=None, dedup_for=0.0
        )

    # --- MAIL FROM ----------------------------------------------------------------
    async def sender_refusal(self, account: Account) -> Reply | None:
        now = self._clock()
        st = await self._state.get_account_state(account.address)
        if st.frozen:
            thaw = self._settings.hijack.thaw_after
            manual = st.frozen_reason == ADMIN_FREEZE_REASON
            if thaw is None or manual or st.frozen_at is None or now - st.frozen_at < thaw:
                return self._policy("frozen_account")
            await unfreeze_account(self._state, account.address)
            logs.event(log, "account-thawed", account=account.address, frozen_at=st.frozen_at)
        if st.disabled:
            return self._policy("disabled_account")
        if account.linking.enabled:
            used = await self._state.account_usage(account.address)
            if used >= account.linking.quota:
                return self._policy("over_quota")
        return None

    # --- RCPT TO -------------------------------------------------------------------
    async def recipient_refusal(self, tx: TxInfo, account: Account, count: int) -> Reply | None:
        limits = account.hijack
        if tx.sender is None or not limits.enabled or not limits.windows:
            return None
        now = self._clock()
        spans = [w.window for w in limits.windows]
        msg_key, rcpt_key = hijack_counter_keys(account.address)
        message_counts: list[int] | None = None
        if count == 1:
            message_counts = await self._state.add_and_count(msg_key, 1, now, spans)
            ips = self._ips.setdefault(account.address, deque(maxlen=RECENT_IPS))
            ip = str(tx.client.ip)
            if ip in ips:
                ips.remove(ip)
            ips.append(ip)
        recipient_counts = await self._state.add_and_count(rcpt_key, 1, now, spans)
        crossing = find_crossing(limits.windows, message_counts, recipient_counts)
        if crossing is None:
            return None
        # The refused recipient (and message) is not sent, so it is taken out
        # of the windows again: they hold what was let through.
        if message_counts is not None:
            await self._state.add_and_count(msg_key, -1, now, spans)
        await self._state.add_and_count(rcpt_key, -1, now, spans)
        reply = self._policy("frozen_account")
        self._metrics.inc("attachgate_hijack_limits_total")
        if limits.freeze:
            if not await self._state.freeze(account.address, crossing.describe(), now):
                return reply  # another session froze it first, and told the administrators
            self._metrics.inc("attachgate_accounts_frozen_total")
        logs.event(
            log,
            "account-frozen" if limits.freeze else "hijack-limit",
            logging.WARNING,
            account=account.address,
            limit=crossing.describe(),
            ip=tx.client.ip,
            session=tx.session_id,
        )
        self._spawn(self._notify_hijack(account, crossing, now, frozen=limits.freeze))
        return reply

    def unfreeze_link(self, account: str) -> str:
        """A signed URL to the web confirm page that unfreezes ``account``."""
        token = self._issue_token(account)
        return self._link_for(token)

    def _issue_token(self, account: str) -> str:
        if self._signer is None:
            raise UnfreezeUnavailable("links.secret_keys is empty: no unfreeze tickets")
        return issue_unfreeze_token(self._signer, account)

    def _link_for(self, token: str) -> str:
        return f"{self._settings.web.public_url.rstrip('/')}/unfreeze/{token}"

    async def _notify_hijack(
        self, account: Account, crossing: Crossing, now: float, *, frozen: bool
    ) -> None:
        hj = self._settings.hijack
        if not hj.notify:
            log.warning("account %s hit its limit; hijack.notify is empty", account.address)
            return
        msg_key, rcpt_key = hijack_counter_keys(account.address)
        counts = [
            WindowCounts(
                w,
                await self._state.count(msg_key, now, w.window),
                await self._state.count(rcpt_key, now, w.window),
            )
            for w in account.hijack.windows
        ]
        token = self._issue_token(account.address) if frozen and self._signer else None
        subject, body = hijack_notice(
            account=account.address,
            crossing=crossing,
            counts=counts,
            ips=list(self._ips.get(account.address, ())),
            now=now,
            frozen=frozen,
            token=token,
            link=self._link_for(token) if token else None,
            control_address=str(self._control),
            administrators=list(hj.notify),
        )
        await self._notifier.send(
            "hijack",
            list(hj.notify),
            subject,
            body,
            # A frozen account notifies once because only the first freezer
            # gets here; an unfrozen one at most once per crossed window.
            dedup_key=None if frozen else f"hijack:{account.address}:{crossing.window:g}",
            dedup_for=crossing.window,
            reply_to=str(self._control) if token else None,
        )

    # --- control address ---------------------------------------------------------
    def is_control_address(self, address: Address) -> bool:
        return address.key == self._control.key

    async def control_message(self, tx: TxInfo, content: bytes) -> Reply:
        def refuse(text: str, **fields: object) -> Reply:
            logs.event(
                log,
                "control-refused",
                logging.WARNING,
                session=tx.session_id,
                ip=tx.client.ip,
                sender=tx.sender,
                reason=text,
                **fields,
            )
            return R550_CONTROL_REFUSED.with_text(text)

        try:
            froms, texts = _control_texts(content)
        except Exception:  # a message the parser cannot read is simply refused
            log.exception("control message could not be parsed session=%s", tx.session_id)
            return refuse("Control message could not be read")
        if tx.sender is None or tx.sender.key not in self._admins:
            return refuse("Sender is not an administrator")
        if len(froms) != 1:
            return refuse("Sender is not an administrator", header_from="missing or repeated")
        try:
            header_from = header_from_address(froms[0])
        except AddressError as exc:
            return refuse("Sender is not an administrator", header_from=str(exc))
        if header_from.key not in self._admins:
            return refuse("Sender is not an administrator", header_from=header_from)
        if self._signer is None:
            return refuse("Unfreezing by reply is not configured")
        tokens = find_unfreeze_tokens(texts)[:MAX_TOKENS_TRIED]
        if not tokens:
            return refuse("No unfreeze token found in the message")
        expired = False
        ticket = None
        for token in tokens:
            try:
                ticket = read_unfreeze_token(self._signer, token)
                break
            except ExpiredToken:
                expired = True
            except BadToken:
                continue
        if ticket is None:
            return refuse("Unfreeze token expired" if expired else "Unfreeze token invalid")
        if not await claim_ticket(self._state, ticket, self._clock()):
            return refuse("Unfreeze token already used", account=ticket.account)
        was_frozen = await unfreeze_account(self._state, ticket.account)
        logs.event(
            log,
            "account-unfrozen",
            logging.WARNING,
            account=ticket.account,
            via="reply",
            by=tx.sender,
            session=tx.session_id,
        )
        if not was_frozen:
            return R250_CONTROL.with_text(f"Account {ticket.account} was not frozen")
        return R250_CONTROL.with_text(f"Account {ticket.account} unfrozen")


# --------------------------------------------------------------------------
# Administrator commands (the CLI calls these)
# --------------------------------------------------------------------------


async def cli_unfreeze(state: StateStore, account: str) -> bool:
    """Unfreeze ``account`` and empty its hijack windows; True when it was frozen."""
    return await unfreeze_account(state, account.strip().lower())


async def accounts_report(
    state: StateStore, directory: Directory, now: float
) -> list[dict[str, Any]]:
    """Per account: state, counts in each current window, quota use."""
    flagged = {s.account: s for s in await state.list_account_states()}
    rows: list[dict[str, Any]] = []
    for account in sorted(directory.accounts(), key=lambda a: a.address):
        st = flagged.pop(account.address, None)
        msg_key, rcpt_key = hijack_counter_keys(account.address)
        windows = [
            {
                "window": w.window,
                "messages": await state.count(msg_key, now, w.window),
                "max_messages": w.max_messages,
                "recipients": await state.count(rcpt_key, now, w.window),
                "max_recipients": w.max_recipients,
            }
            for w in account.hijack.windows
        ]
        rows.append(
            {
                "account": account.address,
                "state": _state_word(
                    st.frozen if st else False, st.disabled if st else False, account.disabled
                ),
                "frozen_reason": st.frozen_reason if st else "",
                "frozen_at": st.frozen_at if st else None,
                "windows": windows,
                "usage": await state.account_usage(account.address),
                "quota": account.linking.quota if account.linking.enabled else None,
            }
        )
    for name, st in sorted(flagged.items()):  # flags of accounts no longer configured
        rows.append(
            {
                "account": name,
                "state": _state_word(st.frozen, st.disabled, False) + " (not configured)",
                "frozen_reason": st.frozen_reason,
                "frozen_at": st.frozen_at,
                "windows": [],
                "usage": await state.account_usage(name),
                "quota": None,
            }
        )
    return rows


def _state_word(frozen: bool, disabled_runtime: bool, disabled_config: bool) -> str:
    if frozen:
        return "frozen"
    if disabled_runtime or disabled_config:
        return "disabled"
    return "active"


async def bans_report(state: StateStore, now: float) -> list[dict[str, Any]]:
    """The bans in force at ``now``."""
    return [
        {
            "ip": ban.ip,
            "reason": ban.reason,
            "since": ban.created,
            "until": ban.until,
            "remaining": max(0.0, ban.until - now),
        }
        for ban in await state.list_bans(now)
    ]


ADMIN_FREEZE_REASON = "frozen by the administrator"
# How long a "not banned" answer is trusted without asking the state store
# again; a ban set by another worker takes effect here within this time.
CLEAN_CACHE_SECONDS = 1.0
CLEAN_CACHE_SIZE = 10_000


async def lift_ban(state: StateStore, ip: str) -> bool:
    """Lift the ban on ``ip`` (any textual form); True when there was one.
    Raises ValueError for text that is not an IP address."""
    address = str(ipaddress.ip_address(ip.strip()))
    lifted = await state.lift_ban(address)
    # A lifted ban starts from a clean slate, or the next failure bans again.
    await state.reset_counter(f"authfail:ip:{address}")
    return lifted
