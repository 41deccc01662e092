"""to_7bit(): 8-bit bodies re-encoded for a next hop without 8BITMIME."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mime import MimeError, MimeLimits
from gateway.mime.downgrade import DowngradeError, to_7bit
from gateway.mime.scan import Entity, scan_message
from tests.gateway.mime.build import TOP, attachment, entity, message, multipart
from tests.gateway.mime.checks import email_leaves, email_payload, parse
from tests.gateway.mime.conftest import corpus_files, load

CTE = "content-transfer-encoding"


def is_7bit(data: bytes) -> bool:
    return data.isascii() and b"\x00" not in data


def leaf_payloads(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded payload) of every leaf, as the email package sees them."""
    return [(p.get_content_type(), email_payload(p)) for p in email_leaves(parse(raw))]


def modern(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def scan(raw: bytes) -> Entity:
    return scan_message(raw, max_depth=20, max_parts=1000, max_header_size=1 << 20, nested=True)


def field_bytes(raw: bytes, ent: Entity, drop: set[str]) -> list[bytes]:
    return [raw[f.start : f.end] for f in ent.headers.fields if f.name not in drop]


def check_structure(raw: bytes, out: bytes) -> None:
    """Same tree; parts without 8-bit bytes are byte-identical; converted parts
    differ in their body and Content-Transfer-Encoding field only (the top may
    also gain MIME-Version and Content-Type)."""
    before, after = list(scan(raw).walk()), list(scan(out).walk())
    assert [e.content_type for e in before] == [e.content_type for e in after]
    for a, b in zip(before, after, strict=True):
        old, new = raw[a.start : a.end], out[b.start : b.end]
        if is_7bit(old):
            assert old == new
            continue
        drop = {CTE}
        if a.parent is None or (a.parent.content_type == "message/rfc822"):
            drop |= {n for n in ("mime-version", "content-type") if a.field(n) is None}
        assert field_bytes(raw, a, {CTE}) == field_bytes(out, b, drop)
        if b.is_multipart:
            assert len(a.children) == len(b.children)
        elif b.content_type != "message/rfc822":
            assert b.cte in ("quoted-printable", "base64")
        for line in out[b.body_start : b.end].split(b"\r\n"):
            assert len(line) <= 998


def downgrade(raw: bytes) -> bytes:
    """to_7bit() with the checks every successful conversion must pass."""
    out = to_7bit(raw)
    assert is_7bit(out)
    assert leaf_payloads(out) == leaf_payloads(raw)
    check_structure(raw, out)
    return out


def encoded_lines_fit(out: bytes) -> bool:
    return all(len(line) <= 76 for line in out.split(b"\r\n\r\n", 1)[1].split(b"\r\n"))


# ---------------------------------------------------------------- basics


def test_seven_bit_message_is_returned_as_the_same_object() -> None:
    raw = message(attachment(b"\x00\xff" * 100), entity(["Content-Type: text/plain"], b"hi\r\n"))
    assert to_7bit(raw) is raw


def test_nul_counts_as_8bit() -> None:
    raw = entity([*TOP, "Content-Type: text/plain; charset=us-ascii"], b"a\x00b\r\n")
    out = downgrade(raw)
    assert b"a=00b" in out


def test_utf8_text_plain_8bit_becomes_quoted_printable() -> None:
    text = (
        "Grüße aus Köln – 漢字 😀\r\n"
        "From here on a line that starts with From\r\n"
        "trailing spaces   \r\n"
        "--looks-like-a-delimiter but is not\r\n" + "é" * 120 + "\r\n= signs = and\ttabs\t\r\n"
    )
    headers = [*TOP, "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    raw = entity(headers, text.encode())
    out = downgrade(raw)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head == raw.partition(b"\r\n\r\n")[0].replace(
        b"Transfer-Encoding: 8bit", b"Transfer-Encoding: quoted-printable"
    )
    assert encoded_lines_fit(out)
    assert b"\r\nFrom " not in body
    msg = modern(out)
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content() == text


@pytest.mark.parametrize("cte", ["8bit", "binary"])
def test_binary_octet_stream_becomes_base64(cte: str) -> None:
    data = bytes(range(256)) * 5 + b"\r\n--outer-b\r\n\r\r\n\n"
    part = entity(
        [
            'Content-Type: application/octet-stream; name="blob.bin"',
            f"Content-Transfer-Encoding: {cte}",
            'Content-Disposition: attachment; filename="blob.bin"',
        ],
        data,
    )
    text = entity(["Content-Type: text/plain"], b"see the file\r\n")
    raw = message(text, part, boundary="=_x")
    out = downgrade(raw)
    assert encoded_lines_fit(out)
    msg = modern(out)
    blob = next(p for p in msg.walk() if p.get_content_type() == "application/octet-stream")
    assert blob["Content-Transfer-Encoding"] == "base64"
    assert blob.get_content() == data
    assert text in out


def test_missing_transfer_encoding_field_is_added() -> None:
    part = entity(["Content-Type: image/png"], b"\x89PNG\r\n\x1a\n\x00\x00")
    out = downgrade(message(part))
    assert b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" in out


def test_transfer_encoding_name_kept_and_repeats_dropped() -> None:
    part = entity(
        [
            "Content-Type: text/plain; charset=latin1",
            "content-transfer-encoding: 8bit",
            "X-Other: kept",
            "Content-Transfer-Encoding: 8BIT",
        ],
        "café\r\n".encode("latin-1"),
    )
    out = downgrade(message(part))
    assert b"content-transfer-encoding: quoted-printable\r\nX-Other: kept\r\n\r\ncaf=E9" in out


def test_multipart_alternative_with_8bit_text_and_html() -> None:
    plain = entity(
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
        "Grüße\r\nÄÖÜ\r\n".encode(),
    )
    html = entity(
        ["Content-Type: text/html; charset=iso-8859-1", "Content-Transfer-Encoding: 8bit"],
        "<html><body><p>Grüße</p></body></html>\r\n".encode("latin-1"),
    )
    pdf = attachment(b"%PDF-1.4 " * 50)
    alt = multipart("alternative", "alt-b", [plain, html])
    raw = message(alt, pdf)
    out = downgrade(raw)
    assert pdf in out
    parts = {p.get_content_type(): p for p in modern(out).walk()}
    assert parts["text/plain"].get_content() == "Grüße\r\nÄÖÜ\r\n"
    assert parts["text/html"].get_content_charset() == "iso-8859-1"
    assert "<p>Grüße</p>" in parts["text/html"].get_content()
    for kind in ("text/plain", "text/html"):
        assert parts[kind]["Content-Transfer-Encoding"] == "quoted-printable"


def test_nested_message_rfc822_is_converted_inside() -> None:
    inner_text = entity(
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
        "weitergeleitet: Grüße\r\n".encode(),
    )
    inner_bin = entity(["Content-Type: application/zip"], b"PK\x03\x04\xff\x00\x10")
    inner = multipart(
        "mixed",
        "inner-b",
        [inner_text, inner_bin],
        headers=["From: c@example.net", "Subject: fwd", "MIME-Version: 1.0"],
    )
    forwarded = entity(["Content-Type: message/rfc822", "Content-Transfer-Encoding: 8bit"], inner)
    ascii_fwd = entity(["Content-Type: message/rfc822"], entity(["Subject: plain"], b"hi\r\n"))
    top_text = entity(["Content-Type: text/plain"], b"see below\r\n")
    raw = message(top_text, forwarded, ascii_fwd)
    out = downgrade(raw)
    assert ascii_fwd in out
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n" in out
    assert b"From: c@example.net\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n" in out
    leaves = {p.get_content_type(): p for p in modern(out).walk()}
    assert leaves["application/zip"].get_content() == b"PK\x03\x04\xff\x00\x10"
    texts = [p for p in modern(out).walk() if p["Content-Transfer-Encoding"] == "quoted-printable"]
    assert [p.get_content() for p in texts] == ["weitergeleitet: Grüße\r\n"]


def test_non_mime_forwarded_message_gains_mime_headers() -> None:
    inner = entity(["From: c@example.net", "Subject: old"], "Grüße\r\n".encode())
    raw = message(entity(["Content-Type: message/rfc822"], inner))
    out = downgrade(raw)
    assert (
        b"Subject: old\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n" in out
    )


@pytest.mark.parametrize(
    ("encoding", "charset"), [("utf-8", b"utf-8"), ("latin-1", b"unknown-8bit")]
)
def test_non_mime_8bit_body(encoding: str, charset: bytes) -> None:
    text = "Grüße aus Köln\r\nÄrger über Öl\r\n"
    raw = entity(["From: a@example.com", "To: b@example.org", "Subject: hi"], text.encode(encoding))
    out = downgrade(raw)
    head = out.partition(b"\r\n\r\n")[0]
    assert head.endswith(
        b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset="
        + charset
        + b"\r\nContent-Transfer-Encoding: quoted-printable"
    )
    msg = parse(out)
    assert email_payload(msg) == text.encode(encoding)
    if encoding == "utf-8":
        assert modern(out).get_content() == text


def test_non_mime_with_content_type_keeps_it() -> None:
    raw = entity(
        ["Subject: hi", "Content-Type: text/plain; charset=iso-8859-1"], "Öl\r\n".encode("latin-1")
    )
    out = downgrade(raw)
    assert out.startswith(
        b"Subject: hi\r\nContent-Type: text/plain; charset=iso-8859-1\r\nMIME-Version: 1.0\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=D6l\r\n"
    )


@pytest.mark.parametrize("cte", ["7bit", "quoted-printable", "base64"])
def test_mislabelled_8bit_body_is_treated_as_8bit(cte: str) -> None:
    body = "Grüße =3D\r\n".encode()
    part = entity(
        ["Content-Type: text/plain; charset=utf-8", f"Content-Transfer-Encoding: {cte}"], body
    )
    out = to_7bit(message(part))
    assert is_7bit(out)
    leaf = email_leaves(parse(out))[0]
    assert leaf["Content-Transfer-Encoding"] == "quoted-printable"
    assert email_payload(leaf) == body


def test_bare_cr_and_lf_in_text_survive() -> None:
    body = "line one\nstill one\rä\r\n\n".encode()
    part = entity(["Content-Type: text/plain; charset=utf-8"], body)
    out = to_7bit(message(part))
    assert is_7bit(out)
    assert encoded_lines_fit(out)
    assert email_payload(email_leaves(parse(out))[0]) == body


def test_quoted_printable_that_would_hit_a_boundary_becomes_base64() -> None:
    line = "é" + "x" * 69 + "--outer-b and more"  # the soft break puts the dashes first
    part = entity(["Content-Type: text/plain; charset=utf-8"], line.encode())
    raw = message(part)
    out = downgrade(raw)
    leaf = email_leaves(parse(out))[0]
    assert leaf["Content-Transfer-Encoding"] == "base64"


def test_utf16_text_becomes_base64() -> None:
    body = "Grüße\r\n".encode("utf-16")
    part = entity(["Content-Type: text/plain; charset=utf-16"], body)
    out = downgrade(message(part))
    assert email_leaves(parse(out))[0]["Content-Transfer-Encoding"] == "base64"


def test_top_level_base64_body_ends_with_crlf() -> None:
    raw = entity([*TOP, "Content-Type: application/octet-stream"], b"\xff" * 100)
    out = downgrade(raw)
    assert out.endswith(b"\r\n")
    assert base64.b64decode(out.partition(b"\r\n\r\n")[2]) == b"\xff" * 100


# ---------------------------------------------------------------- refusals


def reason_of(raw: bytes, limits: MimeLimits | None = None) -> str:
    with pytest.raises(DowngradeError) as info:
        to_7bit(raw) if limits is None else to_7bit(raw, limits)
    assert isinstance(info.value, MimeError)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_8bit_header_is_refused() -> None:
    raw = entity(["From: Jürgen <j@example.com>", "Subject: hi"], b"plain body\r\n")
    assert reason_of(raw) == "8-bit header"


def test_8bit_part_header_is_refused() -> None:
    part = entity(['Content-Type: text/plain; name="café.txt"'], "café\r\n".encode())
    assert reason_of(message(part)) == "8-bit header"


def test_multipart_signed_with_8bit_content_is_refused() -> None:
    body = entity(
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
        "Grüße\r\n".encode(),
    )
    sig = entity(["Content-Type: application/pgp-signature"], b"-----BEGIN PGP SIGNATURE-----\r\n")
    signed = multipart(
        "signed",
        "sig-b",
        [body, sig],
        headers=[*TOP[:3], "MIME-Version: 1.0"],
    ).replace(b"multipart/signed;", b'multipart/signed; protocol="application/pgp-signature";')
    assert reason_of(signed) == "signed 8-bit content"
    forwarded = entity(["Content-Type: message/rfc822"], signed)
    assert reason_of(message(forwarded)) == "signed 8-bit content"


def test_signed_forwarded_message_without_8bit_bytes_stays() -> None:
    sig = entity(["Content-Type: application/pgp-signature"], b"sig\r\n")
    signed = multipart("signed", "sig-b", [entity(["Content-Type: text/plain"], b"x"), sig])
    text = entity(["Content-Type: text/plain; charset=utf-8"], "Grüße\r\n".encode())
    raw = message(text, entity(["Content-Type: message/rfc822"], signed))
    out = downgrade(raw)
    assert signed in out


def test_8bit_preamble_is_refused() -> None:
    raw = multipart("mixed", "b", [entity([], b"x")], headers=TOP, preamble="Grüße\r\n".encode())
    assert reason_of(raw) == "8-bit preamble or epilogue"


def test_unknown_encoding_is_refused() -> None:
    part = entity(["Content-Type: text/plain", "Content-Transfer-Encoding: x-uuencode"], b"\xff")
    assert reason_of(message(part)) == "unknown-encoding:x-uuencode"


def test_message_partial_is_refused() -> None:
    part = entity(["Content-Type: message/partial; id=1; number=1"], b"\xff\r\n")
    assert reason_of(message(part)) == "8-bit message/partial"


def test_limits_and_broken_structure_are_refused() -> None:
    inner = entity(["Content-Type: text/plain; charset=utf-8"], "ä".encode())
    deep = message(multipart("mixed", "in", [multipart("mixed", "in2", [inner])]))
    assert reason_of(deep, MimeLimits(max_depth=2)) == "limits:depth"
    assert reason_of(deep, MimeLimits(max_parts=3)) == "limits:parts"
    broken = deep.replace(b"--outer-b--", b"")
    assert reason_of(broken).startswith("unparsable:")


def test_not_bytes_is_refused() -> None:
    with pytest.raises(DowngradeError):
        to_7bit("text")  # type: ignore[arg-type]


# ---------------------------------------------------------------- corpus

CORPUS = corpus_files() or ["(corpus missing)"]
# The corpus messages with 8-bit bytes that cannot be downgraded, and why.
REFUSED = {
    "mail-mime-parser/m2004.txt": "8-bit header",
    "mail-mime-parser/m2005.txt": "8-bit header",
    "mail-mime-parser/m3006.txt": "8-bit header",
    "mail-mime-parser/m4001.txt": "8-bit header",  # raw Latin-1 headers, and signed
    "ruby-mail/attachment_pdf_lf.eml": "8-bit header",
    "ruby-mail/utf8_headers.eml": "8-bit header",
    "ruby-mail/attachment_nonascii_filename.eml": "8-bit header",
}


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_message(name: str) -> None:
    raw = load(name)
    if name in REFUSED:
        assert reason_of(raw) == REFUSED[name]
        return
    out = to_7bit(raw)
    if is_7bit(raw):
        assert out is raw
        return
    assert out != raw
    assert is_7bit(out)
    assert leaf_payloads(out) == leaf_payloads(raw)
    check_structure(raw, out)


# ---------------------------------------------------------------- property

TEXT_CHARS = st.sampled_from(list("aZ09 \t-=.:From éßÄ€漢字😀\x00"))


@st.composite
def leaves(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["utf-8", "latin-1", "binary", "ascii"]))
    if kind == "binary":
        data = draw(st.binary(max_size=400))
        ctype = draw(st.sampled_from(["application/octet-stream", "image/png"]))
        cte = draw(st.sampled_from(["binary", "8bit"]))
        return entity([f"Content-Type: {ctype}", f"Content-Transfer-Encoding: {cte}"], data)
    chars = TEXT_CHARS if kind == "utf-8" else st.sampled_from(list("abc -=éßÄ\t"))
    lines = draw(st.lists(st.text(chars, max_size=160), max_size=5))
    text = "\r\n".join(lines) + draw(st.sampled_from(["", "\r\n"]))
    if kind == "ascii":
        data = text.encode("ascii", errors="replace")
        return entity(["Content-Type: text/plain"], data.replace(b"\x00", b"0"))
    subtype = draw(st.sampled_from(["plain", "html"]))
    return entity(
        [f"Content-Type: text/{subtype}; charset={kind}", "Content-Transfer-Encoding: 8bit"],
        text.encode(kind),
    )


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(leaves(), min_size=1, max_size=4))
    if draw(st.booleans()):
        inner = multipart(
            "mixed",
            "=_inner_q",
            draw(st.lists(leaves(), min_size=1, max_size=3)),
            headers=["Subject: fwd", "MIME-Version: 1.0"],
        )
        cte = draw(st.sampled_from(["7bit", "8bit"]))
        fwd = ["Content-Type: message/rfc822", f"Content-Transfer-Encoding: {cte}"]
        parts.insert(draw(st.integers(0, len(parts))), entity(fwd, inner))
    if len(parts) == 1 and draw(st.booleans()):
        head, _, body = parts[0].partition(b"\r\n\r\n")
        return entity([*TOP, head], body)
    return message(*parts, boundary="=_outer_q")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_property_output_is_7bit_and_leaves_decode_the_same(raw: bytes) -> None:
    out = to_7bit(raw)
    if is_7bit(raw):
        assert out is raw
        return
    assert is_7bit(out)
    assert leaf_payloads(out) == leaf_payloads(raw)
    check_structure(raw, out)
