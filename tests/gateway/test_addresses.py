"""The strict address parser: relay tricks refused, plain mailboxes accepted unchanged."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.addresses import (
    MAX_DOMAIN_OCTETS,
    MAX_LOCAL_OCTETS,
    MAX_MAILBOX_OCTETS,
    Address,
    AddressError,
    domain_matches,
    parse_mailbox,
    parse_reverse_path,
)

IP = "192.0.2.1"
DOMAIN = "nmap.scanme.org"
SERVER = "mail.example.com"

# The sixteen MAIL FROM / RCPT TO pairs of nmap's smtp-open-relay script, with the
# parser's verdict on each side: "plain" (a mailbox; relay policy decides), "null"
# (the null sender), "route" (accepted, flagged had_route) or the refusal reason.
NMAP_PROBES: list[tuple[str, str, str, str]] = [
    ("", f"relaytest@{DOMAIN}", "null", "plain"),
    (f"antispam@{DOMAIN}", f"relaytest@{DOMAIN}", "plain", "plain"),
    (f"antispam@{SERVER}", f"relaytest@{DOMAIN}", "plain", "plain"),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}", "address literal", "plain"),
    (f"antispam@[{IP}]", f"relaytest%{DOMAIN}@[{IP}]", "address literal", "percent hack"),
    (f"antispam@[{IP}]", f"relaytest%{DOMAIN}@{SERVER}", "address literal", "percent hack"),
    (f"antispam@[{IP}]", f'"relaytest@{DOMAIN}"', "address literal", "@ in quoted"),
    (f"antispam@[{IP}]", f'"relaytest%{DOMAIN}"', "address literal", "percent hack"),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}@[{IP}]", "address literal", "more than one @"),
    (f"antispam@[{IP}]", f'"relaytest@{DOMAIN}"@[{IP}]', "address literal", "@ in quoted"),
    (f"antispam@[{IP}]", f"relaytest@{DOMAIN}@{SERVER}", "address literal", "more than one @"),
    (f"antispam@[{IP}]", f"@[{IP}]:relaytest@{DOMAIN}", "address literal", "source route"),
    (f"antispam@[{IP}]", f"@{SERVER}:relaytest@{DOMAIN}", "address literal", "route"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest", "address literal", "bang path"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest@[{IP}]", "address literal", "bang path"),
    (f"antispam@[{IP}]", f"{DOMAIN}!relaytest@{SERVER}", "address literal", "bang path"),
]


def _verdict_reverse(text: str) -> str:
    try:
        address = parse_reverse_path(text)
    except AddressError as exc:
        return str(exc)
    if address is None:
        return "null"
    return "route" if address.had_route else "plain"


def _verdict_forward(text: str) -> str:
    try:
        address = parse_mailbox(text)
    except AddressError as exc:
        return str(exc)
    return "route" if address.had_route else "plain"


def _matches(verdict: str, expected: str) -> bool:
    if expected in ("null", "plain", "route"):
        return verdict == expected
    return expected in verdict


def _assert_refused(
    parse: Callable[..., object], text: str, *, reason: str, smtputf8: bool = False
) -> None:
    with pytest.raises(AddressError) as info:
        parse(text, smtputf8=smtputf8)
    assert str(info.value) == reason


def test_nmap_probe_list_is_complete() -> None:
    assert len(NMAP_PROBES) == 16
    assert len({(sender, recipient) for sender, recipient, _, _ in NMAP_PROBES}) == 16


@pytest.mark.parametrize(("sender", "recipient", "want_from", "want_to"), NMAP_PROBES)
def test_nmap_open_relay_probes(sender: str, recipient: str, want_from: str, want_to: str) -> None:
    got_from = _verdict_reverse(sender)
    got_to = _verdict_forward(recipient)
    assert _matches(got_from, want_from), (sender, got_from)
    assert _matches(got_to, want_to), (recipient, got_to)
    # The same verdicts hold for the bracketed form of the SMTP command.
    assert _verdict_reverse(f"<{sender}>") == got_from
    assert _verdict_forward(f"<{recipient}>") == got_to


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("user%remote@local", "percent hack in local part"),
        ("remote!user@local", "bang path in local part"),
        ('"user@remote"@local', "@ in quoted local part"),
        ("user@remote.example.", "trailing dot in domain"),
        ("user@remote.", "trailing dot in domain"),
        ("user@[1.2.3.4]", "address literal not allowed"),
        ("user@[IPv6:2001:db8::1]", "address literal not allowed"),
        # Postfix's own routing example uses single-label names, which are refused
        # outright; the same route with full names is accepted and flagged (below).
        ("@a,@b:user@remote", "malformed source route: domain needs at least two labels"),
    ],
)
def test_postfix_routing_forms_are_refused(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox(text)
    assert str(info.value) == reason


@pytest.mark.parametrize(
    "text",
    [
        "@a.example,@b.example:user@remote.example",
        "<@a.example,@b.example:user@remote.example>",
        "@relay.example:user@remote.example",
    ],
)
def test_source_route_is_dropped_and_flagged(text: str) -> None:
    address = parse_mailbox(text)
    assert address == Address("user", "remote.example", had_route=True)
    assert str(address) == "user@remote.example"


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("user@example.com", "user", "example.com"),
        ("<user@example.com>", "user", "example.com"),
        ("User.Name+tag@Example.COM", "User.Name+tag", "example.com"),
        ("o'brien@mail.example.co.uk", "o'brien", "mail.example.co.uk"),
        ("a@b.co", "a", "b.co"),
        ("x-1_2=3@sub-domain.example.net", "x-1_2=3", "sub-domain.example.net"),
        ("{}|~^`#$&*/?=@example.com", "{}|~^`#$&*/?=", "example.com"),
        ('"john doe"@example.com', '"john doe"', "example.com"),
        ('"a\\"b"@example.com', '"a\\"b"', "example.com"),
        ("user@xn--bcher-kva.example", "user", "xn--bcher-kva.example"),
        ("user@123.example", "user", "123.example"),
    ],
)
def test_good_addresses(text: str, local: str, domain: str) -> None:
    address = parse_mailbox(text)
    assert address == Address(local, domain)
    assert parse_reverse_path(text) == address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty address"),
        ("<>", "empty address"),
        ("user", "missing @"),
        ('"user"', "missing @"),
        ("user@", "empty domain"),
        ("@example.com", "malformed source route"),
        ("user@@example.com", "more than one @"),
        ("a@b@example.com", "more than one @"),
        ('"a"@b@example.com', "more than one @"),
        ("user@example", "domain needs at least two labels"),
        ("user@example..com", "empty label in domain"),
        ("user@.example.com", "empty label in domain"),
        ("user@-example.com", "hyphen at start or end of domain label"),
        ("user@example-.com", "hyphen at start or end of domain label"),
        ("user@exa_mple.com", "character not allowed in domain"),
        ("user@exa mple.com", "character not allowed in domain"),
        ("user@1.2.3.4", "numeric top-level domain"),
        (".user@example.com", "dot at start or end of local part"),
        ("user.@example.com", "dot at start or end of local part"),
        ("us..er@example.com", "two dots in a row in local part"),
        ("us er@example.com", "space in local part"),
        ("us(er)@example.com", "character '(' not allowed in local part"),
        ("us,er@example.com", "character ',' not allowed in local part"),
        ("a%b@example.com", "percent hack in local part"),
        ("a!b@example.com", "bang path in local part"),
        ('"a%b"@example.com', "percent hack in quoted local part"),
        ('"a!b"@example.com', "bang path in quoted local part"),
        ('"a\\@b"@example.com', "@ in quoted local part"),
        ('""@example.com', "empty local part"),
        ('"abc@example.com', "unterminated quoted local part"),
        ('"abc\\"@example.com', "unterminated quoted local part"),
        ('"a"b@example.com', "text after quoted local part"),
        ("user\x00@example.com", "NUL in address"),
        ("user@example.com\r\nRCPT TO:<x@example.org>", "CR or LF in address"),
        ("user\n@example.com", "CR or LF in address"),
        ("us\ter@example.com", "control character in address"),
        ("us\x7fer@example.com", "control character in address"),
        ("us\x85er@example.com", "control character in address"),
        ('"us\x1ber"@example.com', "control character in address"),
        (" user@example.com", "whitespace around address"),
        ("user@example.com ", "whitespace around address"),
        ("\u00a0user@example.com", "whitespace around address"),
        ("<user@example.com", "unbalanced angle brackets"),
        ("user@example.com>", "unbalanced angle brackets"),
        ("<", "unbalanced angle brackets"),
        ("<<user@example.com>>", "character '<' not allowed in local part"),
        ("user@example.com<", "character not allowed in domain"),
        ("üser@example.com", "non-ASCII local part needs SMTPUTF8"),
        ("user@bücher.example", "non-ASCII domain needs SMTPUTF8"),
        ("us\ud800er@example.com", "invalid character in address"),
        ("@a.example", "malformed source route"),
        ("@a.example:", "source route without a mailbox"),
        ("@a.example,b.example:user@example.com", "malformed source route"),
        ("@a.example,:user@example.com", "malformed source route"),
        ("@,@a.example:user@example.com", "malformed source route"),
        (
            "@a_b.example:user@example.com",
            "malformed source route: character not allowed in domain",
        ),
        (f"@[{IP}]:user@example.com", "malformed source route: address literal not allowed"),
    ],
)
def test_bad_addresses(text: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox(text)
    assert str(info.value) == reason


def test_length_limits() -> None:
    local = "a" * MAX_LOCAL_OCTETS
    assert parse_mailbox(f"{local}@example.com").local == local
    _assert_refused(parse_mailbox, f"a{local}@example.com", reason="local part too long")
    # Octets, not characters: 32 two-octet characters fill the local part.
    assert parse_mailbox("é" * 32 + "@example.com", smtputf8=True).local == "é" * 32
    _assert_refused(
        parse_mailbox, "é" * 33 + "@example.com", smtputf8=True, reason="local part too long"
    )

    label = "b" * 63
    assert parse_mailbox(f"user@{label}.com").domain == f"{label}.com"
    _assert_refused(parse_mailbox, f"user@b{label}.com", reason="domain label too long")

    # 63*3 + 3 dots + 61 = 253 octets: the longest domain there can be, one octet too
    # long for any mailbox, since "u@" and 253 octets make 255.
    domain = ".".join([label, label, label, "c" * 61])
    assert len(domain) == MAX_DOMAIN_OCTETS
    _assert_refused(parse_mailbox, f"u@{domain}c", reason="domain too long")
    _assert_refused(parse_mailbox, f"u@{domain}", reason="address too long")
    longest = parse_mailbox(f"u@{domain[1:]}")
    assert len(str(longest)) == MAX_MAILBOX_OCTETS
    _assert_refused(parse_mailbox, "a" * 300 + "@example.com", reason="address too long")


def test_smtputf8_addresses() -> None:
    address = parse_mailbox("用户@例子.测试", smtputf8=True)
    assert address.local == "用户"
    assert address.domain == "xn--fsqu00a.xn--0zwm56d"
    assert parse_mailbox("user@BÜCHER.example", smtputf8=True).domain == "xn--bcher-kva.example"
    assert parse_mailbox('"jöhn doe"@example.com', smtputf8=True).local == '"jöhn doe"'
    _assert_refused(
        parse_mailbox,
        "user@a\u202eb.example",
        smtputf8=True,
        reason="domain label is not valid IDNA",
    )
    _assert_refused(
        parse_mailbox,
        "user@\u2603\u200d.example",
        smtputf8=True,
        reason="domain label is not valid IDNA",
    )
    # An ideographic full stop would become a dot inside one label.
    _assert_refused(
        parse_mailbox,
        "user@例子\u3002测试.example",
        smtputf8=True,
        reason="character not allowed in domain",
    )
    _assert_refused(
        parse_mailbox,
        "us\u202eer@example.com",
        smtputf8=True,
        reason="invalid character in local part",
    )
    _assert_refused(
        parse_mailbox,
        '"us\u200ber"@example.com',
        smtputf8=True,
        reason="invalid character in local part",
    )
    _assert_refused(
        parse_mailbox, '"jöhn"@example.com', reason="non-ASCII local part needs SMTPUTF8"
    )


def test_key_is_canonical() -> None:
    plain = parse_mailbox("User.Name@Example.COM")
    assert plain.key == "user.name@example.com"
    assert str(plain) == "User.Name@example.com"
    quoted = parse_mailbox('"User.Name"@example.com')
    assert str(quoted) == '"User.Name"@example.com'
    assert quoted.key == plain.key
    assert parse_mailbox('"us\\er"@example.com').key == "user@example.com"
    assert parse_mailbox('"John Doe"@example.com').key == '"john doe"@example.com'
    assert parse_mailbox('"a\\"b"@example.com').key == '"a\\"b"@example.com'
    assert parse_mailbox('"a..b"@example.com').key == '"a..b"@example.com'


def test_reverse_path() -> None:
    assert parse_reverse_path("") is None
    assert parse_reverse_path("<>") is None
    assert parse_reverse_path("<user@example.com>") == Address("user", "example.com")
    _assert_refused(parse_reverse_path, " ", reason="whitespace around address")
    _assert_refused(parse_reverse_path, "< >", reason="space in local part")
    _assert_refused(parse_reverse_path, f"antispam@[{IP}]", reason="address literal not allowed")


@pytest.mark.parametrize(
    ("domain", "pattern", "expected"),
    [
        ("example.com", "example.com", True),
        ("Example.COM", "example.com", True),
        ("example.com", "EXAMPLE.com", True),
        ("mail.example.com", "example.com", False),
        ("mail.example.com", ".example.com", True),
        ("a.b.example.com", ".EXAMPLE.COM", True),
        ("example.com", ".example.com", False),
        ("badexample.com", ".example.com", False),
        ("badexample.com", "example.com", False),
        ("example.com.evil.org", ".example.com", False),
        ("", "example.com", False),
        ("example.com", "", False),
        ("", "", False),
        ("example.com", ".", False),
        (".example.com", ".example.com", False),
    ],
)
def test_domain_matches(domain: str, pattern: str, expected: bool) -> None:
    assert domain_matches(domain, pattern) is expected


# Generators of valid dot-atom addresses, for the round-trip property.
_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$&'*+-/=?^_`{|}~"
_atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=12)
_locals = st.lists(_atoms, min_size=1, max_size=4).map(".".join)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_tlds = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domains = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_labels, min_size=1, max_size=4),
    _tlds,
)
_mailboxes = st.builds(lambda local, domain: f"{local}@{domain}", _locals, _domains)


@given(_mailboxes)
def test_round_trip_of_valid_dot_atoms(text: str) -> None:
    address = parse_mailbox(text)
    assert str(address) == text
    assert not address.had_route
    assert parse_mailbox(f"<{text}>") == address
    assert parse_mailbox(text, smtputf8=True) == address
    local, _, domain = text.partition("@")
    upper = parse_mailbox(f"{local}@{domain.upper()}")
    assert upper.key == address.key == f"{local.lower()}@{domain}"


def _assert_only_address_error(text: str) -> None:
    for smtputf8 in (False, True):
        for parse in (parse_mailbox, parse_reverse_path):
            try:
                result = parse(text, smtputf8=smtputf8)
            except AddressError:
                continue
            if result is not None:
                _assert_clean(result)


def _assert_clean(address: Address) -> None:
    text = str(address)
    assert "%" not in text
    assert "!" not in text
    assert not any(unicodedata.category(char) in ("Cc", "Cs") for char in text)
    assert address.domain.isascii()
    assert address.domain == address.domain.lower()


@given(st.text())
def test_arbitrary_text_raises_only_address_error(text: str) -> None:
    _assert_only_address_error(text)


@given(st.binary().map(lambda raw: raw.decode("latin-1")))
def test_arbitrary_bytes_raise_only_address_error(text: str) -> None:
    _assert_only_address_error(text)


@given(st.text(alphabet='ab.@%!"\\<>:,[] -\x00\r\n\x7f\x85ü例\u3002\u202e', max_size=40))
def test_address_shaped_text_raises_only_address_error(text: str) -> None:
    _assert_only_address_error(text)


@st.composite
def _mutated_mailboxes(draw: st.DrawFn) -> str:
    """A valid mailbox with one character of any kind put in somewhere."""
    text = draw(_mailboxes)
    position = draw(st.integers(min_value=0, max_value=len(text)))
    char = draw(st.characters() | st.sampled_from('%!"@.\\\x00\r\n\x7f\x85 '))
    return text[:position] + char + text[position:]


@given(_mutated_mailboxes())
def test_accepted_mutations_stay_clean(text: str) -> None:
    for smtputf8 in (False, True):
        try:
            address = parse_mailbox(text, smtputf8=smtputf8)
        except AddressError:
            continue
        _assert_clean(address)
