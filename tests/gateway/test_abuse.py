"""Abuse controls at module level: real SQLite state, a real next hop to a
recording sink, and a controllable clock (nothing here sleeps).

The calls are made the way ``gateway.handler`` makes them: ``sender_refusal``
at MAIL FROM, then ``recipient_refusal`` once per RCPT with the number of the
recipient in the message.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.abuse import (
    AbuseControl,
    Crossing,
    UnfreezeUnavailable,
    accounts_report,
    bans_report,
    cli_unfreeze,
    failure_delay,
    find_crossing,
    find_unfreeze_tokens,
    format_duration,
    header_from_address,
    lift_ban,
)
from gateway.addresses import AddressError, parse_mailbox
from gateway.config import Settings
from gateway.delivery import NextHop
from gateway.handler import TxInfo
from gateway.notify import Notifier
from gateway.policy.accounts import Account, Directory, WindowLimit
from gateway.policy.relay import Client
from gateway.replies import R421_BANNED, Reply
from gateway.sink import CaptureSink
from storage.interfaces import LinkRecord, StateUnavailable
from storage.sqlite import SqliteStateStore
from tests.gateway.test_notify import next_hop_for, parsed, running_recorder
from tests.helpers.clock import FakeClock
from web.admin import UNFREEZE_SALT, make_unfreeze_signer, read_unfreeze_token
from web.links import LinkSigner

ADMIN = "admin@example.com"
OPS = "ops@example.com"
ALICE = "alice@example.com"
BOB = "bob@example.com"
KEYS = ["unfreeze-test-key-0123456789"]
CLIENT_IP = "192.0.2.10"
DAY = 86400.0
WEEK = 7 * DAY


def make_settings(
    *,
    mode: str = "trial",
    hijack: dict[str, Any] | None = None,
    screening: dict[str, Any] | None = None,
    keys: list[str] | None = None,
    alice_linking: dict[str, Any] | None = None,
) -> Settings:
    hj: dict[str, Any] = {
        "max_messages": 3,
        "max_recipients": 10,
        "window": 3600,
        "notify": [ADMIN, OPS],
    }
    hj.update(hijack or {})
    sc: dict[str, Any] = {
        "max_auth_failures": 3,
        "window": 600,
        "ban_for": 3600,
        "notify": [ADMIN],
        "notify_every": 3600,
        "allow_networks": ["10.0.0.0/8"],
        "failure_delay": 1,
        "max_failure_delay": 4,
    }
    sc.update(screening or {})
    alice: dict[str, Any] = {}
    if alice_linking is not None:
        alice["linking"] = alice_linking
    return Settings.model_validate(
        {
            "smtp": {"hostname": "gw.test"},
            "web": {"public_url": "https://files.example.test/"},
            "links": {"secret_keys": KEYS if keys is None else keys},
            "policy": {"mode": mode},
            "hijack": hj,
            "screening": sc,
            "accounts": {ALICE: alice, BOB: {}},
        }
    )


@dataclass
class Env:
    settings: Settings
    directory: Directory
    state: SqliteStateStore
    clock: FakeClock
    recorder: CaptureSink
    hop: NextHop
    abuse: AbuseControl
    path: Path
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def account(self, address: str = ALICE) -> Account:
        found = self.directory.account(address)
        assert found is not None
        return found

    async def message(
        self, n_rcpts: int = 1, *, account: str = ALICE, ip: str = CLIENT_IP, null: bool = False
    ) -> list[Reply | None]:
        """One transaction as the handler runs it: MAIL, then n RCPTs."""
        return await send_message(self.abuse, self.account(account), n_rcpts, ip=ip, null=null)

    async def notices(self) -> list[EmailMessage]:
        await self.abuse.drain()
        return [parsed(r) for r in self.recorder.messages]


def tx_for(account: Account, *, ip: str = CLIENT_IP, sender: str | None = "") -> TxInfo:
    address = account.address if sender == "" else sender
    return TxInfo(
        session_id="s-test",
        client=Client(ip=ipaddress.ip_address(ip), login=account.address, tls=True),
        helo="client.test",
        sender=None if address is None else parse_mailbox(address),
        account=account,
        recipients=[],
        tls=True,
    )


async def send_message(
    abuse: AbuseControl, account: Account, n_rcpts: int, *, ip: str = CLIENT_IP, null: bool = False
) -> list[Reply | None]:
    refusal = await abuse.sender_refusal(account)
    if refusal is not None:
        return [refusal]
    tx = tx_for(account, ip=ip, sender=None if null else "")
    replies: list[Reply | None] = []
    for i in range(n_rcpts):
        reply = await abuse.recipient_refusal(tx, account, len(tx.recipients) + 1)
        if reply is None:
            tx.recipients.append(f"rcpt{i}@elsewhere.example")
        replies.append(reply)
    return replies


def body_of(msg: EmailMessage) -> str:
    text = msg.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def codes(replies: list[Reply | None]) -> list[tuple[int, str] | None]:
    return [None if r is None else (r.code, r.enhanced) for r in replies]


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def recorder() -> AsyncIterator[CaptureSink]:
    async with running_recorder() as sink:
        yield sink


@pytest.fixture
async def make_env(tmp_path: Path, recorder: CaptureSink) -> AsyncIterator[EnvFactory]:
    envs: list[Env] = []

    async def build(*, path: Path | None = None, **kwargs: Any) -> Env:
        settings = make_settings(**kwargs)
        db = path or tmp_path / "state.db"
        state = await SqliteStateStore.open(db)
        clock = FakeClock()
        hop = next_hop_for(recorder.port)
        notifier = Notifier(next_hop=hop, hostname="gw.test", sender=None, state=state, clock=clock)
        directory = Directory(settings)
        abuse = AbuseControl(
            settings=settings, directory=directory, state=state, notifier=notifier, clock=clock
        )
        env = Env(settings, directory, state, clock, recorder, hop, abuse, db)
        envs.append(env)
        return env

    yield build
    for env in envs:
        await env.abuse.drain()
        await env.hop.close()
        await env.state.close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


TRIAL = (450, "4.7.1")
PRODUCTION = (550, "5.7.1")


# --------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------


def test_find_crossing_names_the_first_limit_crossed() -> None:
    limits = (WindowLimit(60, 3, 10), WindowLimit(3600, 5, None))
    assert find_crossing(limits, [3, 3], [10, 10]) is None
    assert find_crossing(limits, [4, 4], [4, 4]) == Crossing("messages", 4, 3, 60)
    assert find_crossing(limits, None, [11, 11]) == Crossing("recipients", 11, 10, 60)
    assert find_crossing(limits, [2, 6], [2, 6]) == Crossing("messages", 6, 5, 3600)
    # EmailMessage counts are only judged for a recipient that started a message.
    assert find_crossing(limits, None, [2, 99]) is None


@given(st.integers(min_value=1, max_value=500), st.floats(0.01, 5), st.floats(0.01, 60))
def test_failure_delay_doubles_and_is_capped(n: int, base: float, cap: float) -> None:
    delay = failure_delay(n, base, cap)
    assert 0 < delay <= cap
    assert failure_delay(n + 1, base, cap) >= delay
    if n < 30:
        assert delay == min(base * 2 ** (n - 1), cap)


def test_failure_delay_is_zero_before_a_failure() -> None:
    assert failure_delay(0, 1.0, 8.0) == 0.0


def test_format_duration() -> None:
    assert [format_duration(s) for s in (3600, 5400, 86400, 90, 7.5)] == [
        "1 h",
        "90 min",
        "1 d",
        "90 s",
        "7.5 s",
    ]


def test_find_unfreeze_tokens_in_order_without_duplicates() -> None:
    texts = [
        "Re: [attachgate] Account x frozen [unfreeze:aaa.bbb.ccc]",
        "> [unfreeze:aaa.bbb.ccc]\n[unfreeze:ddd.e-e.f_f] [unfreeze:not a token]",
    ]
    assert find_unfreeze_tokens(texts) == ["aaa.bbb.ccc", "ddd.e-e.f_f"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("admin@example.com", "admin@example.com"),
        ("Admin <Admin@Example.COM>", "admin@example.com"),
        ('"Admin, Mail" <admin@example.com>', "admin@example.com"),
        ('"Evil <x@evil.example>" <admin@example.com>', "admin@example.com"),
        ("=?utf-8?q?J=C3=BCrgen?=\r\n <admin@example.com>", "admin@example.com"),
    ],
)
def test_header_from_accepts_one_plain_mailbox(raw: str, expected: str) -> None:
    assert header_from_address(raw).key == expected


@pytest.mark.parametrize(
    "raw",
    [
        "admin@example.com <evil@evil.example>",
        "admin@example.com, evil@evil.example",
        "Admin <admin@example.com>, Evil <evil@evil.example>",
        "admin@example.com (Admin)",
        "(comment) <admin@example.com>",
        "Admin <admin@example.com",
        "Friends: admin@example.com;",
        '"unterminated <admin@example.com>',
        "Admin <admin%evil.example@example.com>",
        "",
    ],
)
def test_header_from_refuses_anything_ambiguous(raw: str) -> None:
    with pytest.raises(AddressError):
        header_from_address(raw)


# --------------------------------------------------------------------------
# Hijack limits
# --------------------------------------------------------------------------


async def test_sliding_window_boundaries_over_two_windows(make_env: EnvFactory) -> None:
    env = await make_env(
        hijack={
            "max_messages": 3,
            "max_recipients": None,
            "window": 60,
            "freeze": False,
            "extra_windows": [{"window": 600, "max_messages": 5}],
        }
    )
    t0 = env.clock.now
    for offset in (0, 10, 20):
        env.clock.now = t0 + offset
        assert await env.message() == [None]
    env.clock.now = t0 + 30
    assert codes(await env.message()) == [TRIAL]  # 4 in 60 s
    # The event of t0 leaves the 60 s window at exactly t0 + 60.
    env.clock.now = t0 + 59.999
    assert codes(await env.message()) == [TRIAL]
    env.clock.now = t0 + 60
    assert await env.message() == [None]  # t0+10, +20, +60
    env.clock.now = t0 + 69.999
    assert codes(await env.message()) == [TRIAL]
    env.clock.now = t0 + 70
    assert await env.message() == [None]  # t0+20, +60, +70 in 60 s; 5 in 600 s
    # The long window is full now even where the short one has room.
    env.clock.now = t0 + 200
    assert codes(await env.message()) == [TRIAL]
    report = await accounts_report(env.state, env.directory, env.clock.now)
    alice = next(r for r in report if r["account"] == ALICE)
    assert [(w["window"], w["messages"]) for w in alice["windows"]] == [(60, 0), (600, 5)]
    # The first message leaves the 600 s window at t0 + 600 exactly.
    env.clock.now = t0 + 599.999
    assert codes(await env.message()) == [TRIAL]
    env.clock.now = t0 + 600
    assert await env.message() == [None]
    assert not (await env.state.get_account_state(ALICE)).frozen


@pytest.mark.parametrize(("mode", "expected"), [("trial", TRIAL), ("production", PRODUCTION)])
async def test_max_messages_plus_one_freezes_and_notifies_once(
    make_env: EnvFactory, mode: str, expected: tuple[int, str]
) -> None:
    env = await make_env(mode=mode)
    for _ in range(3):
        assert await env.message(ip="192.0.2.1") == [None]
    assert codes(await env.message(ip="198.51.100.7")) == [expected]
    st_ = await env.state.get_account_state(ALICE)
    assert st_.frozen
    assert st_.frozen_reason == "4 messages in 1 h (limit 3)"
    # Every later message is refused at MAIL FROM while frozen.
    for _ in range(10):
        assert codes(await env.message()) == [expected]
    # Other accounts are not affected.
    assert await env.message(account=BOB) == [None]
    notices = await env.notices()
    assert len(notices) == 1
    assert sorted(env.recorder.messages[0].rcpt_tos) == [ADMIN, OPS]
    notice = notices[0]
    assert notice["Auto-Submitted"] == "auto-generated"
    assert notice["Reply-To"] == "attachgate-control@gw.test"
    subject = str(notice["Subject"])
    assert subject.startswith(f"[attachgate] Account {ALICE} frozen")
    token = re.search(r"\[unfreeze:([^\]]+)\]", subject)
    assert token is not None
    body = body_of(notice)
    assert "Limit crossed: 4 messages in 1 h (limit 3)." in body
    assert "last 1 h: 3 messages, 3 recipients (limits: 3 messages, 10 recipients)" in body
    assert "192.0.2.1, 198.51.100.7" in body
    assert f"https://files.example.test/unfreeze/{token.group(1)}" in body
    assert f"attachgate accounts unfreeze {ALICE}" in body
    assert "2026-09-21 14:13:20 UTC" in body


@pytest.mark.parametrize(("mode", "expected"), [("trial", TRIAL), ("production", PRODUCTION)])
async def test_too_many_recipients_in_one_message(
    make_env: EnvFactory, mode: str, expected: tuple[int, str]
) -> None:
    env = await make_env(mode=mode, hijack={"max_recipients": 5, "max_messages": 100})
    replies = await env.message(7)
    assert codes(replies) == [None] * 5 + [expected, expected]
    assert (await env.state.get_account_state(ALICE)).frozen
    assert codes(await env.message()) == [expected]
    notices = await env.notices()
    assert len(notices) == 1
    assert "Limit crossed: 6 recipients in 1 h (limit 5)." in body_of(notices[0])
    # The refused recipients were not counted: the window holds what went out.
    report = await accounts_report(env.state, env.directory, env.clock.now)
    alice = next(r for r in report if r["account"] == ALICE)
    assert (alice["windows"][0]["messages"], alice["windows"][0]["recipients"]) == (1, 5)
    assert alice["state"] == "frozen"


async def test_policy_override_beats_the_mode(make_env: EnvFactory) -> None:
    env = await make_env(mode="trial", hijack={"max_messages": 1})
    settings = Settings.model_validate(
        {**env.settings.model_dump(), "policy": {"frozen_account": "permanent"}}
    )
    env.abuse = AbuseControl(
        settings=settings,
        directory=env.directory,
        state=env.state,
        notifier=Notifier(next_hop=env.hop, hostname="gw.test", sender=None, state=env.state),
        clock=env.clock,
    )
    assert await env.message() == [None]
    assert codes(await env.message()) == [PRODUCTION]


async def test_null_sender_is_never_counted(env: Env) -> None:
    for _ in range(10):
        assert await env.message(5, null=True) == [None] * 5
    assert await env.state.count(f"hijack:msg:{ALICE}", env.clock.now, 3600) == 0
    assert await env.state.count(f"hijack:rcpt:{ALICE}", env.clock.now, 3600) == 0


async def test_limits_disabled_for_the_account(make_env: EnvFactory) -> None:
    env = await make_env(hijack={"enabled": False, "max_messages": 1})
    for _ in range(5):
        assert await env.message() == [None]


async def test_without_freeze_refuses_until_the_window_slides(make_env: EnvFactory) -> None:
    env = await make_env(hijack={"freeze": False, "max_messages": 2, "window": 600})
    t0 = env.clock.now
    assert await env.message() == [None]
    assert await env.message() == [None]
    for _ in range(5):
        assert codes(await env.message()) == [TRIAL]
    assert not (await env.state.get_account_state(ALICE)).frozen
    notices = await env.notices()
    assert len(notices) == 1
    assert "over its sending limit" in str(notices[0]["Subject"])
    assert "[unfreeze:" not in str(notices[0]["Subject"])
    assert notices[0]["Reply-To"] is None
    env.clock.now = t0 + 600
    assert await env.message() == [None]
    assert await env.message() == [None]
    assert codes(await env.message()) == [TRIAL]
    assert len(await env.notices()) == 2  # one per window crossed


async def test_thaw_after(make_env: EnvFactory) -> None:
    env = await make_env(hijack={"max_messages": 1, "thaw_after": 1800})
    assert await env.message() == [None]
    assert codes(await env.message()) == [TRIAL]
    env.clock.advance(1799)
    assert codes(await env.message()) == [TRIAL]
    env.clock.advance(1)
    assert await env.message() == [None]
    assert not (await env.state.get_account_state(ALICE)).frozen


async def test_two_workers_share_the_limit_and_send_one_notice(make_env: EnvFactory) -> None:
    first = await make_env(hijack={"max_messages": 5})
    # Two controls on two connections to one database file, as two worker
    # processes have; both clocks stand at the same time.
    second = await make_env(path=first.path, hijack={"max_messages": 5})
    results = []
    for i in range(12):
        worker = first if i % 2 else second
        results += await worker.message()
    assert results.count(None) == 5
    await first.abuse.drain()
    await second.abuse.drain()
    assert len(first.recorder.messages) == 1


async def test_over_quota_only_when_linking_is_on(make_env: EnvFactory) -> None:
    env = await make_env(mode="production", alice_linking={"enabled": True, "quota": 1000})
    assert await env.abuse.sender_refusal(env.account()) is None
    record = LinkRecord(
        link_id="l1",
        blob_digest="0" * 64,
        filename="a.bin",
        content_type="application/octet-stream",
        size=1000,
        sender=ALICE,
        message_id="<m@x>",
        created=env.clock.now,
        expires=env.clock.now + DAY,
    )
    await env.state.add_links([record, replace(record, link_id="l2", sender=BOB)])
    refusal = await env.abuse.sender_refusal(env.account())
    assert refusal is not None
    assert (refusal.code, refusal.enhanced) == (552, "5.2.2")
    assert await env.abuse.sender_refusal(env.account(BOB)) is None  # linking is off for bob


async def test_runtime_disabled_account_is_refused(env: Env) -> None:
    await env.state.set_disabled(ALICE, True)
    refusal = await env.abuse.sender_refusal(env.account())
    assert refusal is not None
    assert (refusal.code, refusal.enhanced) == TRIAL
    assert "disabled" in refusal.text


# --------------------------------------------------------------------------
# Re-enabling
# --------------------------------------------------------------------------


async def freeze_alice(env: Env) -> EmailMessage:
    for _ in range(3):
        assert await env.message() == [None]
    assert codes(await env.message()) == [TRIAL]
    notices = await env.notices()
    assert len(notices) == 1
    return notices[0]


def token_of(notice: EmailMessage) -> str:
    found = re.search(r"\[unfreeze:([^\]]+)\]", str(notice["Subject"]))
    assert found is not None
    return found.group(1)


def reply_to(
    notice: EmailMessage,
    *,
    header_from: str = f"Mail Admin <{ADMIN}>",
    subject: str | None = None,
    quote: bool = True,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = header_from
    msg["To"] = str(notice["Reply-To"])
    msg["Subject"] = subject if subject is not None else "Re: " + str(notice["Subject"])
    quoted = "\n".join("> " + line for line in body_of(notice).splitlines()) if quote else ""
    msg.set_content("Password changed, go ahead.\n\n" + quoted + "\n")
    return msg.as_bytes(policy=SMTP_POLICY)


def admin_tx(env: Env, sender: str | None = ADMIN) -> TxInfo:
    return tx_for(env.account(), ip="203.0.113.5", sender=sender)


async def test_reply_with_the_token_unfreezes_once(env: Env) -> None:
    notice = await freeze_alice(env)
    content = reply_to(notice)
    reply = await env.abuse.control_message(admin_tx(env), content)
    assert str(reply) == f"250 2.0.0 Account {ALICE} unfrozen"
    assert not (await env.state.get_account_state(ALICE)).frozen
    # The windows start afresh: the account can send its full quota again.
    for _ in range(3):
        assert await env.message() == [None]
    again = await env.abuse.control_message(admin_tx(env), content)
    assert str(again) == "550 5.7.1 Unfreeze token already used"


async def test_token_in_the_body_only_is_found(env: Env) -> None:
    notice = await freeze_alice(env)
    content = reply_to(notice, subject="Re: your account")
    reply = await env.abuse.control_message(admin_tx(env), content)
    assert reply.code == 250


async def test_forged_tokens_do_not_unfreeze(env: Env) -> None:
    notice = await freeze_alice(env)
    token = token_of(notice)
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    other_key = LinkSigner(["some-other-key-0123456789"], WEEK, salt=UNFREEZE_SALT)
    other_salt = LinkSigner(KEYS, WEEK)  # the download-link salt
    for forged in (
        tampered,
        other_key.sign(f"n0nce:{ALICE}"),
        other_salt.sign(f"n0nce:{ALICE}"),
    ):
        subject = f"Re: unfreeze [unfreeze:{forged}]"
        reply = await env.abuse.control_message(
            admin_tx(env), reply_to(notice, subject=subject, quote=False)
        )
        assert str(reply) == "550 5.7.1 Unfreeze token invalid"
    assert (await env.state.get_account_state(ALICE)).frozen


async def test_expired_token_does_not_unfreeze(env: Env) -> None:
    notice = await freeze_alice(env)
    env.clock.advance(WEEK + 1)
    reply = await env.abuse.control_message(admin_tx(env), reply_to(notice))
    assert str(reply) == "550 5.7.1 Unfreeze token expired"
    assert (await env.state.get_account_state(ALICE)).frozen


async def test_only_administrators_can_unfreeze_by_reply(env: Env) -> None:
    notice = await freeze_alice(env)
    content = reply_to(notice)
    not_admin = "550 5.7.1 Sender is not an administrator"
    # Envelope sender not an administrator (header From is).
    assert str(await env.abuse.control_message(admin_tx(env, BOB), content)) == not_admin
    assert str(await env.abuse.control_message(admin_tx(env, None), content)) == not_admin
    # Header From not an administrator (envelope sender is).
    for header in (f"Bob <{BOB}>", f"{ADMIN} <{BOB}>", f"<{ADMIN}>, <{BOB}>"):
        forged = reply_to(notice, header_from=header)
        assert str(await env.abuse.control_message(admin_tx(env), forged)) == not_admin
    # Two From headers.
    doubled = content.replace(b"From: ", f"From: {BOB}\r\nFrom: ".encode(), 1)
    assert str(await env.abuse.control_message(admin_tx(env), doubled)) == not_admin
    assert (await env.state.get_account_state(ALICE)).frozen
    # None of that used the ticket up: the administrator's reply still works,
    # in any case of the address.
    upper = tx_for(env.account(), sender="Admin@EXAMPLE.com")
    assert (await env.abuse.control_message(upper, content)).code == 250


async def test_reply_without_token_or_garbage(env: Env) -> None:
    await freeze_alice(env)
    plain = b"From: admin@example.com\r\nSubject: hello\r\n\r\nno token here\r\n"
    reply = await env.abuse.control_message(admin_tx(env), plain)
    assert str(reply) == "550 5.7.1 No unfreeze token found in the message"
    garbage = bytes(range(256)) * 10
    assert (await env.abuse.control_message(admin_tx(env), garbage)).code == 550
    assert (await env.state.get_account_state(ALICE)).frozen


def test_control_address_default_and_configured() -> None:
    settings = make_settings()
    directory = Directory(settings)

    def control(s: Settings) -> AbuseControl:
        # The notifier and state are not used by is_control_address.
        return AbuseControl(
            settings=s,
            directory=directory,
            state=None,  # type: ignore[arg-type]
            notifier=None,  # type: ignore[arg-type]
        )

    abuse = control(settings)
    assert abuse.is_control_address(parse_mailbox("attachgate-control@gw.test"))
    assert abuse.is_control_address(parse_mailbox("AttachGate-Control@GW.test"))
    assert not abuse.is_control_address(parse_mailbox("attachgate-control@other.test"))
    assert not abuse.is_control_address(parse_mailbox("postmaster@gw.test"))
    custom = Settings.model_validate(
        {**settings.model_dump(), "hijack": {"control_address": "unfreeze@example.com"}}
    )
    abuse = control(custom)
    assert abuse.is_control_address(parse_mailbox("UNFREEZE@example.com"))
    assert not abuse.is_control_address(parse_mailbox("attachgate-control@gw.test"))


async def test_unfreeze_link_carries_a_ticket_for_the_account(env: Env) -> None:
    link = env.abuse.unfreeze_link(ALICE)
    prefix = "https://files.example.test/unfreeze/"
    assert link.startswith(prefix)
    signer = make_unfreeze_signer(KEYS, clock=env.clock)
    ticket = read_unfreeze_token(signer, link[len(prefix) :])
    assert ticket.account == ALICE
    assert env.abuse.unfreeze_link(ALICE) != link  # a fresh nonce each time


async def test_without_secret_keys_only_the_cli_can_unfreeze(make_env: EnvFactory) -> None:
    env = await make_env(keys=[])
    with pytest.raises(UnfreezeUnavailable):
        env.abuse.unfreeze_link(ALICE)
    for _ in range(3):
        await env.message()
    assert codes(await env.message()) == [TRIAL]
    notices = await env.notices()
    assert len(notices) == 1
    assert "[unfreeze:" not in str(notices[0]["Subject"])
    assert f"attachgate accounts unfreeze {ALICE}" in body_of(notices[0])
    plain = b"From: admin@example.com\r\nSubject: [unfreeze:a.b.c]\r\n\r\n"
    reply = await env.abuse.control_message(admin_tx(env), plain)
    assert str(reply) == "550 5.7.1 Unfreezing by reply is not configured"
    assert await cli_unfreeze(env.state, ALICE.upper())
    assert await env.message() == [None]


async def test_cli_unfreeze_and_reports(env: Env) -> None:
    await freeze_alice(env)
    report = await accounts_report(env.state, env.directory, env.clock.now)
    by_account = {r["account"]: r for r in report}
    assert by_account[ALICE]["state"] == "frozen"
    assert by_account[ALICE]["frozen_reason"] == "4 messages in 1 h (limit 3)"
    assert by_account[ALICE]["windows"][0]["messages"] == 3
    assert by_account[ALICE]["quota"] is None
    assert by_account[BOB]["state"] == "active"
    assert await cli_unfreeze(env.state, ALICE)
    assert not await cli_unfreeze(env.state, ALICE)
    report = await accounts_report(env.state, env.directory, env.clock.now)
    alice = next(r for r in report if r["account"] == ALICE)
    assert (alice["state"], alice["windows"][0]["messages"]) == ("active", 0)
    await env.state.freeze("gone@example.com", "old", env.clock.now)
    report = await accounts_report(env.state, env.directory, env.clock.now)
    assert report[-1]["account"] == "gone@example.com"
    assert report[-1]["state"] == "frozen (not configured)"


# --------------------------------------------------------------------------
# Failed-AUTH screening
# --------------------------------------------------------------------------


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


async def test_failures_ban_the_ip_only(env: Env) -> None:
    bad = ip("192.0.2.66")
    delays = [await env.abuse.auth_failed(bad, f"user{i}@x.example", "PLAIN") for i in range(2)]
    assert await env.abuse.connection_refusal(bad) is None
    delays.append(await env.abuse.auth_failed(bad, ALICE, "LOGIN"))
    assert delays == [1.0, 2.0, 4.0]
    assert await env.abuse.connection_refusal(bad) is R421_BANNED
    assert str(R421_BANNED).startswith("421 4.7.0 ")
    assert await env.abuse.connection_refusal(ip("192.0.2.67")) is None
    # The login is not banned: alice may still log in from elsewhere (the
    # handler asks connection_refusal, which only knows IPs).
    assert await env.abuse.sender_refusal(env.account()) is None
    bans = await bans_report(env.state, env.clock.now)
    assert [(b["ip"], b["until"] - b["since"], b["reason"]) for b in bans] == [
        ("192.0.2.66", 3600, "3 failed logins in 10 min")
    ]


async def test_ban_expires_with_the_clock(env: Env) -> None:
    bad = ip("2001:db8::66")
    for _ in range(3):
        await env.abuse.auth_failed(bad, "x@y.example", "PLAIN")
    env.clock.advance(3599.999)
    assert await env.abuse.connection_refusal(bad) is R421_BANNED
    env.clock.advance(0.001)
    assert await env.abuse.connection_refusal(bad) is None
    assert await bans_report(env.state, env.clock.now) == []


async def test_failures_outside_the_window_do_not_add_up(env: Env) -> None:
    bad = ip("192.0.2.70")
    await env.abuse.auth_failed(bad, "x@y.example", "PLAIN")
    await env.abuse.auth_failed(bad, "x@y.example", "PLAIN")
    env.clock.advance(600)
    assert await env.abuse.auth_failed(bad, "x@y.example", "PLAIN") == 1.0
    assert await env.abuse.connection_refusal(bad) is None


async def test_allowed_networks_are_never_banned(env: Env) -> None:
    inside = ip("10.1.2.3")
    delays = [await env.abuse.auth_failed(inside, ALICE, "PLAIN") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert await env.abuse.connection_refusal(inside) is None
    assert await bans_report(env.state, env.clock.now) == []
    assert await env.notices() == []


async def test_screening_switched_off(make_env: EnvFactory) -> None:
    env = await make_env(screening={"enabled": False})
    bad = ip("192.0.2.66")
    assert [await env.abuse.auth_failed(bad, ALICE, "PLAIN") for _ in range(5)] == [0.0] * 5
    assert await env.abuse.connection_refusal(bad) is None
    assert await env.state.count("authfail:ip:192.0.2.66", env.clock.now, 600) == 0


async def test_lift_ban(env: Env) -> None:
    for _ in range(3):
        await env.abuse.auth_failed(ip("2001:db8::1"), "x@y.example", "PLAIN")
    assert await lift_ban(env.state, "2001:0db8:0000::0001")
    assert not await lift_ban(env.state, "2001:db8::1")
    assert await env.abuse.connection_refusal(ip("2001:db8::1")) is None
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        await lift_ban(env.state, "not-an-ip")


async def test_digest_content_and_rate(env: Env) -> None:
    first = ip("192.0.2.66")
    await env.abuse.auth_failed(first, ALICE, "PLAIN")
    await env.abuse.auth_failed(first, "nobody@x.example", "LOGIN")
    await env.abuse.auth_failed(first, "evil\r\nBcc: x@y", "PLAIN")
    notices = await env.notices()
    assert len(notices) == 1
    assert env.recorder.messages[0].rcpt_tos == [ADMIN]
    assert "192.0.2.66" in str(notices[0]["Subject"])
    body = body_of(notices[0])
    assert "Banned addresses:\n  192.0.2.66 until 2026-09-21 15:13:20 UTC" in body
    assert "2026-09-21 14:13:20 UTC  192.0.2.66  PLAIN  alice@example.com" in body
    assert "192.0.2.66  LOGIN  nobody@x.example" in body
    assert "evil??Bcc: x@y" in body  # control characters cannot forge lines
    assert f"  {ALICE}: 1\n" in body
    assert "  (unknown): 2\n" in body
    # A second ban within notify_every sends nothing now ...
    env.clock.advance(60)
    for _ in range(3):
        await env.abuse.auth_failed(ip("192.0.2.77"), "x@y.example", "PLAIN")
    assert len(await env.notices()) == 1
    # ... and is reported with the next digest.
    env.clock.advance(3600)
    for _ in range(3):
        await env.abuse.auth_failed(ip("192.0.2.88"), "x@y.example", "PLAIN")
    notices = await env.notices()
    assert len(notices) == 2
    body = body_of(notices[1])
    assert "192.0.2.77 until" in body and "192.0.2.88 until" in body
    assert "192.0.2.66" not in body


# --------------------------------------------------------------------------
# Persistence and failing closed
# --------------------------------------------------------------------------


async def test_state_survives_reopening_the_store(make_env: EnvFactory) -> None:
    env = await make_env()
    await freeze_alice(env)
    for _ in range(3):
        await env.abuse.auth_failed(ip("192.0.2.99"), "x@y.example", "PLAIN")
    assert await env.message(account=BOB) == [None]
    await env.abuse.drain()
    await env.state.close()
    again = await make_env(path=env.path)
    again.clock.now = env.clock.now
    assert codes(await again.message()) == [TRIAL]
    assert await again.abuse.connection_refusal(ip("192.0.2.99")) is R421_BANNED
    assert await again.message(account=BOB, n_rcpts=1) == [None]
    assert await again.state.count(f"hijack:msg:{BOB}", again.clock.now, 3600) == 2


async def test_closed_store_fails_closed(env: Env) -> None:
    await env.state.close()
    with pytest.raises(StateUnavailable):
        await env.abuse.sender_refusal(env.account())
    with pytest.raises(StateUnavailable):
        await env.abuse.recipient_refusal(tx_for(env.account()), env.account(), 1)
    with pytest.raises(StateUnavailable):
        await env.abuse.connection_refusal(ip("192.0.2.1"))
    with pytest.raises(StateUnavailable):
        await env.abuse.auth_failed(ip("192.0.2.1"), ALICE, "PLAIN")


async def test_locked_store_fails_closed_and_counts_nothing(make_env: EnvFactory) -> None:
    env = await make_env()
    locked = await SqliteStateStore.open(env.path, busy_timeout=0.05)
    env.abuse = AbuseControl(
        settings=env.settings,
        directory=env.directory,
        state=locked,
        notifier=Notifier(next_hop=env.hop, hostname="gw.test", sender=None, state=locked),
        clock=env.clock,
    )
    other = sqlite3.connect(env.path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StateUnavailable):
            await env.abuse.recipient_refusal(tx_for(env.account()), env.account(), 1)
        other.execute("ROLLBACK")
    finally:
        other.close()
        await locked.close()
    assert await env.state.count(f"hijack:msg:{ALICE}", env.clock.now, 3600) == 0


async def test_a_ban_by_another_worker_takes_effect_within_a_second(
    make_env: EnvFactory,
) -> None:
    from gateway.abuse import CLEAN_CACHE_SECONDS

    first = await make_env()
    second = await make_env(path=first.path)
    second.clock.now = first.clock.now
    bad = ip("192.0.2.66")
    # The second worker has just seen this address clean.
    assert await second.abuse.connection_refusal(bad) is None
    for i in range(3):
        await first.abuse.auth_failed(bad, f"user{i}@x.example", "PLAIN")
    assert await first.abuse.connection_refusal(bad) is R421_BANNED
    # Within the cache time the second still trusts its answer; after it, not.
    assert await second.abuse.connection_refusal(bad) is None
    second.clock.advance(CLEAN_CACHE_SECONDS + 0.001)
    assert await second.abuse.connection_refusal(bad) is R421_BANNED
