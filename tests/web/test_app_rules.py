"""The pure decisions of the download service: ranges, names, types, validators."""

from __future__ import annotations

import re
from email.utils import formatdate
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from web.app import (
    ByteRange,
    RangeVerdict,
    content_disposition,
    display_name,
    etag_matches,
    human_size,
    if_range_allows,
    parse_range,
    safe_content_type,
    sender_domain,
)

# --- Range ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, ByteRange(0, 9, 100)),
        ("bytes=10-", 100, ByteRange(10, 99, 100)),
        ("bytes=-10", 100, ByteRange(90, 99, 100)),
        ("bytes=-1000", 100, ByteRange(0, 99, 100)),
        ("bytes=90-1000", 100, ByteRange(90, 99, 100)),
        ("bytes=99-99", 100, ByteRange(99, 99, 100)),
        ("Bytes = 5-6", 100, ByteRange(5, 6, 100)),
        ("bytes=0-0,", 100, ByteRange(0, 0, 100)),
        ("bytes=0-1,5-9", 100, RangeVerdict.WHOLE),
        ("bytes=0-1,500-", 100, RangeVerdict.WHOLE),
        ("bytes=0-,0-,0-,0-", 100, RangeVerdict.WHOLE),
        ("bytes=500-,600-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=0-1,x", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=100-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=999999999-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=5-1", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=-0", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=a-b", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=-5-6", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=1.5-2", 100, RangeVerdict.UNSATISFIABLE),
        ("items=0-5", 100, RangeVerdict.UNSATISFIABLE),
        ("garbage", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=" + "9" * 40 + "-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=0-" + "9" * 5000, 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=0-", 0, RangeVerdict.UNSATISFIABLE),
        ("bytes=-5", 0, RangeVerdict.WHOLE),
    ],
)
def test_parse_range(header: str, size: int, expected: ByteRange | RangeVerdict) -> None:
    assert parse_range(header, size) == expected


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_closed_ranges_stay_inside_the_body(first: int, last: int, size: int) -> None:
    verdict = parse_range(f"bytes={first}-{last}", size)
    if last < first or first >= size:
        assert verdict is RangeVerdict.UNSATISFIABLE
    else:
        assert isinstance(verdict, ByteRange)
        assert verdict.start == first
        assert verdict.end == min(last, size - 1)
        assert 1 <= verdict.length <= size
        assert verdict.content_range == f"bytes {first}-{verdict.end}/{size}"


@given(st.integers(1, 10**6), st.integers(1, 10**6))
def test_suffix_ranges_give_the_tail(suffix: int, size: int) -> None:
    verdict = parse_range(f"bytes=-{suffix}", size)
    assert isinstance(verdict, ByteRange)
    assert verdict.end == size - 1
    assert verdict.length == min(suffix, size)


@given(st.text(max_size=60))
def test_arbitrary_headers_never_raise(header: str) -> None:
    verdict = parse_range(header, 1000)
    if isinstance(verdict, ByteRange):
        assert 0 <= verdict.start <= verdict.end < 1000


# --- validators ----------------------------------------------------------

ETAG = '"' + "ab" * 32 + '"'


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (ETAG, True),
        ("W/" + ETAG, True),
        (f'"other", {ETAG}', True),
        ("*", True),
        ('"other"', False),
        (ETAG.strip('"'), False),
        ("", False),
    ],
)
def test_etag_matches(header: str, matches: bool) -> None:
    assert etag_matches(header, ETAG) is matches


CREATED = 1_790_000_000.5


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        (ETAG, True),
        ("W/" + ETAG, False),
        ('"other"', False),
        (formatdate(CREATED, usegmt=True), True),
        (formatdate(CREATED - 10, usegmt=True), False),
        (formatdate(CREATED + 10, usegmt=True), False),
        ("not a date", False),
        ("", False),
    ],
)
def test_if_range_allows(header: str, allowed: bool) -> None:
    assert if_range_allows(header, ETAG, CREATED) is allowed


# --- names, types, sizes -------------------------------------------------

TOKEN_CHARS = re.compile(r"[!#$&+\-.^_`|~0-9A-Za-z%]*")


def _split_disposition(value: str) -> tuple[str, str]:
    match = re.fullmatch(r"attachment; filename=\"([^\"]*)\"; filename\*=UTF-8''(.*)", value)
    assert match is not None, value
    return match.group(1), match.group(2)


@given(st.text(max_size=300))
def test_content_disposition_is_always_well_formed(name: str) -> None:
    value = content_disposition(name)
    fallback, encoded = _split_disposition(value)
    assert fallback
    assert all(0x20 <= ord(c) < 0x7F and c not in '"\\%/' for c in fallback)
    assert TOKEN_CHARS.fullmatch(encoded)
    assert unquote(encoded, errors="strict") == display_name(name)
    assert "\r" not in value and "\n" not in value


@pytest.mark.parametrize(
    ("name", "fallback", "decoded"),
    [
        ("report.pdf", "report.pdf", "report.pdf"),
        ("Grüße 2026.xlsx", "Gruße 2026.xlsx".replace("ß", "_"), "Grüße 2026.xlsx"),
        ('a"b\\c.txt', "a_b_c.txt", 'a"b_c.txt'),
        ("../../etc/passwd", "_.._etc_passwd", "_.._etc_passwd"),
        ("报告.pdf", "download.pdf", "报告.pdf"),
        ("100%.txt", "100_.txt", "100%.txt"),
        ("", "download", "download"),
        ("evil\r\nSet-Cookie: x.txt", "evil__Set-Cookie: x.txt", "evil__Set-Cookie: x.txt"),
        ("invoice\u202efdp.exe", "invoice_fdp.exe", "invoice\ufffdfdp.exe"),
    ],
)
def test_content_disposition_examples(name: str, fallback: str, decoded: str) -> None:
    got_fallback, encoded = _split_disposition(content_disposition(name))
    assert got_fallback == fallback
    assert unquote(encoded) == decoded


def test_long_fallback_keeps_the_extension() -> None:
    fallback, _ = _split_disposition(content_disposition("x" * 400 + ".docx"))
    assert len(fallback) == 150
    assert fallback.endswith(".docx")


@pytest.mark.parametrize(
    ("stored", "served"),
    [
        ("application/pdf", "application/pdf"),
        ("Text/HTML; charset=utf-8", "text/html"),
        ("image/svg+xml", "image/svg+xml"),
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        ("", "application/octet-stream"),
        ("pdf", "application/octet-stream"),
        ("text/", "application/octet-stream"),
        ("text/plain/extra", "application/octet-stream"),
        ("text/plain\r\nX-Evil: 1", "application/octet-stream"),
        ("tëxt/plain", "application/octet-stream"),
        ("text /plain", "application/octet-stream"),
    ],
)
def test_safe_content_type(stored: str, served: str) -> None:
    assert safe_content_type(stored) == served


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024 * 1024, "5.0 MiB"),
        (3 * 1024**3 + 1024**3 // 2, "3.5 GiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("sender", "domain"),
    [
        ("alice@Example.COM", "example.com"),
        ('"odd@name"@example.org', "example.org"),
        ("nobody", ""),
        ("trailing@", ""),
    ],
)
def test_sender_domain(sender: str, domain: str) -> None:
    assert sender_domain(sender) == domain


def test_display_name_neutralises_controls_and_bidi() -> None:
    assert display_name("a\x00b\x1fc\x7f.txt") == "a_b_c_.txt"
    assert display_name("x\u2066y\u2069\u200f.pdf") == "x\ufffdy\ufffd\ufffd.pdf"
    assert display_name("dir/sub\\file") == "dir_sub_file"
    assert display_name("   ") == "download"
