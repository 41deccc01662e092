"""Unfreeze links and the small admin page of the web service.

Routes::

    GET  /unfreeze/{token}   confirm page with a POST form (a GET never changes anything)
    POST /unfreeze/{token}   verify, claim once, unfreeze, show the result
    GET  /admin              frozen accounts, bans, last notifications (HTTP basic auth)
    POST /admin/unfreeze     form: account, csrf
    POST /admin/lift         form: ip, csrf

Unfreeze tokens are signed with :class:`web.links.LinkSigner` under their own
salt (``attachgate.unfreeze.v1``) and live seven days. The payload is a random
nonce and the account (``nonce:account``); a token is single-use through
``StateStore.claim_once`` on ``unfreeze:<nonce>``, so the web link and a reply
to the notification email consume the same ticket. A forged or malformed
token answers 404, an expired or already used one 410.

The admin routes exist only when an argon2 password hash is configured. The
password is checked off the event loop on every request (no session is kept);
a wrong user name costs the same hash check as a wrong password. POSTs carry a
CSRF token, an HMAC of the request's credentials under a secret drawn at
start-up (so a token is worth nothing for other credentials or after a
restart), and a cross-site ``Origin`` is refused. Pages carry the download
service's security headers: a CSP without scripts, no framing, no caching.

The token helpers (:func:`issue_unfreeze_token`, :func:`read_unfreeze_token`,
:func:`claim_ticket`, :func:`unfreeze_account`) are shared with the SMTP side
(``gateway.abuse``), so there is one ticket format.

Errors: token problems are ``web.links.LinkError`` (``BadToken``,
``ExpiredToken``); storage problems ``storage.interfaces.StorageError``. This
module defines no exceptions of its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import logging
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from storage.interfaces import AccountState, Ban, Notification, StateStore
from web.app import PAGE_HEADERS
from web.links import BadToken, ExpiredToken, LinkSigner
from web.templates import PartialCache

__all__ = [
    "UNFREEZE_MAX_AGE",
    "UNFREEZE_SALT",
    "UnfreezeTicket",
    "add_admin_routes",
    "claim_ticket",
    "csrf_token",
    "hijack_counter_keys",
    "issue_unfreeze_token",
    "make_unfreeze_signer",
    "origin_allowed",
    "parse_basic_auth",
    "read_unfreeze_token",
    "unfreeze_account",
]

log = logging.getLogger("attachgate.web.admin")

UNFREEZE_SALT = "attachgate.unfreeze.v1"
UNFREEZE_MAX_AGE = 7 * 86400.0
RECENT_NOTIFICATIONS = 20
MAX_ACCOUNT_LENGTH = 320

# The same headers as every page of the download service.
ADMIN_HEADERS: Mapping[str, str] = PAGE_HEADERS

# --------------------------------------------------------------------------
# Unfreeze tickets (shared with the SMTP control address)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnfreezeTicket:
    nonce: str
    account: str

    @property
    def claim_key(self) -> str:
        return f"unfreeze:{self.nonce}"


def make_unfreeze_signer(
    secret_keys: Sequence[str], *, clock: Callable[[], float] = time.time
) -> LinkSigner:
    """The signer for unfreeze tokens: the link keys, their own salt, 7 days."""
    return LinkSigner(secret_keys, UNFREEZE_MAX_AGE, clock=clock, salt=UNFREEZE_SALT)


def issue_unfreeze_token(signer: LinkSigner, account: str) -> str:
    """A fresh single-use token that unfreezes ``account``."""
    if not account or len(account) > MAX_ACCOUNT_LENGTH:
        raise ValueError("account must be a non-empty address")
    return signer.sign(f"{secrets.token_urlsafe(12)}:{account}")


def read_unfreeze_token(signer: LinkSigner, token: str) -> UnfreezeTicket:
    """The ticket inside ``token``; raises BadToken or ExpiredToken."""
    payload = signer.verify(token)
    nonce, sep, account = payload.partition(":")
    if not sep or not nonce or not account or len(account) > MAX_ACCOUNT_LENGTH:
        raise BadToken("not an unfreeze ticket")
    return UnfreezeTicket(nonce=nonce, account=account)


async def claim_ticket(state: StateStore, ticket: UnfreezeTicket, now: float) -> bool:
    """True the first time a ticket is used; the claim outlives the token."""
    until = now + UNFREEZE_MAX_AGE + LinkSigner.CLOCK_SKEW + 86400.0
    return await state.claim_once(ticket.claim_key, until, now)


def hijack_counter_keys(account: str) -> tuple[str, str]:
    """The sliding-window keys of the hijack limits (messages, recipients)."""
    return f"hijack:msg:{account}", f"hijack:rcpt:{account}"


async def unfreeze_account(state: StateStore, account: str) -> bool:
    """Unfreeze and start the hijack windows afresh (otherwise the next
    message would cross the same limit again). True when it was frozen."""
    was_frozen = await state.unfreeze(account)
    for key in hijack_counter_keys(account):
        await state.reset_counter(key)
    return was_frozen


# --------------------------------------------------------------------------
# Pure helpers for the admin page
# --------------------------------------------------------------------------


def parse_basic_auth(header: str | None) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` → (user, password); None when malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > 4096:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def csrf_token(secret: bytes, credentials: str) -> str:
    """The CSRF token for a request made with ``credentials`` (the raw
    Authorization value)."""
    return hmac.new(secret, credentials.encode("utf-8"), hashlib.sha256).hexdigest()


def origin_allowed(origin: str | None, host: str) -> bool:
    """A POST may come without an Origin, or with one naming this host."""
    if origin is None:
        return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Templates:
    admin: string.Template
    confirm: string.Template
    result: string.Template


def _load_templates() -> _Templates:
    pages = PartialCache()

    def read(name: str) -> string.Template:
        return string.Template(pages.page(name))

    return _Templates(
        admin=read("admin.html"),
        confirm=read("unfreeze_confirm.html"),
        result=read("unfreeze_result.html"),
    )


def _page(text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    merged = dict(ADMIN_HEADERS)
    if headers:
        merged.update(headers)
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=merged
    )


def _verify_password(stored: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class _Routes:
    def __init__(
        self,
        *,
        state: StateStore,
        signer: LinkSigner,
        password_hash: str | None,
        username: str,
        clock: Callable[[], float],
    ) -> None:
        self.state = state
        self.signer = signer
        self.password_hash = password_hash
        self.username = username
        self.clock = clock
        self.secret = secrets.token_bytes(32)
        self.pages = _load_templates()

    # --- unfreeze link ------------------------------------------------------
    def _result(self, status: int, title: str, message: str) -> web.Response:
        text = self.pages.result.substitute(title=html.escape(title), message=html.escape(message))
        return _page(text, status)

    def _ticket(self, request: web.Request) -> UnfreezeTicket | web.Response:
        try:
            return read_unfreeze_token(self.signer, request.match_info["token"])
        except ExpiredToken:
            return self._result(410, "Link expired", "This unfreeze link has expired.")
        except BadToken:
            return self._result(404, "Not found", "This link is not valid.")

    async def confirm(self, request: web.Request) -> web.Response:
        ticket = self._ticket(request)
        if isinstance(ticket, web.Response):
            return ticket
        action = "/unfreeze/" + quote(request.match_info["token"], safe="")
        text = self.pages.confirm.substitute(
            account=html.escape(ticket.account), action=html.escape(action)
        )
        return _page(text)

    async def unfreeze(self, request: web.Request) -> web.Response:
        if not origin_allowed(request.headers.get("Origin"), request.host):
            return self._result(403, "Forbidden", "Cross-site request refused.")
        ticket = self._ticket(request)
        if isinstance(ticket, web.Response):
            return ticket
        if not await claim_ticket(self.state, ticket, self.clock()):
            return self._result(410, "Link already used", "This unfreeze link was already used.")
        was_frozen = await unfreeze_account(self.state, ticket.account)
        log.info("account-unfrozen account=%s via=web-link", ticket.account)
        if was_frozen:
            message = f"Account {ticket.account} unfrozen; it may send again."
        else:
            message = f"Account {ticket.account} was not frozen; nothing changed."
        return self._result(200, "Account unfrozen", message)

    # --- admin page ---------------------------------------------------------
    async def _authorised(self, request: web.Request) -> str | None:
        """The raw credentials when they are right, else None."""
        assert self.password_hash is not None
        raw = request.headers.get("Authorization")
        parsed = parse_basic_auth(raw)
        if parsed is None or raw is None:
            return None
        user, password = parsed
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, _verify_password, self.password_hash, password)
        same_user = hmac.compare_digest(user.encode("utf-8"), self.username.encode("utf-8"))
        return raw if ok and same_user else None

    def _challenge(self) -> web.Response:
        return web.Response(
            status=401,
            text="authentication required\n",
            headers={
                **ADMIN_HEADERS,
                "WWW-Authenticate": 'Basic realm="attachgate admin", charset="UTF-8"',
            },
        )

    async def admin(self, request: web.Request) -> web.Response:
        credentials = await self._authorised(request)
        if credentials is None:
            return self._challenge()
        now = self.clock()
        token = csrf_token(self.secret, credentials)
        accounts = [a for a in await self.state.list_account_states() if a.frozen]
        bans = await self.state.list_bans(now)
        notes = await self.state.recent_notifications(RECENT_NOTIFICATIONS)
        text = self.pages.admin.substitute(
            frozen_rows=self._frozen_rows(accounts, token),
            ban_rows=self._ban_rows(bans, token),
            notification_rows=self._notification_rows(notes),
            generated=html.escape(_when(now)),
        )
        return _page(text)

    @staticmethod
    def _form(action: str, field: str, value: str, token: str, label: str) -> str:
        return (
            f'<form method="post" action="{action}">'
            f'<input type="hidden" name="{field}" value="{html.escape(value)}">'
            f'<input type="hidden" name="csrf" value="{token}">'
            f'<button type="submit">{label}</button></form>'
        )

    def _frozen_rows(self, accounts: Sequence[AccountState], token: str) -> str:
        rows = [
            "<tr>"
            f'<td class="account">{html.escape(acc.account)}</td>'
            f"<td>{html.escape(acc.frozen_reason)}</td>"
            f"<td>{html.escape(_when(acc.frozen_at))}</td>"
            f"<td>{self._form('/admin/unfreeze', 'account', acc.account, token, 'Unfreeze')}</td>"
            "</tr>"
            for acc in accounts
        ]
        if not rows:
            return '<tr><td colspan="4" class="empty">No frozen accounts.</td></tr>'
        return "\n".join(rows)

    def _ban_rows(self, bans: Sequence[Ban], token: str) -> str:
        rows = [
            "<tr>"
            f'<td class="ip">{html.escape(ban.ip)}</td>'
            f"<td>{html.escape(ban.reason)}</td>"
            f"<td>{html.escape(_when(ban.created))}</td>"
            f"<td>{html.escape(_when(ban.until))}</td>"
            f"<td>{self._form('/admin/lift', 'ip', ban.ip, token, 'Lift')}</td>"
            "</tr>"
            for ban in bans
        ]
        if not rows:
            return '<tr><td colspan="5" class="empty">No bans.</td></tr>'
        return "\n".join(rows)

    @staticmethod
    def _notification_rows(notes: Sequence[Notification]) -> str:
        rows = [
            "<tr>"
            f"<td>{html.escape(_when(note.sent_at))}</td>"
            f"<td>{html.escape(note.kind)}</td>"
            f"<td>{html.escape(note.recipient)}</td>"
            f"<td>{html.escape(note.subject)}</td>"
            f"<td>{html.escape(note.details.get('status', ''))}</td>"
            "</tr>"
            for note in notes
        ]
        if not rows:
            return '<tr><td colspan="5" class="empty">No notifications yet.</td></tr>'
        return "\n".join(rows)

    async def _checked_form(self, request: web.Request) -> Mapping[str, str] | web.Response:
        credentials = await self._authorised(request)
        if credentials is None:
            return self._challenge()
        if not origin_allowed(request.headers.get("Origin"), request.host):
            return self._result(403, "Forbidden", "Cross-site request refused.")
        form = await request.post()
        sent = form.get("csrf")
        expected = csrf_token(self.secret, credentials)
        if not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
            return self._result(403, "Forbidden", "The form has expired; reload the page.")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    async def admin_unfreeze(self, request: web.Request) -> web.Response:
        form = await self._checked_form(request)
        if isinstance(form, web.Response):
            return form
        account = form.get("account", "")
        if not account or len(account) > MAX_ACCOUNT_LENGTH:
            return self._result(400, "Bad request", "No account given.")
        await unfreeze_account(self.state, account)
        log.info("account-unfrozen account=%s via=admin-page", account)
        raise web.HTTPSeeOther("/admin", headers=ADMIN_HEADERS)

    async def admin_lift(self, request: web.Request) -> web.Response:
        form = await self._checked_form(request)
        if isinstance(form, web.Response):
            return form
        ip = form.get("ip", "")
        if not ip or len(ip) > 64:
            return self._result(400, "Bad request", "No address given.")
        await self.state.lift_ban(ip)
        # A lifted ban starts from a clean slate (as ``attachgate bans lift``).
        await self.state.reset_counter(f"authfail:ip:{ip}")
        log.info("ban-lifted ip=%s via=admin-page", ip)
        raise web.HTTPSeeOther("/admin", headers=ADMIN_HEADERS)


def add_admin_routes(
    app: web.Application,
    *,
    state: StateStore,
    unfreeze_signer: LinkSigner,
    admin_password_hash: str | None,
    admin_username: str,
    clock: Callable[[], float] = time.time,
) -> None:
    """Add the unfreeze-link routes, and the admin page when a hash is set."""
    routes = _Routes(
        state=state,
        signer=unfreeze_signer,
        password_hash=admin_password_hash,
        username=admin_username,
        clock=clock,
    )
    app.router.add_get("/unfreeze/{token}", routes.confirm, allow_head=False)
    app.router.add_post("/unfreeze/{token}", routes.unfreeze)
    if admin_password_hash:
        app.router.add_get("/admin", routes.admin, allow_head=False)
        app.router.add_post("/admin/unfreeze", routes.admin_unfreeze)
        app.router.add_post("/admin/lift", routes.admin_lift)
