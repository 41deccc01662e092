"""Generated messages: random nesting, boundaries, encodings and attachments."""

from __future__ import annotations

import binascii
import itertools
import urllib.parse
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mime import Extraction, LinkingRules, Passthrough, Templates, plan
from tests.gateway.mime.build import TOP, b64, entity
from tests.gateway.mime.checks import check_rendered
from tests.gateway.mime.conftest import notices_for

T = Templates.default()
BCHARS = "abcdefghijklmnopqrstuvwxyABCDEFGHIJKLMNOPQRSTUVWXY0123456789'()+_,-/:=?"
NAME_CHARS = "abcxyz019 _-.äöüß漢字ÅÆ"
TEXT_CHARS = "abcdefghij klmnop,:;!ÄÖÜ"


@dataclass
class Built:
    raw: bytes
    expected: list[tuple[bytes, str]] = field(default_factory=list)  # (data, filename)


def _qp(data: bytes) -> bytes:
    encoded = binascii.b2a_qp(data, istext=False).replace(b"\n", b"\r\n")
    # A line starting with "-" could look like a delimiter: encode that dash.
    return b"\r\n".join(
        b"=2D" + line[1:] if line.startswith(b"-") else line for line in encoded.split(b"\r\n")
    )


def _encode(data: bytes, cte: str) -> bytes:
    return b64(data) if cte == "base64" else _qp(data)


@st.composite
def text_leaf(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, str]]]:
    kind = draw(st.sampled_from(["plain", "html"]))
    words = draw(st.lists(st.text(TEXT_CHARS, max_size=60), min_size=0, max_size=6))
    body = "\r\n".join(words)
    if kind == "html":
        body = f"<html><body><p>{body}</p></body></html>"
    data = body.encode()
    cte = draw(st.sampled_from(["7bit", "quoted-printable", "base64"]))
    if cte == "7bit" and not data.isascii():
        cte = "quoted-printable"
    encoded = data if cte == "7bit" else _encode(data, cte)
    headers = [f"Content-Type: text/{kind}; charset=utf-8", f"Content-Transfer-Encoding: {cte}"]
    return entity(headers, encoded), []


@st.composite
def attachment_leaf(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, str]]]:
    data = draw(st.binary(max_size=3000))
    ctype = draw(
        st.sampled_from(["application/pdf", "image/png", "application/octet-stream", "text/csv"])
    )
    name = draw(st.text(NAME_CHARS, min_size=1, max_size=30).filter(lambda s: s.strip()))
    cte = draw(st.sampled_from(["base64", "quoted-printable"]))
    how = draw(st.sampled_from(["disposition", "name-only", "inline-with-name"]))
    if name.isascii():
        param = f'filename="{name}"'
    else:
        param = "filename*=utf-8''" + urllib.parse.quote(name, safe="")
    headers = [f"Content-Type: {ctype}", f"Content-Transfer-Encoding: {cte}"]
    if how == "disposition":
        headers.append(f"Content-Disposition: attachment; {param}")
    elif how == "inline-with-name":
        headers.append(f"Content-Disposition: inline; {param}")
    else:
        headers[0] += "; " + param.replace("filename", "name")
    is_attachment = how == "disposition" or not ctype.startswith("text/")
    return entity(headers, _encode(data, cte)), ([(data, name.strip())] if is_attachment else [])


@st.composite
def tree(
    draw: st.DrawFn, counter: itertools.count[int], depth: int = 0
) -> tuple[bytes, list[tuple[bytes, str]]]:
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(st.one_of(text_leaf(), attachment_leaf()))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    boundary = draw(st.text(BCHARS, min_size=1, max_size=30)) + f".{next(counter)}Z"
    n = draw(st.integers(1, 4))
    parts: list[bytes] = []
    expected: list[tuple[bytes, str]] = []
    for _ in range(n):
        raw, exp = draw(tree(counter, depth + 1))
        parts.append(raw)
        expected.extend(exp)
    preamble = draw(st.sampled_from([b"", b"This is MIME.\r\n"]))
    dash = b"--" + boundary.encode()
    body = preamble + b"".join(dash + b"\r\n" + p + b"\r\n" for p in parts) + dash + b"--\r\n"
    headers = [f'Content-Type: multipart/{subtype};\r\n\tboundary="{boundary}"']
    return entity(headers, body), expected


@st.composite
def messages(draw: st.DrawFn) -> Built:
    raw, expected = draw(tree(itertools.count()))
    top = b"".join(h.encode() + b"\r\n" for h in TOP)
    return Built(top + raw, expected)


def _check_message(built: Built, min_size: int) -> None:
    rules = LinkingRules(min_size=min_size)
    wanted = [(data, name) for data, name in built.expected if len(data) >= min_size]
    result = plan(built.raw, rules)
    if not wanted:
        assert result == Passthrough("no-attachments")
        return
    assert isinstance(result, Extraction)
    assert [(a.data, a.filename) for a in result.attachments] == wanted
    notices = notices_for(result.attachments)
    out = result.render(notices, T)
    check_rendered(built.raw, result, out, [n.url for n in notices])
    # Nothing is left to take out of the rewritten message.
    assert plan(out, rules) == Passthrough("no-attachments")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.integers(0, 2000))
def test_generated_messages(built: Built, min_size: int) -> None:
    _check_message(built, min_size)


def test_kept_part_equal_to_a_taken_one() -> None:
    # The inline text/csv (a name but no attachment disposition) stays; the
    # text/csv attachment with the same (empty) data and type goes.
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed;\r\n\tboundary="0.0Z"\r\n\r\n'
        b'--0.0Z\r\nContent-Type: multipart/mixed;\r\n\tboundary="0.1Z"\r\n\r\n'
        b'--0.1Z\r\nContent-Type: multipart/mixed;\r\n\tboundary="0.2Z"\r\n\r\n'
        b'--0.2Z\r\nContent-Type: text/csv; name="0"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n\r\n--0.2Z--\r\n\r\n"
        b"--0.1Z\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n\r\n--0.1Z--\r\n\r\n"
        b"--0.0Z\r\nContent-Type: text/csv\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="0"\r\n\r\n\r\n--0.0Z--\r\n'
    )
    _check_message(Built(raw, [(b"", "0")]), 0)
