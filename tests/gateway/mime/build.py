"""Small builders for test messages (CRLF, bytes exactly as written)."""

from __future__ import annotations

import base64
from collections.abc import Sequence


def b64(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))


def entity(headers: Sequence[str | bytes], body: bytes) -> bytes:
    lines = [h.encode("utf-8") if isinstance(h, str) else h for h in headers]
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


def multipart(
    subtype: str,
    boundary: str,
    parts: Sequence[bytes],
    *,
    headers: Sequence[str | bytes] = (),
    preamble: bytes = b"",
    epilogue: bytes = b"\r\n",
) -> bytes:
    dash = b"--" + boundary.encode()
    body = preamble
    for p in parts:
        body += dash + b"\r\n" + p + b"\r\n"
    body += dash + b"--" + epilogue
    return entity([*headers, f'Content-Type: multipart/{subtype}; boundary="{boundary}"'], body)


def text(body: str = "Hello,\r\nsee the file.\r\n", charset: str = "us-ascii") -> bytes:
    return entity(
        [f"Content-Type: text/plain; charset={charset}", "Content-Transfer-Encoding: 7bit"],
        body.encode(charset),
    )


def html(body: str = "<html><body><p>Hello</p></body></html>\r\n") -> bytes:
    return entity(
        ["Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 7bit"],
        body.encode(),
    )


def attachment(
    data: bytes,
    name: str = "report.pdf",
    ctype: str = "application/pdf",
    *,
    extra: Sequence[str] = (),
) -> bytes:
    return entity(
        [
            f'Content-Type: {ctype}; name="{name}"',
            "Content-Transfer-Encoding: base64",
            f'Content-Disposition: attachment; filename="{name}"',
            *extra,
        ],
        b64(data),
    )


TOP = ["From: a@example.com", "To: b@example.org", "Subject: test", "MIME-Version: 1.0"]


def message(*parts: bytes, subtype: str = "mixed", boundary: str = "outer-b") -> bytes:
    return multipart(subtype, boundary, parts, headers=TOP)
