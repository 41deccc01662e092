"""Header blocks of MIME entities, read from bytes without re-serialising them.

A header block is split into fields that remember where their bytes are, so a
rewrite can remove or replace one field and leave every other byte alone.
Parameter values (Content-Type, Content-Disposition, RFC 2231, RFC 2047) are
interpreted with the ``email`` package's header helpers; the message itself is
never handed to ``email``'s parser or generator.
"""

from __future__ import annotations

import email.errors
import email.header
import email.message
import email.utils
from dataclasses import dataclass

from gateway.mime.errors import LimitExceeded, StructureError

CRLF = b"\r\n"
_BLANK_LINE = b"\r\n\r\n"
_WSP = b" \t"


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: lower-case name, unfolded value and its byte span."""

    name: str
    value: str
    start: int
    end: int  # after the field's last CRLF


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    fields: tuple[HeaderField, ...]
    end: int  # after the last field's CRLF (the blank line starts here)
    body_start: int

    def get_all(self, name: str) -> list[HeaderField]:
        return [f for f in self.fields if f.name == name]

    def first(self, name: str) -> HeaderField | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


def _decode_header_bytes(data: bytes) -> str:
    """Header bytes as text: UTF-8 where valid (RFC 6532), else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _valid_field_name(name: bytes) -> bool:
    name = name.rstrip(_WSP)  # obsolete syntax allows WSP before the colon
    return bool(name) and all(33 <= b <= 126 for b in name)


def parse_header_block(
    raw: bytes, start: int, end: int, *, max_size: int, allow_mbox_from: bool
) -> HeaderBlock:
    """Parse the header block of the entity occupying ``raw[start:end]``.

    The block must end with an empty line; an entity that is entirely empty has
    no headers and no body. ``allow_mbox_from`` tolerates an mbox ``From `` line
    at the top of a message (it is kept as bytes, not as a field).
    """
    if start >= end:
        return HeaderBlock((), start, start)
    if raw.startswith(CRLF, start, end):
        return HeaderBlock((), start, start + 2)
    search_end = min(end, start + max_size + len(_BLANK_LINE))
    sep = raw.find(_BLANK_LINE, start, search_end)
    if sep < 0:
        if search_end < end:
            raise LimitExceeded("header-size")
        raise StructureError("header-without-blank-line")
    block_end = sep + 2
    if block_end - start > max_size:
        raise LimitExceeded("header-size")
    fields: list[HeaderField] = []
    pos = start
    cur_start = -1
    cur_lines: list[bytes] = []

    def flush(upto: int) -> None:
        if cur_start >= 0:
            line = b"".join(cur_lines)
            name, _, value = line.partition(b":")
            fields.append(
                HeaderField(
                    name=name.rstrip(_WSP).decode("ascii").lower(),
                    value=_decode_header_bytes(value).strip(),
                    start=cur_start,
                    end=upto,
                )
            )

    line_no = 0
    while pos < block_end:
        eol = raw.find(CRLF, pos, block_end)
        line = raw[pos:eol]
        if line_no == 0 and allow_mbox_from and line.startswith(b"From "):
            pass  # an mbox separator line: kept as bytes, not a field
        elif line[:1] in (b" ", b"\t"):
            if cur_start < 0:
                raise StructureError("bad-header-line")
            cur_lines.append(line)
        else:
            name, colon, _ = line.partition(b":")
            if not colon or not _valid_field_name(name):
                raise StructureError("bad-header-line")
            flush(pos)
            cur_start = pos
            cur_lines = [line]
        line_no += 1
        pos = eol + 2
    flush(block_end)
    return HeaderBlock(tuple(fields), block_end, block_end + 2)


class Params:
    """Content-Type and Content-Disposition of one entity, read with ``email``."""

    __slots__ = ("_msg",)

    def __init__(self, content_type: str | None, disposition: str | None) -> None:
        msg = email.message.Message()
        if content_type is not None:
            msg["Content-Type"] = _unfold(content_type)
        if disposition is not None:
            msg["Content-Disposition"] = _unfold(disposition)
        self._msg = msg

    def param(self, name: str, header: str = "content-type") -> str | None:
        value = self._msg.get_param(name, header=header)
        if value is None or isinstance(value, bool):
            return None
        if isinstance(value, tuple):
            return email.utils.collapse_rfc2231_value(value)
        return email.utils.unquote(value)

    def disposition(self) -> str:
        value = self._msg.get("content-disposition")
        if value is None:
            return ""
        return str(value).split(";", 1)[0].strip().lower()

    def filename(self) -> str:
        """The file name as the sender gave it, RFC 2231 and RFC 2047 decoded."""
        name = self._msg.get_filename()
        if name is None:
            return ""
        return decode_words(str(name)).strip()


def _unfold(value: str) -> str:
    return value.replace("\r\n", "").replace("\n", "").replace("\r", "")


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words (as senders put them in quoted parameters)."""
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, email.errors.HeaderParseError, UnicodeError):
        return text


def content_type_of(value: str | None, default: str) -> str:
    """Lower-case ``type/subtype``; a missing or malformed value gives ``default``
    for a missing one and ``text/plain`` for a malformed one (RFC 2045)."""
    if value is None:
        return default
    ctype = _unfold(value).split(";", 1)[0].strip().lower()
    if ctype.count("/") != 1 or not all(ctype.split("/")):
        return "text/plain"
    return ctype


def cte_of(value: str | None) -> str:
    if value is None:
        return ""
    token = _unfold(value).split("(", 1)[0].strip().lower()
    return token.strip('"')


def content_id_of(value: str | None) -> str:
    if value is None:
        return ""
    return _unfold(value).strip().strip("<>").strip()
