"""File names: decoding what senders write and neutralising what is hostile."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.mime import Extraction, LinkingRules, plan, safe_filename
from gateway.mime.filenames import BIDI_CONTROLS, RESERVED_NAMES, is_reserved
from tests.gateway.mime.build import b64, entity, message, text

DATA = b"payload bytes " * 10


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("C:\\Windows\\x.exe", "x.exe"),
        ("C:x.exe", "x.exe"),
        ("/absolute/path/", "attachment"),
        ("report\x00.pdf", "report.pdf"),
        ("a\r\nb.txt", "ab.txt"),
        ("CON.txt", "_CON.txt"),
        ("con", "_con"),
        ("lpt9.tar.gz", "_lpt9.tar.gz"),
        ("COM1 .log", "_COM1 .log"),
        ("CONSOLE.txt", "CONSOLE.txt"),
        ("invoice\u202egpj.exe", "invoicegpj.exe"),
        ("\u2066photo\u2069.jpg\u200f", "photo.jpg"),
        ("...hidden", "hidden"),
        ("trailing. . .", "trailing"),
        ("", "attachment"),
        ("..", "attachment"),
        ('what?<is>"this"|*.txt', "what__is__this___.txt"),
        ("x" * 300 + ".pdf", "x" * 196 + ".pdf"),
        ("Grüße.pdf", "Grüße.pdf"),
    ],
)
def test_safe_filename(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


@given(st.text(max_size=400))
def test_safe_filename_properties(name: str) -> None:
    safe = safe_filename(name)
    assert safe
    assert "/" not in safe and "\\" not in safe
    assert not any(unicodedata.category(ch) == "Cc" for ch in safe)
    assert not any(ch in BIDI_CONTROLS for ch in safe)
    assert not is_reserved(safe)
    assert safe.split(".", 1)[0].strip().upper() not in RESERVED_NAMES
    assert not safe.startswith(".") and not safe.endswith((".", " "))
    assert len(safe) <= 200
    assert safe_filename(safe) == safe


@given(st.sampled_from(sorted(RESERVED_NAMES)), st.text(alphabet="abcXYZ.", max_size=8))
def test_reserved_names_never_survive(device: str, tail: str) -> None:
    for name in (device + tail, device.lower() + "." + tail, device + " ." + tail):
        assert not is_reserved(safe_filename(name))


def _with_disposition(disposition: str, ctype: str = "application/octet-stream") -> bytes:
    part = entity(
        [
            f"Content-Type: {ctype}",
            "Content-Transfer-Encoding: base64",
            f"Content-Disposition: {disposition}",
        ],
        b64(DATA),
    )
    return message(text(), part)


@pytest.mark.parametrize(
    ("disposition", "decoded", "safe"),
    [
        ('attachment; filename="../../etc/passwd"', "../../etc/passwd", "passwd"),
        (
            "attachment; filename*=utf-8''..%2F..%2Fetc%2Fpasswd",
            "../../etc/passwd",
            "passwd",
        ),
        (
            "attachment; filename*=utf-8''report%00.pdf",
            "report\x00.pdf",
            "report.pdf",
        ),
        (
            'attachment; filename="=?utf-8?b?QzpcV2luZG93c1x4LmV4ZQ==?="',
            "C:\\Windows\\x.exe",
            "x.exe",
        ),
        (
            'attachment; filename="=?utf-8?q?CON=2Etxt?="',
            "CON.txt",
            "_CON.txt",
        ),
        (
            "attachment; filename*0*=utf-8''invoice%E2%80%AE; filename*1=gpj.exe",
            "invoice\u202egpj.exe",
            "invoicegpj.exe",
        ),
        (
            "attachment;\r\n filename*0*=utf-8''..%5C..%5C; filename*1*=%E2%80%AEfdp.scr",
            "..\\..\\\u202efdp.scr",
            "fdp.scr",
        ),
        (
            "attachment; filename*=iso-2022-jp''%1B%24B%25F%25%2D%25%39%25%48%1B%28B.txt",
            "テキスト.txt",
            "テキスト.txt",
        ),
        (
            "attachment; filename*=shift_jis''%83e%83L%83X%83g.txt",
            "テキスト.txt",
            "テキスト.txt",
        ),
    ],
)
def test_hostile_names_from_headers(disposition: str, decoded: str, safe: str) -> None:
    result = plan(_with_disposition(disposition), LinkingRules(min_size=1))
    assert isinstance(result, Extraction)
    [a] = result.attachments
    assert a.filename == decoded
    assert a.safe_filename == safe
    assert a.data == DATA


def test_name_from_content_type_when_disposition_has_none() -> None:
    raw = _with_disposition("attachment", 'application/pdf; name="=?utf-8?q?Pr=C3=BCfung=2Epdf?="')
    result = plan(raw, LinkingRules(min_size=1))
    assert isinstance(result, Extraction)
    assert result.attachments[0].filename == "Prüfung.pdf"


def test_nameless_attachment() -> None:
    result = plan(_with_disposition("attachment"), LinkingRules(min_size=1))
    assert isinstance(result, Extraction)
    a = result.attachments[0]
    assert (a.filename, a.safe_filename) == ("", "attachment")
