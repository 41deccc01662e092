"""Downgrading a message with an 8-bit body to 7-bit (RFC 6152, RFC 1652).

When the next hop does not announce 8BITMIME, a message whose body carries
8-bit bytes (or NUL) must be converted before it is DKIM-signed.
``to_7bit(raw)`` scans the message (see ``scan``) and re-encodes only the leaf
parts whose bodies carry such bytes:

* ``text/*`` becomes quoted-printable, line by line, so each CRLF stays a
  hard line break (a bare CR or LF is encoded, not turned into a line break);
  the charset parameter is kept as it is. A text part in a charset that is
  not ASCII-compatible (UTF-16, UTF-32), or whose quoted-printable lines would
  look like a delimiter of an enclosing multipart, becomes base64 instead.
* every other leaf becomes base64 in lines of 76 characters.
* ``message/rfc822`` is converted recursively: its inner parts are
  re-encoded, and its own 8bit/binary label becomes 7bit. The same relabelling
  applies to multiparts that held converted parts.

Only the Content-Transfer-Encoding field of a converted part changes; every
other header byte, every delimiter line and every part without 8-bit bytes
stays as it came. A message without MIME headers gains ``MIME-Version: 1.0``
and, if it has no Content-Type, ``text/plain`` with ``charset=utf-8`` (or
``unknown-8bit``, RFC 1428, when the body is not valid UTF-8).

What cannot be converted without loss raises ``DowngradeError`` whose
``reason`` is one of:

* ``"8-bit header"``: raw 8-bit bytes in a header section (of the message,
  of a part or of a forwarded message that has to be converted);
* ``"signed 8-bit content"`` / ``"encrypted 8-bit content"``: the message (or a
  forwarded message with 8-bit bytes) holds signed or encrypted content, and
  re-encoding could break the signature;
* ``"8-bit preamble or epilogue"``: 8-bit bytes outside any part of a multipart;
* ``"8-bit message/partial"``, ``"8-bit message/external-body"``: types that
  allow no transfer encoding but 7bit;
* ``"unknown-encoding:<cte>"``: 8-bit bytes under a transfer encoding other
  than 7bit, 8bit, binary, quoted-printable or base64;
* ``"limits:<what>"`` and ``"unparsable:<what>"``: as reported by the scanner.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from gateway.mime.errors import LimitExceeded, MimeError, Protected, StructureError
from gateway.mime.headers import CRLF
from gateway.mime.rewrite import MimeLimits
from gateway.mime.scan import Entity, scan_message
from gateway.mime.transfer import encode_base64, encode_qp

__all__ = ["DowngradeError", "to_7bit"]

_TREATED_AS_8BIT = frozenset({"", "7bit", "8bit", "binary", "quoted-printable", "base64"})
_SEVEN_BIT_ONLY = frozenset({"message/partial", "message/external-body"})
_ASCII_PROBE = "\r\n =-.:;abcXYZ019"
_DEFAULT_LIMITS = MimeLimits()

# Order of header fields inserted at the same place.
_MIME_VERSION, _CONTENT_TYPE, _CTE = 1, 2, 3


class DowngradeError(MimeError):
    """The message cannot be made 7-bit without loss; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _has_8bit(data: bytes) -> bool:
    return not data.isascii() or b"\x00" in data


@dataclass(slots=True)
class _Edits:
    """Replacements in one message's bytes: (start, end, order, data)."""

    items: list[tuple[int, int, int, bytes]] = field(default_factory=list)

    def replace(self, start: int, end: int, data: bytes) -> None:
        self.items.append((start, end, 0, data))

    def insert(self, at: int, data: bytes, order: int) -> None:
        self.items.append((at, at, order, data))

    def apply(self, raw: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        for start, end, _, data in sorted(self.items, key=lambda e: (e[0], e[1], e[2])):
            if start < pos:
                raise DowngradeError("internal: overlapping edits")
            out.append(raw[pos:start])
            out.append(data)
            pos = end
        out.append(raw[pos:])
        return b"".join(out)


@dataclass(slots=True)
class _Context:
    limits: MimeLimits
    parts_left: int


def to_7bit(raw: bytes, limits: MimeLimits = _DEFAULT_LIMITS) -> bytes:
    """``raw`` (a whole message, CRLF line ends) with every 8-bit body re-encoded.

    A message that is already 7-bit (no byte above 0x7F, no NUL) is returned
    as the same object. Raises ``DowngradeError`` when that is not possible.
    """
    if not isinstance(raw, bytes):
        raise DowngradeError("the message must be bytes")
    if not _has_8bit(raw):
        return raw
    context = _Context(limits, limits.max_parts)
    try:
        out = _convert(raw, context, max_depth=limits.max_depth, outer=(), at_eof=True)
    except RecursionError as exc:
        raise DowngradeError("limits:depth") from exc
    if _has_8bit(out):  # every path above raises first; this guards the contract
        raise DowngradeError("internal: 8-bit bytes left")
    return out


def _header_section(raw: bytes) -> bytes:
    if raw.startswith(CRLF):
        return b""
    sep = raw.find(CRLF + CRLF)
    return raw if sep < 0 else raw[: sep + 2]


def _convert(
    raw: bytes, context: _Context, *, max_depth: int, outer: tuple[bytes, ...], at_eof: bool
) -> bytes:
    """Convert one message (the whole input or a forwarded message's bytes)
    that is known to hold 8-bit bytes. ``outer`` are the boundaries of the
    multiparts around it; ``at_eof`` is true when its end is the input's end."""
    if _has_8bit(_header_section(raw)):
        raise DowngradeError("8-bit header")
    try:
        root = scan_message(
            raw,
            max_depth=max_depth,
            max_parts=context.parts_left,
            max_header_size=context.limits.max_header_size,
            nested=False,
        )
    except Protected as exc:
        raise DowngradeError(f"{exc.what} 8-bit content") from exc
    except LimitExceeded as exc:
        raise DowngradeError(f"limits:{exc.what}") from exc
    except StructureError as exc:
        raise DowngradeError(f"unparsable:{exc.what}") from exc
    context.parts_left -= sum(1 for _ in root.walk())
    edits = _Edits()
    walker = _Walker(raw, context, max_depth, outer, at_eof, edits)
    if walker.entity(root) and root.field("mime-version") is None:
        edits.insert(root.headers.end, b"MIME-Version: 1.0" + CRLF, _MIME_VERSION)
    return edits.apply(raw)


def _ascii_compatible(charset: str | None) -> bool:
    if charset is None:
        return True
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        return True  # unknown to Python: assume the usual ASCII superset
    try:
        return _ASCII_PROBE.encode(codec) == _ASCII_PROBE.encode("ascii")
    except UnicodeError:
        return False


def _qp_text(body: bytes) -> bytes:
    """Quoted-printable, one input line at a time: CRLF stays a hard line
    break, a bare LF is encoded (behind a soft line break)."""
    out: list[bytes] = []
    for line in body.split(CRLF):
        pieces = [encode_qp(piece) for piece in line.split(b"\n")]
        out.append(b"=\r\n=0A=\r\n".join(pieces))
    return CRLF.join(out)


def _collides(body: bytes, boundaries: tuple[bytes, ...]) -> bool:
    for boundary in boundaries:
        dash = b"--" + boundary
        if body.startswith(dash) or CRLF + dash in body:
            return True
    return False


class _Walker:
    """Collects the edits for one scanned message."""

    def __init__(
        self,
        raw: bytes,
        context: _Context,
        max_depth: int,
        outer: tuple[bytes, ...],
        at_eof: bool,
        edits: _Edits,
    ) -> None:
        self.raw = raw
        self.context = context
        self.max_depth = max_depth
        self.outer = outer
        self.at_eof = at_eof
        self.edits = edits

    def boundaries(self, entity: Entity) -> tuple[bytes, ...]:
        return (*entity.ancestor_boundaries(), *self.outer)

    def entity(self, entity: Entity) -> bool:
        """Edit ``entity`` where needed; True when anything in it changed."""
        raw = self.raw
        if _has_8bit(raw[entity.start : entity.headers.end]):
            raise DowngradeError("8-bit header")
        if entity.is_multipart:
            first = entity.delimiters[0] if entity.delimiters else entity.close_delimiter
            if _has_8bit(raw[entity.body_start : first]) or _has_8bit(
                raw[entity.close_delimiter : entity.end]
            ):
                raise DowngradeError("8-bit preamble or epilogue")
            changed = False
            for child in entity.children:
                changed |= self.entity(child)
            if changed and entity.cte in ("8bit", "binary"):
                self.set_cte(entity, b"7bit")
            return changed
        body = raw[entity.body_start : entity.end]
        if not _has_8bit(body):
            return False
        if entity.cte not in _TREATED_AS_8BIT:
            raise DowngradeError(f"unknown-encoding:{entity.cte}")
        ctype = entity.content_type
        if ctype in _SEVEN_BIT_ONLY:
            raise DowngradeError(f"8-bit {ctype}")
        ends_input = self.at_eof and entity.end == len(raw)
        if ctype == "message/rfc822":
            inner = _convert(
                body,
                self.context,
                max_depth=self.max_depth - entity.depth - 1,
                outer=self.boundaries(entity),
                at_eof=ends_input,
            )
            self.edits.replace(entity.body_start, entity.end, inner)
            if entity.cte not in ("", "7bit"):
                self.set_cte(entity, b"7bit")
            return True
        charset = entity.params.param("charset")
        as_text = entity.maintype == "text" and _ascii_compatible(charset)
        new = _qp_text(body) if as_text else b""
        if as_text and not _collides(new, self.boundaries(entity)):
            cte = b"quoted-printable"
        else:
            new = encode_base64(body) + (CRLF if ends_input else b"")
            cte = b"base64"
        self.edits.replace(entity.body_start, entity.end, new)
        if entity.parent is None and entity.field("content-type") is None:
            try:
                body.decode("utf-8")
                label = b"utf-8"
            except UnicodeDecodeError:
                label = b"unknown-8bit"
            line = b"Content-Type: text/plain; charset=" + label + CRLF
            self.edits.insert(entity.headers.end, line, _CONTENT_TYPE)
        self.set_cte(entity, cte)
        return True

    def set_cte(self, entity: Entity, value: bytes) -> None:
        """Replace the first Content-Transfer-Encoding field (keeping its name
        as written), drop repeats, or add one at the end of the header."""
        fields = entity.headers.get_all("content-transfer-encoding")
        if not fields:
            line = b"Content-Transfer-Encoding: " + value + CRLF
            self.edits.insert(entity.headers.end, line, _CTE)
            return
        first = fields[0]
        name = self.raw[first.start : first.end].split(b":", 1)[0].rstrip(b" \t")
        self.edits.replace(first.start, first.end, name + b": " + value + CRLF)
        for other in fields[1:]:
            self.edits.replace(other.start, other.end, b"")
