"""Notice texts, templates, and how a notice goes into bodies of every kind."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from gateway.mime import (
    Extraction,
    LinkingRules,
    LinkNotice,
    TemplateError,
    Templates,
    human_size,
    plan,
)
from tests.gateway.mime.build import attachment, b64, entity, message, multipart, text
from tests.gateway.mime.checks import check_rendered, email_leaves, email_payload, parse
from tests.gateway.mime.conftest import EXPIRES, notices_for

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 8
T = Templates.default()


def render(raw: bytes) -> bytes:
    ex = plan(raw, LinkingRules(min_size=1))
    assert isinstance(ex, Extraction)
    notices = notices_for(ex.attachments)
    out = ex.render(notices, T)
    check_rendered(raw, ex, out, [n.url for n in notices])
    return out


def body_headers(out: bytes, index: int = 0) -> tuple[dict[str, str], bytes]:
    part = email_leaves(parse(out))[index]
    return {k.lower(): str(v) for k, v in part.items()}, email_payload(part)


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KB"), (1536, "1.5 KB"), (2 * 1024**2, "2.0 MB")],
)
def test_human_size(size: int, shown: str) -> None:
    assert human_size(size) == shown


def test_base64_latin1_body_keeps_charset_and_encoding() -> None:
    body = "Grüße aus Köln.\r\n".encode("iso-8859-1")
    part = entity(
        ["Content-Type: text/plain; charset=ISO-8859-1", "Content-Transfer-Encoding: base64"],
        b64(body),
    )
    out = render(message(part, attachment(PDF, "Bücher.pdf")))
    headers, decoded = body_headers(out)
    assert headers["content-type"] == "text/plain; charset=ISO-8859-1"
    assert headers["content-transfer-encoding"] == "base64"
    assert decoded.startswith(body)
    assert "Bücher.pdf".encode("iso-8859-1") in decoded
    raw_part = out[out.index(b"base64\r\n\r\n") + 10 : out.index(b"\r\n--outer-b")]
    assert all(len(line) <= 76 for line in raw_part.split(b"\r\n"))


def test_latin1_body_with_a_name_it_cannot_hold_gets_utf8_bytes() -> None:
    body = "Grüße.\r\n".encode("iso-8859-1")
    part = entity(
        ["Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: base64"],
        b64(body),
    )
    out = render(message(part, attachment(PDF, "報告.pdf")))
    headers, decoded = body_headers(out)
    # The body is not ASCII, so its charset cannot change.
    assert headers["content-type"] == "text/plain; charset=iso-8859-1"
    assert "報告.pdf".encode() in decoded


def test_qp_utf8_body_is_re_encoded_as_qp() -> None:
    part = entity(
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"],
        b"Caf=C3=A9 au lait, a long line that goes on and on and on and on and on and =\r\non.\r\n",
    )
    out = render(message(part, attachment(PDF, "Überblick.pdf")))
    headers, decoded = body_headers(out)
    assert headers["content-transfer-encoding"] == "quoted-printable"
    assert decoded.startswith("Café au lait, a long line".encode())
    assert "Überblick.pdf".encode() in decoded
    raw_part = out[out.index(b"quoted-printable\r\n\r\n") : out.index(b"\r\n--outer-b")]
    assert all(len(line) <= 76 for line in raw_part.split(b"\r\n"))


def test_7bit_ascii_body_with_non_ascii_name_becomes_qp_utf8() -> None:
    out = render(message(text(), attachment(PDF, "Ärger.pdf")))
    headers, decoded = body_headers(out)
    assert headers["content-transfer-encoding"] == "quoted-printable"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert "Ärger.pdf".encode() in decoded
    assert out.count(b"Content-Transfer-Encoding") == 1 + 0  # the body's; the PDF is gone
    assert email_leaves(parse(out))[0].get_content_charset() == "utf-8"


def test_body_without_headers_gets_them() -> None:
    bare = b"\r\nplain text without headers\r\n"
    out = render(message(bare, attachment(PDF, "Ärger.pdf")))
    headers, decoded = body_headers(out)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["content-transfer-encoding"] == "quoted-printable"
    assert decoded.startswith(b"plain text without headers")


def test_8bit_body_stays_8bit() -> None:
    part = entity(
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
        "Grüße\r\n".encode(),
    )
    out = render(message(part, attachment(PDF, "Ärger.pdf")))
    headers, _ = body_headers(out)
    assert headers["content-transfer-encoding"] == "8bit"
    assert "Ärger.pdf".encode() in out


def test_html_notice_is_escaped_and_before_body_end() -> None:
    page = entity(
        ["Content-Type: text/html; charset=us-ascii"],
        b"<html><body><p>Hi</p></BODY ></html>\r\n",
    )
    raw = message(multipart("alternative", "alt-b", [text(), page]), attachment(PDF))
    ex = plan(raw, LinkingRules(min_size=1))
    assert isinstance(ex, Extraction)
    evil = LinkNotice(
        filename="<script>alert('x')</script>ü.pdf",
        size=10,
        url='https://files.example.com/d/a"b',
        expires=EXPIRES,
    )
    out = ex.render([evil], T)
    _, page_body = body_headers(out, 1)
    assert b"<script>" not in page_body
    assert b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&#252;.pdf" in page_body
    assert b'href="https://files.example.com/d/a&quot;b"' in page_body
    assert page_body.index(b"&lt;script") < page_body.index(b"</BODY >")
    _, plain_body = body_headers(out, 0)
    assert "<script>alert('x')</script>ü.pdf".encode() in plain_body


def test_html_without_body_tag_gets_notice_appended() -> None:
    page = entity(["Content-Type: text/html; charset=utf-8"], b"<p>Hi</p>")
    out = render(message(page, attachment(PDF)))
    _, decoded = body_headers(out)
    assert decoded.startswith(b"<p>Hi</p>\r\n")
    assert b"token-0" in decoded


def test_templates_from_dir(tmp_path: Path) -> None:
    (tmp_path / "notice.txt").write_text(
        "Files ($count), $$5 value:\n$begin_files\n* $filename $size $url $expires\n$end_files\n"
    )
    templates = Templates.from_dir(tmp_path)
    assert templates.html == Templates.default().html
    n = LinkNotice("a.pdf", 2048, "https://x/d/1", EXPIRES)
    assert templates.render_text([n, n]) == (
        "Files (2), $5 value:\n"
        "* a.pdf 2.0 KB https://x/d/1 2026-12-24 10:00 UTC\n"
        "* a.pdf 2.0 KB https://x/d/1 2026-12-24 10:00 UTC\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "$begin_files\n$filename $nonsense\n$end_files\n",
        "$filename outside\n$begin_files\n$end_files\n",
        "no block at all $count\n",
        "$end_files\n$begin_files\n",
        "$begin_files\n${broken\n$end_files\n",
    ],
)
def test_bad_templates_name_the_file(tmp_path: Path, source: str) -> None:
    (tmp_path / "notice.html").write_text(source)
    with pytest.raises(TemplateError, match=r"notice\.html"):
        Templates.from_dir(tmp_path)


def test_expiry_is_shown_in_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=1))
    n = LinkNotice("a.pdf", 1, "u", datetime.datetime(2026, 12, 24, 11, 0, tzinfo=cet))
    assert "2026-12-24 10:00 UTC" in T.render_text([n])
