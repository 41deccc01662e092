"""DKIM signing, checked by verifiers this project did not write.

dkimpy's verifier fetches the public keys from a real DNS server on loopback; OpenDKIM's
``opendkim-testmsg`` fetches them through the C library's resolver, pointed (inside a
private mount namespace, where a copy of resolv.conf covers the real one) at a relay on
a loopback address, port 53, in front of the same DNS server.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import parse_tag_value
from hypothesis import given
from hypothesis import strategies as st

from gateway.dkim import (
    DkimError,
    DkimKey,
    DkimKeyError,
    DuplicateHeaderError,
    KeyFileExistsError,
    KeyTooSmallError,
    Signer,
    SignOptions,
    author_domain,
    dns_txt_chunks,
    generate_key,
    load_key,
    public_txt_record,
    with_header_separator,
    write_private_key,
)
from tests.helpers.dnsserver import ZoneServer, txt_lookup

DOMAIN = "example.com"
RSA_SELECTOR = "rsa2026"
ED_SELECTOR = "ed2026"
OTHER_DOMAIN = "other.example"
OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"

MESSAGE = (
    b"Received: from client.example.com by gw.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b'From: "Alice Example" <alice@example.com>\r\n'
    b"To: bob@example.org,\r\n carol@example.net\r\n"
    b"Subject: Quarterly\r\n  figures\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n\r\nthe figures are attached.\r\n\r\n\r\n"
)


@dataclass(frozen=True)
class KeyPair:
    key: DkimKey
    txt: str


def _key(algorithm: Literal["rsa", "ed25519"], selector: str, domain: str = DOMAIN) -> KeyPair:
    pem, txt = generate_key(algorithm)
    name: Literal["rsa-sha256", "ed25519-sha256"] = (
        "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    )
    return KeyPair(DkimKey(domain, selector, name, pem), txt)


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return _key("rsa", RSA_SELECTOR)


@pytest.fixture(scope="module")
def ed_pair() -> KeyPair:
    return _key("ed25519", ED_SELECTOR)


@pytest.fixture(scope="module")
def other_pair() -> KeyPair:
    return _key("ed25519", "s1", OTHER_DOMAIN)


@pytest.fixture(scope="module")
def zone(rsa_pair: KeyPair, ed_pair: KeyPair, other_pair: KeyPair) -> Iterator[ZoneServer]:
    records = [
        (f"{p.key.selector}._domainkey.{p.key.domain}", "TXT", p.txt)
        for p in (rsa_pair, ed_pair, other_pair)
    ]
    with ZoneServer(records) as server:
        yield server


DnsFunc = Callable[..., bytes | None]


@pytest.fixture(scope="module")
def dnsfunc(zone: ZoneServer) -> DnsFunc:
    return txt_lookup(zone)


@dataclass(frozen=True)
class FixedClock:
    """A clock that always says ``now``."""

    now: float

    def __call__(self) -> float:
        return self.now


def signature_count(message: bytes) -> int:
    headers, _ = dkim.rfc822_parse(message)
    return sum(1 for name, _ in headers if name.lower() == b"dkim-signature")


def verify_all(message: bytes, lookup: DnsFunc) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of ``message``, top to bottom."""
    results = []
    for idx in range(signature_count(message)):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=lookup)))
        except dkim.DKIMException:
            results.append(False)
    return results


def tags(message: bytes, idx: int = 0) -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(message)
    sigs = [value for name, value in headers if name.lower() == b"dkim-signature"]
    parsed: dict[bytes, bytes] = parse_tag_value(sigs[idx])
    return parsed


# -- the two verifiers ---------------------------------------------------------------------


def test_dual_signature_verifies_with_dkimpy(
    rsa_pair: KeyPair, ed_pair: KeyPair, dnsfunc: DnsFunc, zone: ZoneServer
) -> None:
    signed = Signer([rsa_pair.key, ed_pair.key]).sign(MESSAGE)
    assert signed.endswith(MESSAGE)
    assert verify_all(signed, dnsfunc) == [True, True]
    assert [tags(signed, i)[b"a"] for i in range(2)] == [b"rsa-sha256", b"ed25519-sha256"]
    assert {q[1] for q in zone.queries} >= {
        f"{RSA_SELECTOR}._domainkey.{DOMAIN}.",
        f"{ED_SELECTOR}._domainkey.{DOMAIN}.",
    }
    first = tags(signed)
    assert first[b"c"] == b"relaxed/relaxed"
    assert b"l" not in first
    signed_names = [h.strip() for h in first[b"h"].split(b":")]
    assert signed_names == [
        b"from", b"from", b"date", b"date", b"message-id", b"message-id",
        b"subject", b"subject", b"to", b"to", b"mime-version", b"mime-version",
        b"content-type", b"content-type",
    ]  # fmt: skip


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_matches_dkimpy_signer_byte_for_byte(
    algorithm: str, rsa_pair: KeyPair, ed_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    pair = rsa_pair if algorithm == "rsa" else ed_pair
    private = serialization.load_pem_private_key(pair.key.private_pem, password=None)
    if isinstance(private, rsa.RSAPrivateKey):
        # dkimpy reads PKCS#1 ("BEGIN RSA PRIVATE KEY") only.
        dkimpy_key = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        dkimpy_key = base64.b64encode(raw)
    ours_unpinned = Signer([pair.key]).sign(MESSAGE)
    include = [h.strip() for h in tags(ours_unpinned)[b"h"].split(b":")]
    reference = dkim.sign(
        MESSAGE,
        pair.key.selector.encode(),
        DOMAIN.encode(),
        dkimpy_key,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=pair.key.algorithm.encode(),
        include_headers=include,
    )
    stamp = int(parse_tag_value(reference.split(b":", 1)[1])[b"t"])
    ours = Signer([pair.key], clock=lambda: float(stamp)).sign(MESSAGE)
    assert ours == reference + MESSAGE
    assert verify_all(ours, dnsfunc) == [True]


def test_fast_rsa_signature_is_the_pkcs1_signature_dkimpy_computes(
    rsa_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    # Independent of the test above: dkimpy's own verifier checks the fast path's
    # signature with its own big-integer RSA, for several messages and timestamps.
    for offset in range(3):
        message = MESSAGE.replace(b"Quarterly", b"Quarterly %d" % offset)
        signer = Signer([rsa_pair.key], clock=FixedClock(1_700_000_000.0 + offset))
        signed = signer.sign(message)
        assert tags(signed)[b"t"] == str(1_700_000_000 + offset).encode()
        assert verify_all(signed, dnsfunc) == [True]


# -- OpenDKIM ------------------------------------------------------------------------------


class _UdpRelay:
    """Forwards DNS datagrams from ``address`` (port 53) to the zone server."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rng = random.Random()
        for _ in range(20):
            ip = f"127.{rng.randint(10, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            try:
                self._sock.bind((ip, 53))
                break
            except PermissionError:
                self._sock.close()
                raise
            except OSError:
                continue
        else:
            self._sock.close()
            raise OSError("no free loopback address for port 53")
        self.ip = ip
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    query, peer = self._sock.recvfrom(65535)
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                        up.settimeout(5)
                        up.sendto(query, self._upstream)
                        reply, _ = up.recvfrom(65535)
                    self._sock.sendto(reply, peer)

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()


def _opendkim_unavailable() -> str | None:
    if not os.path.exists(OPENDKIM_TESTMSG):
        return f"{OPENDKIM_TESTMSG} is absent (Debian package opendkim-tools)"
    if shutil.which("unshare") is None:
        return "unshare(1) is absent; needed to give opendkim-testmsg its own resolv.conf"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "user and mount namespaces are not available (unshare -rm failed)"
    return None


@pytest.fixture(scope="module")
def opendkim(zone: ZoneServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A resolv.conf pointing at a port-53 relay in front of the zone server."""
    reason = _opendkim_unavailable()
    if reason is not None:
        pytest.skip(reason)
    assert zone.address is not None
    try:
        relay = _UdpRelay(zone.address)
    except PermissionError:
        pytest.skip("binding port 53 on loopback is not permitted here")
    resolv = tmp_path_factory.mktemp("opendkim") / "resolv.conf"
    resolv.write_text(f"nameserver {relay.ip}\noptions timeout:3 attempts:2\n")
    yield resolv
    relay.close()


def opendkim_verify(resolv: Path, message: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run opendkim-testmsg in verify mode with ``resolv`` as /etc/resolv.conf."""
    script = 'mount --bind "$1" /etc/resolv.conf && exec "$2"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(resolv), OPENDKIM_TESTMSG],
        input=message,
        capture_output=True,
        timeout=60,
        check=False,
    )


OPENDKIM_SAMPLE = (
    "cpython/msg_35.txt",
    "mail-mime-parser/m0006.txt",
    "mail-mime-parser/m3006.txt",
    "mime4j/russian-headers.msg",
    "ruby-mail/japanese_shift_jis.eml",
    "ruby-mail/utf8_headers.eml",
)


@pytest.mark.opendkim
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_verifies_and_detects_changes(
    algorithm: str, rsa_pair: KeyPair, ed_pair: KeyPair, opendkim: Path
) -> None:
    # This OpenDKIM build (2.11.0~beta2) verifies ed25519-sha256 too, so both run.
    pair = rsa_pair if algorithm == "rsa-sha256" else ed_pair
    signed = Signer([pair.key]).sign(MESSAGE)
    good = opendkim_verify(opendkim, signed)
    assert good.returncode == 0, good.stderr
    tampered = signed.replace(b"the figures", b"the Figures")
    bad = opendkim_verify(opendkim, tampered)
    assert bad.returncode != 0
    assert b"bad signature" in bad.stderr.lower()
    unsigned = opendkim_verify(opendkim, MESSAGE)
    assert unsigned.returncode != 0
    assert b"no signature" in unsigned.stderr.lower()


@pytest.mark.opendkim
@pytest.mark.parametrize("name", OPENDKIM_SAMPLE)
def test_opendkim_verifies_corpus_sample(
    name: str, corpus: Path, rsa_pair: KeyPair, ed_pair: KeyPair, opendkim: Path
) -> None:
    message = corpus_message(corpus / name)
    if not re.search(rb"(?im)^date:", message.split(b"\r\n\r\n", 1)[0]):
        # libopendkim refuses a header block without Date ("Syntax error") before it
        # looks at any signature; that is about the message, not the signature.
        message = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + message
    for pair in (rsa_pair, ed_pair):
        signed = Signer([pair.key], SignOptions(refuse_duplicates=False)).sign(message)
        assert signature_count(signed) == 1
        result = opendkim_verify(opendkim, signed)
        assert result.returncode == 0, (pair.key.algorithm, result.stderr)


# -- the corpus ----------------------------------------------------------------------------


def _corpus_dir() -> Path | None:
    env = os.environ.get("ATTACHGATE_CORPUS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus"
    return path if path.is_dir() else None


def _corpus_files() -> list[str]:
    root = _corpus_dir()
    if root is None:
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.glob("*/*")
        if p.is_file() and p.name not in ("LICENSE", "README.md")
    )


@pytest.fixture(scope="module")
def corpus() -> Path:
    root = _corpus_dir()
    if root is None:
        pytest.skip("message corpus not found (set ATTACHGATE_CORPUS or ../shared/corpus)")
    return root


_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def corpus_message(path: Path, sender: bytes = b"Corpus Sender <sender@example.com>") -> bytes:
    """The file, CRLF-normalised, with every From field replaced by one in the signing domain."""
    data = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
    lines = data.split(b"\r\n")
    kept: list[bytes] = []
    in_from = False
    for k, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and k > 0:
            if not in_from:
                kept.append(line)
            continue
        if not _FIELD.match(line):
            kept.extend(lines[k:])
            break
        in_from = line.lower().startswith(b"from:")
        if not in_from:
            kept.append(line)
    return b"From: " + sender + b"\r\n" + b"\r\n".join(kept)


@pytest.mark.parametrize("name", _corpus_files() or ["(corpus absent)"])
def test_corpus_message_signs_and_verifies(
    name: str, corpus: Path, rsa_pair: KeyPair, ed_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    message = corpus_message(corpus / name)
    signer = Signer([rsa_pair.key, ed_pair.key], SignOptions(refuse_duplicates=False))
    signed = signer.sign(message)
    assert signature_count(signed) == signature_count(with_header_separator(message)) + 2
    assert verify_all(signed, dnsfunc)[:2] == [True, True]
    assert signed.endswith(with_header_separator(message))


def test_header_block_without_separator_is_repaired() -> None:
    broken = b"From: a@example.com\r\nSubject: x\r\nnot a field\r\nmore\r\n"
    assert with_header_separator(broken) == (
        b"From: a@example.com\r\nSubject: x\r\n\r\nnot a field\r\nmore\r\n"
    )
    fine = b"From: a@example.com\r\n folded\r\n\r\nbody: text\r\n"
    assert with_header_separator(fine) == fine


# -- changes after signing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "change"),
    [
        ("one body byte", lambda m: m.replace(b"attached", b"attacked")),
        ("a signed header", lambda m: m.replace(b"Subject: Quarterly", b"Subject: Quarterlx")),
        ("a second From above", lambda m: b"From: mallory@evil.example\r\n" + m),
        (
            "a second From below",
            lambda m: m.replace(b"\r\n\r\n", b"\r\nFrom: mallory@evil.example\r\n\r\n", 1),
        ),
        ("a second Subject above", lambda m: b"Subject: urgent\r\n" + m),
        ("an unsigned header", lambda m: m.replace(b"\r\n\r\n", b"\r\nX-A: b\r\n\r\n", 1)),
    ],
)
def test_change_after_signing_fails_verification(
    label: str,
    change: Callable[[bytes], bytes],
    rsa_pair: KeyPair,
    ed_pair: KeyPair,
    dnsfunc: DnsFunc,
) -> None:
    signed = Signer([rsa_pair.key, ed_pair.key]).sign(MESSAGE)
    assert verify_all(signed, dnsfunc) == [True, True]
    changed = change(signed)
    assert changed != signed
    if label == "an unsigned header":
        # An unsigned header may be added: the signature still holds.
        assert verify_all(changed, dnsfunc) == [True, True]
    else:
        assert verify_all(changed, dnsfunc) == [False, False], label


def test_oversigning_is_what_stops_an_added_subject(rsa_pair: KeyPair, dnsfunc: DnsFunc) -> None:
    plain = Signer([rsa_pair.key], SignOptions(oversign=False)).sign(MESSAGE)
    assert verify_all(b"Subject: urgent\r\n" + plain, dnsfunc) == [True]
    over = Signer([rsa_pair.key], SignOptions(oversign=True)).sign(MESSAGE)
    assert verify_all(b"Subject: urgent\r\n" + over, dnsfunc) == [False]


# -- which messages get signed -------------------------------------------------------------


def _with_from(value: bytes) -> bytes:
    return MESSAGE.replace(b'From: "Alice Example" <alice@example.com>', b"From: " + value)


@pytest.mark.parametrize(
    "value",
    [
        b"bob@a.example.com",
        b"bob@example.org",
        b"alice@example.com, bob@example.com",
        b"undisclosed: alice@example.com;",
        b"",
        b"<>",
        b"alice@[192.0.2.1]",
    ],
)
def test_no_signature_unless_one_address_of_a_keyed_domain(value: bytes, rsa_pair: KeyPair) -> None:
    message = _with_from(value)
    assert Signer([rsa_pair.key]).sign(message) == message


def test_no_from_field_leaves_message_unchanged(rsa_pair: KeyPair) -> None:
    message = re.sub(rb"From: [^\r]*\r\n", b"", MESSAGE)
    assert b"From:" not in message
    assert Signer([rsa_pair.key]).sign(message) == message


def test_subdomain_signed_only_with_its_own_key(other_pair: KeyPair) -> None:
    sub = DkimKey("a.example.com", "s1", "ed25519-sha256", other_pair.key.private_pem)
    message = _with_from(b"<bob@A.Example.COM>")
    signed = Signer([sub, other_pair.key]).sign(message)
    assert signature_count(signed) == 1
    assert tags(signed)[b"d"] == b"a.example.com"


def test_signs_only_with_keys_of_the_author_domain(
    rsa_pair: KeyPair, other_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    signer = Signer([rsa_pair.key, other_pair.key])
    assert signer.domains() == {DOMAIN, OTHER_DOMAIN}
    signed = signer.sign(_with_from(b"Someone <someone@other.example>"))
    assert signature_count(signed) == 1
    assert tags(signed)[b"d"] == OTHER_DOMAIN.encode()
    assert verify_all(signed, dnsfunc) == [True]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"alice@example.com", "example.com"),
        (b"Alice <alice@Example.COM>", "example.com"),
        (b'"Example, Alice" <alice@example.com>', "example.com"),
        (b'"a@evil.example" <alice@example.com>', "example.com"),
        (b"=?utf-8?q?Al=C3=AFce?= <alice@example.com>", "example.com"),
        (b"=?utf-8?b?QWxpY2UgPGV2aWxAZXZpbC5leGFtcGxlPg==?= <alice@example.com>", "example.com"),
        (b"alice@example.com (Alice (the boss))", "example.com"),
        (b"(comment) Alice\r\n <alice@example.com>", "example.com"),
        (b'"odd@local"@example.com', "example.com"),
        (b"<@relay.example:alice@example.com>", "example.com"),
        ("Jörg <j@bücher.example>".encode(), "xn--bcher-kva.example"),
        (b"alice@example.com, bob@example.com", None),
        (b"Alice <alice@example.com> <bob@example.com>", None),
        (b"group: alice@example.com;", None),
        (b"alice@evil.example@example.com", None),
        (b"Alice <alice@example.com", None),
        (b"alice@example.com (unclosed", None),
        (b"alice", None),
        (b"alice@localhost", None),
        (b"alice@-bad-.example", None),
        (b"a@b <alice@example.com>", None),
    ],
)
def test_author_domain(value: bytes, expected: str | None) -> None:
    assert author_domain(value) == expected


@given(st.text(max_size=60))
def test_author_domain_never_raises(text: str) -> None:
    result = author_domain(text.encode("utf-8", "surrogatepass"))
    assert result is None or (result == result.lower() and "." in result)


# -- duplicates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "line"),
    [
        ("From", b"From: alice@example.com\r\n"),
        ("Subject", b"Subject: again\r\n"),
        ("Date", b"Date: Tue, 2 Jan 2024 00:00:00 +0000\r\n"),
        ("Message-ID", b"Message-ID: <5678@example.com>\r\n"),
    ],
)
def test_duplicate_headers_refused_or_signed(
    header: str, line: bytes, rsa_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    message = MESSAGE.replace(b"X-Mailer: test\r\n", b"X-Mailer: test\r\n" + line)
    with pytest.raises(DuplicateHeaderError) as caught:
        Signer([rsa_pair.key]).sign(message)
    assert header in str(caught.value)
    assert caught.value.header == header
    assert isinstance(caught.value, DkimError)
    signed = Signer([rsa_pair.key], SignOptions(refuse_duplicates=False)).sign(message)
    assert verify_all(signed, dnsfunc) == [True]
    names = [h.strip().decode() for h in tags(signed)[b"h"].split(b":")]
    assert names.count(header.lower()) == 3  # both instances and the oversigned one


def test_duplicates_of_unsigned_domain_pass_unchanged(other_pair: KeyPair) -> None:
    message = b"Subject: one\r\n" + MESSAGE
    assert Signer([other_pair.key]).sign(message) == message


def test_leading_continuation_line_means_no_header_block(rsa_pair: KeyPair) -> None:
    message = b" leading continuation\r\nFrom: a@example.com\r\n\r\nx"
    assert with_header_separator(message) == b"\r\n" + message
    assert Signer([rsa_pair.key]).sign(message) == message


# -- expiry and clock ----------------------------------------------------------------------


def test_expiry_tag_from_the_clock(rsa_pair: KeyPair, dnsfunc: DnsFunc) -> None:
    now = time.time()
    fresh = Signer([rsa_pair.key], SignOptions(expire_after=3600), clock=lambda: now)
    signed = fresh.sign(MESSAGE)
    assert int(tags(signed)[b"x"]) == int(now) + 3600
    assert verify_all(signed, dnsfunc) == [True]
    past = Signer([rsa_pair.key], SignOptions(expire_after=60), clock=lambda: now - 2 * 86400)
    # dkimpy allows ten hours of clock skew past x=; two days is beyond it.
    assert verify_all(past.sign(MESSAGE), dnsfunc) == [False]
    assert b"x" not in tags(Signer([rsa_pair.key]).sign(MESSAGE))
    with pytest.raises(ValueError, match="expire_after"):
        SignOptions(expire_after=0)


def test_sign_is_thread_safe(rsa_pair: KeyPair, ed_pair: KeyPair, dnsfunc: DnsFunc) -> None:
    signer = Signer([rsa_pair.key, ed_pair.key], clock=lambda: 1_700_000_000.0)
    messages = [MESSAGE.replace(b"Quarterly", b"Q%d" % i) for i in range(24)]
    expected = [signer.sign(m) for m in messages]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(signer.sign, messages * 4))
    assert results == expected * 4
    assert verify_all(results[5], dnsfunc) == [True, True]


# -- keys ----------------------------------------------------------------------------------


def _small_rsa_pem(bits: int = 512) -> bytes:
    """An RSA key below the minimum; cryptography will not generate one, so build it."""
    rng = random.Random(bits)

    def is_probable_prime(n: int) -> bool:
        if n % 2 == 0:
            return False
        d, r = n - 1, 0
        while d % 2 == 0:
            d, r = d // 2, r + 1
        for _ in range(32):
            x = pow(rng.randrange(2, n - 1), d, n)
            if x in (1, n - 1):
                continue
            for _ in range(r - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                return False
        return True

    def prime(size: int) -> int:
        while True:
            candidate = rng.getrandbits(size) | (1 << (size - 1)) | (1 << (size - 2)) | 1
            if candidate % 65537 != 1 and is_probable_prime(candidate):
                return candidate

    p, q = prime(bits // 2), prime(bits // 2)
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def test_small_rsa_key_refused(tmp_path: Path) -> None:
    pem = _small_rsa_pem()
    assert serialization.load_pem_private_key(pem, None).key_size == 512  # type: ignore[union-attr]
    path = tmp_path / "small.key"
    write_private_key(path, pem)
    with pytest.raises(KeyTooSmallError, match=re.escape(str(path))):
        load_key(DOMAIN, "s1", path)
    with pytest.raises(KeyTooSmallError):
        Signer([DkimKey(DOMAIN, "s1", "rsa-sha256", pem)])


@pytest.mark.parametrize("form", ["pkcs1", "pkcs8", "ed25519-pem", "ed25519-seed"])
def test_load_key_formats(
    form: str, tmp_path: Path, rsa_pair: KeyPair, ed_pair: KeyPair, dnsfunc: DnsFunc
) -> None:
    pair = rsa_pair if form.startswith("pkcs") else ed_pair
    private = serialization.load_pem_private_key(pair.key.private_pem, None)
    if form == "pkcs1":
        data = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    elif form == "ed25519-seed":
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        data = base64.b64encode(raw) + b"\n"
    else:
        data = pair.key.private_pem
    path = tmp_path / "k.key"
    write_private_key(path, data)
    key, warnings = load_key(DOMAIN.upper(), pair.key.selector, path)
    assert warnings == []
    assert key == pair.key
    assert verify_all(Signer([key]).sign(MESSAGE), dnsfunc) == [True]


def test_load_key_rejects_garbage_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DkimKeyError, match=re.escape(str(path))):
        load_key(DOMAIN, "s1", path)
    with pytest.raises(DkimKeyError, match="cannot read"):
        load_key(DOMAIN, "s1", tmp_path / "missing.key")
    with pytest.raises(DkimKeyError, match="selector"):
        DkimKey(DOMAIN, "bad selector", "rsa-sha256", b"")


def test_key_algorithm_must_match(rsa_pair: KeyPair) -> None:
    wrong = DkimKey(DOMAIN, "s1", "ed25519-sha256", rsa_pair.key.private_pem)
    with pytest.raises(DkimKeyError, match="not an ed25519-sha256 key"):
        Signer([wrong])


def test_loose_file_mode_warned(tmp_path: Path, ed_pair: KeyPair) -> None:
    path = tmp_path / "loose.key"
    path.write_bytes(ed_pair.key.private_pem)
    path.chmod(0o644)
    _, warnings = load_key(DOMAIN, ED_SELECTOR, path)
    assert warnings == [f"key file {path} is readable by others (mode 0644); chmod 600"]
    path.chmod(0o640)
    _, warnings = load_key(DOMAIN, ED_SELECTOR, path)
    assert warnings == [f"key file {path} is readable by its group (mode 0640); chmod 600"]


def test_write_private_key_mode_and_no_overwrite(tmp_path: Path) -> None:
    pem, _ = generate_key("ed25519")
    path = tmp_path / "new.key"
    old_umask = os.umask(0)
    try:
        write_private_key(path, pem)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == pem
    with pytest.raises(KeyFileExistsError) as caught:
        write_private_key(path, b"other")
    assert isinstance(caught.value, FileExistsError)
    assert path.read_bytes() == pem


@pytest.mark.parametrize(("algorithm", "bits"), [("rsa", 2048), ("ed25519", 0)])
def test_generated_key_published_in_chunks_verifies(
    algorithm: Literal["rsa", "ed25519"], bits: int, tmp_path: Path
) -> None:
    pem, record = generate_key(algorithm, bits or 2048)
    assert record == public_txt_record(pem)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    chunks = dns_txt_chunks(record)
    assert "".join(chunks) == record
    assert all(0 < len(c.encode()) <= 255 for c in chunks)
    if algorithm == "rsa":
        assert len(chunks) >= 2
    zone_text = " ".join(f'"{c}"' for c in chunks)
    name: Literal["rsa-sha256", "ed25519-sha256"] = (
        "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    )
    key = DkimKey(DOMAIN, "gen", name, pem)
    with ZoneServer([(f"gen._domainkey.{DOMAIN}", "TXT", zone_text)]) as server:
        assert verify_all(Signer([key]).sign(MESSAGE), txt_lookup(server)) == [True]
    with pytest.raises(ValueError, match="1024"):
        generate_key("rsa", 768)


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=2000))
def test_dns_txt_chunks_round_trip(value: str) -> None:
    chunks = dns_txt_chunks(value)
    assert "".join(chunks) == value
    assert all(len(c) <= 255 for c in chunks)
    assert all(chunks) or chunks == [""]
