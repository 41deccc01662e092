"""The unfreeze link and the admin page over real HTTP: the download service
with the admin routes added, a real SQLite state store, a real client."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from argon2 import PasswordHasher

from storage.interfaces import Notification
from storage.local import LocalBlobStore
from storage.sqlite import SqliteStateStore
from tests.helpers.clock import FakeClock
from tests.web.conftest import KEYS
from web.admin import (
    add_admin_routes,
    claim_ticket,
    csrf_token,
    hijack_counter_keys,
    issue_unfreeze_token,
    make_unfreeze_signer,
    origin_allowed,
    parse_basic_auth,
    read_unfreeze_token,
)
from web.app import WebOptions, build_app
from web.links import LinkSigner

ALICE = "alice@example.com"
USER = "admin"
PASSWORD = "s3cret admin pass"
WEEK = 7 * 86400.0
# Cheap argon2 parameters: the page verifies whatever parameters the hash names.
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


@dataclass
class AdminEnv:
    base_url: str
    state: SqliteStateStore
    clock: FakeClock
    signer: LinkSigner
    session: aiohttp.ClientSession
    auth: dict[str, str]  # the Authorization header of the right credentials

    def url(self, path: str) -> str:
        return self.base_url + path

    async def frozen(self, account: str = ALICE) -> bool:
        return (await self.state.get_account_state(account)).frozen

    async def admin_page(self) -> str:
        async with self.session.get(self.url("/admin"), headers=self.auth) as resp:
            assert resp.status == 200
            return await resp.text()

    async def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', await self.admin_page())
        assert found is not None
        return found.group(1)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def _serve(
    tmp_path: Path, sock: socket.socket, clock: FakeClock, password_hash: str | None
) -> AsyncIterator[AdminEnv]:
    host, port = sock.getsockname()[:2]
    base = f"http://{host}:{port}"
    state = await SqliteStateStore.open(tmp_path / "state.db")
    blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
    download_signer = LinkSigner(KEYS, max_age=30 * 86400, clock=clock)
    unfreeze_signer = make_unfreeze_signer(KEYS, clock=clock)
    app = build_app(state, blobs, download_signer, WebOptions(public_url=base, clock=clock))
    add_admin_routes(
        app,
        state=state,
        unfreeze_signer=unfreeze_signer,
        admin_password_hash=password_hash,
        admin_username=USER,
        clock=clock,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    session = aiohttp.ClientSession()
    try:
        yield AdminEnv(base, state, clock, unfreeze_signer, session, basic(USER, PASSWORD))
    finally:
        await session.close()
        await runner.cleanup()
        await state.close()
        await blobs.close()


@pytest.fixture
async def admin_env(
    tmp_path: Path, listen_socket: socket.socket, clock: FakeClock
) -> AsyncIterator[AdminEnv]:
    async for env in _serve(tmp_path, listen_socket, clock, HASH):
        yield env


@pytest.fixture
async def no_admin_env(
    tmp_path: Path, listen_socket: socket.socket, clock: FakeClock
) -> AsyncIterator[AdminEnv]:
    async for env in _serve(tmp_path, listen_socket, clock, None):
        yield env


async def frozen_with_token(env: AdminEnv) -> str:
    assert await env.state.freeze(ALICE, "4 messages in 1 h (limit 3)", env.clock())
    return issue_unfreeze_token(env.signer, ALICE)


def assert_page_headers(resp: aiohttp.ClientResponse) -> None:
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "form-action 'self'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


# --------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------


def test_parse_basic_auth() -> None:
    assert parse_basic_auth("Basic YWRtaW46cDpx") == ("admin", "p:q")
    assert parse_basic_auth("basic YWRtaW46") == ("admin", "")
    for bad in (None, "", "Bearer abc", "Basic", "Basic !!!", "Basic YWRtaW4=", "Basic /w=="):
        assert parse_basic_auth(bad) is None


def test_origin_allowed() -> None:
    assert origin_allowed(None, "files.example.test")
    assert origin_allowed("https://files.example.test", "files.example.test")
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not origin_allowed("https://evil.example", "files.example.test")
    assert not origin_allowed("null", "files.example.test")
    assert not origin_allowed("https://files.example.test:444", "files.example.test")
    assert not origin_allowed("javascript://files.example.test", "files.example.test")


def test_csrf_token_depends_on_secret_and_credentials() -> None:
    a = csrf_token(b"k1", "Basic abc")
    assert a == csrf_token(b"k1", "Basic abc")
    assert a != csrf_token(b"k2", "Basic abc")
    assert a != csrf_token(b"k1", "Basic abd")


def test_ticket_round_trip_and_other_salt(clock: FakeClock) -> None:
    signer = make_unfreeze_signer(KEYS, clock=clock)
    token = issue_unfreeze_token(signer, ALICE)
    ticket = read_unfreeze_token(signer, token)
    assert ticket.account == ALICE
    assert ticket.claim_key.startswith("unfreeze:")
    assert read_unfreeze_token(signer, issue_unfreeze_token(signer, ALICE)) != ticket


# --------------------------------------------------------------------------
# The unfreeze link
# --------------------------------------------------------------------------


async def test_get_shows_a_confirm_form_and_changes_nothing(admin_env: AdminEnv) -> None:
    token = await frozen_with_token(admin_env)
    for _ in range(2):
        async with admin_env.session.get(admin_env.url(f"/unfreeze/{token}")) as resp:
            assert resp.status == 200
            assert_page_headers(resp)
            text = await resp.text()
        assert f'<span id="account">{ALICE}</span>' in text
        assert f'<form method="post" action="/unfreeze/{token}">' in text
        assert "<script" not in text
    assert await admin_env.frozen()
    async with admin_env.session.head(admin_env.url(f"/unfreeze/{token}")) as resp:
        assert resp.status == 405
    assert await admin_env.frozen()


async def test_post_unfreezes_once(admin_env: AdminEnv) -> None:
    token = await frozen_with_token(admin_env)
    msg_key, rcpt_key = hijack_counter_keys(ALICE)
    await admin_env.state.add_and_count(msg_key, 3, admin_env.clock(), [3600])
    await admin_env.state.add_and_count(rcpt_key, 9, admin_env.clock(), [3600])
    async with admin_env.session.post(admin_env.url(f"/unfreeze/{token}")) as resp:
        assert resp.status == 200
        assert_page_headers(resp)
        assert f"Account {ALICE} unfrozen" in await resp.text()
    assert not await admin_env.frozen()
    assert await admin_env.state.count(msg_key, admin_env.clock(), 3600) == 0
    assert await admin_env.state.count(rcpt_key, admin_env.clock(), 3600) == 0
    # Frozen again later: the old link stays used up.
    await admin_env.state.freeze(ALICE, "again", admin_env.clock())
    async with admin_env.session.post(admin_env.url(f"/unfreeze/{token}")) as resp:
        assert resp.status == 410
        assert "already used" in await resp.text()
    assert await admin_env.frozen()
    # The same ticket cannot be used by a reply to the email either.
    ticket = read_unfreeze_token(admin_env.signer, token)
    assert not await claim_ticket(admin_env.state, ticket, admin_env.clock())


async def test_forged_and_foreign_tokens_are_404(admin_env: AdminEnv) -> None:
    token = await frozen_with_token(admin_env)
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    download_token = LinkSigner(KEYS, WEEK, clock=admin_env.clock).sign(f"n0nce:{ALICE}")
    other_key = make_unfreeze_signer(["another-key-0123456789"], clock=admin_env.clock)
    for bad in (tampered, download_token, issue_unfreeze_token(other_key, ALICE), "x" * 40):
        for method in ("GET", "POST"):
            async with admin_env.session.request(method, admin_env.url(f"/unfreeze/{bad}")) as r:
                assert r.status == 404
                assert_page_headers(r)
    assert await admin_env.frozen()


async def test_expired_token_is_410(admin_env: AdminEnv) -> None:
    token = await frozen_with_token(admin_env)
    admin_env.clock.advance(WEEK + 1)
    for method in ("GET", "POST"):
        async with admin_env.session.request(method, admin_env.url(f"/unfreeze/{token}")) as r:
            assert r.status == 410
            assert "expired" in await r.text()
    assert await admin_env.frozen()


async def test_cross_site_post_is_refused(admin_env: AdminEnv) -> None:
    token = await frozen_with_token(admin_env)
    async with admin_env.session.post(
        admin_env.url(f"/unfreeze/{token}"), headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert await admin_env.frozen()
    async with admin_env.session.post(
        admin_env.url(f"/unfreeze/{token}"), headers={"Origin": admin_env.base_url}
    ) as resp:
        assert resp.status == 200
    assert not await admin_env.frozen()


# --------------------------------------------------------------------------
# The admin page
# --------------------------------------------------------------------------


async def test_admin_requires_the_right_credentials(admin_env: AdminEnv) -> None:
    wrong = [
        {},
        basic(USER, "wrong"),
        basic("root", PASSWORD),
        basic(USER, PASSWORD + " "),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Bearer " + PASSWORD},
    ]
    for auth in wrong:
        async with admin_env.session.get(admin_env.url("/admin"), headers=auth) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith('Basic realm="attachgate admin"')
            assert "frozen" not in (await resp.text()).lower()
    for path in ("/admin/unfreeze", "/admin/lift"):
        async with admin_env.session.post(admin_env.url(path), data={"ip": "x"}) as resp:
            assert resp.status == 401
    async with admin_env.session.get(admin_env.url("/admin"), headers=admin_env.auth) as resp:
        assert resp.status == 200
        assert_page_headers(resp)


async def test_admin_lists_frozen_bans_and_notifications(admin_env: AdminEnv) -> None:
    now = admin_env.clock()
    await admin_env.state.freeze(ALICE, "4 messages in 1 h (limit 3)", now)
    await admin_env.state.freeze("bob@example.com", "<script>alert(1)</script>", now)
    await admin_env.state.ban("192.0.2.66", now + 3600, "3 failed logins in 10 min", now)
    await admin_env.state.ban("192.0.2.67", now - 1, "expired already", now - 3600)
    for i in range(25):
        await admin_env.state.log_notification(
            Notification("hijack", f"subject {i}", "admin@example.com", now + i, {"status": "sent"})
        )
    text = await admin_env.admin_page()
    assert ALICE in text and "4 messages in 1 h (limit 3)" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script" not in text
    assert "192.0.2.66" in text and "192.0.2.67" not in text
    assert "subject 24" in text and "subject 5" in text and "subject 4<" not in text
    assert text.count("<form") == 3  # two unfreeze buttons, one lift


async def test_admin_unfreeze_needs_the_csrf_token(admin_env: AdminEnv) -> None:
    await admin_env.state.freeze(ALICE, "limit", admin_env.clock())
    url = admin_env.url("/admin/unfreeze")
    token = await admin_env.csrf()
    refused = [
        ({"account": ALICE}, {}),
        ({"account": ALICE, "csrf": "0" * 64}, {}),
        ({"account": ALICE, "csrf": csrf_token(b"guess", "Basic x")}, {}),
        ({"account": ALICE, "csrf": token}, {"Origin": "https://evil.example"}),
    ]
    for data, headers in refused:
        async with admin_env.session.post(
            url, data=data, headers={**headers, **admin_env.auth}, allow_redirects=False
        ) as resp:
            assert resp.status == 403
        assert await admin_env.frozen()
    async with admin_env.session.post(
        url, data={"account": ALICE, "csrf": token}, headers=admin_env.auth, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/admin"
    assert not await admin_env.frozen()
    assert ALICE not in await admin_env.admin_page()


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def test_csrf_token_does_not_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    with _socket() as first_sock:
        async for first in _serve(tmp_path, first_sock, clock, HASH):
            await first.state.freeze(ALICE, "limit", clock())
            token = await first.csrf()
    with _socket() as second_sock:
        async for second in _serve(tmp_path, second_sock, clock, HASH):
            async with second.session.post(
                second.url("/admin/unfreeze"),
                data={"account": ALICE, "csrf": token},
                headers=second.auth,
                allow_redirects=False,
            ) as resp:
                assert resp.status == 403
            assert await second.frozen()
            assert await second.csrf() != token


async def test_admin_lift_ban(admin_env: AdminEnv) -> None:
    now = admin_env.clock()
    await admin_env.state.ban("2001:db8::66", now + 3600, "failed logins", now)
    token = await admin_env.csrf()
    async with admin_env.session.post(
        admin_env.url("/admin/lift"),
        data={"ip": "2001:db8::66", "csrf": token},
        headers=admin_env.auth,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
    assert not await admin_env.state.is_banned("2001:db8::66", now)


async def test_admin_is_off_without_a_password_hash(no_admin_env: AdminEnv) -> None:
    for method, path in (("GET", "/admin"), ("POST", "/admin/unfreeze"), ("POST", "/admin/lift")):
        async with no_admin_env.session.request(
            method, no_admin_env.url(path), headers=no_admin_env.auth
        ) as resp:
            assert resp.status == 404
    # The unfreeze link works without the admin page.
    token = await frozen_with_token(no_admin_env)
    async with no_admin_env.session.post(no_admin_env.url(f"/unfreeze/{token}")) as resp:
        assert resp.status == 200
    assert not await no_admin_env.frozen()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
async def test_admin_page_renders_in_headless_chromium(admin_env: AdminEnv, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    now = admin_env.clock()
    await admin_env.state.freeze(ALICE, "4 messages in 1 h (limit 3)", now)
    await admin_env.state.ban("192.0.2.66", now + 3600, "failed logins", now)
    host = admin_env.base_url.removeprefix("http://")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--dump-dom",
        f"http://{USER}:{PASSWORD.replace(' ', '%20')}@{host}/admin",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    dom = out.decode("utf-8", "replace")
    assert proc.returncode == 0, err.decode("utf-8", "replace")[-2000:]
    assert "<h1>attachgate administration</h1>" in dom
    assert f'<td class="account">{ALICE}</td>' in dom
    assert '<td class="ip">192.0.2.66</td>' in dom
    assert dom.count('<button type="submit">') == 2
