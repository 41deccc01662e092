"""Taking attachments out of a message and putting notices in their place.

``plan(raw, rules)`` scans the message (see ``scan``), picks the attachments
to take out and returns an ``Extraction`` (or a ``Passthrough`` saying why
the message must go on untouched). The caller stores each attachment, makes a
link for it and calls ``Extraction.render(notices, templates)`` for the new
message bytes. Both are pure: no I/O, no clock, no event loop.

The rewrite changes as few bytes as it can: a taken-out part loses its
delimiter line and its bytes; the text/plain and text/html body that receive
the notice are re-encoded in their own charset and transfer encoding; a
``Content-Length`` on the top is dropped. Every other byte, headers included,
stays as it came. A message with no text body gains a text/plain notice part
as the first part of its multipart/mixed (the message is wrapped in one when
its top is something else).

A forwarded ``message/rfc822`` is looked into only when ``rules.nested`` is
set, and only its multipart parts are taken out; a forwarded message that is
signed, encrypted or unreadable is kept whole. ``message/rfc822`` parts are
never taken out themselves.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gateway.mime.errors import (
    LimitExceeded,
    MimeError,
    Protected,
    RenderError,
    StructureError,
    TemplateError,
)
from gateway.mime.filenames import safe_filename
from gateway.mime.headers import HeaderField
from gateway.mime.notice import LinkNotice, Templates, human_size
from gateway.mime.scan import Entity, scan_message
from gateway.mime.transfer import (
    decode_base64,
    decode_qp,
    encode_base64,
    encode_qp,
    needs_encoding,
)

__all__ = [
    "Attachment",
    "Extraction",
    "LinkNotice",
    "LinkingRules",
    "MimeError",
    "MimeLimits",
    "Passthrough",
    "RenderError",
    "TemplateError",
    "Templates",
    "human_size",
    "plan",
    "safe_filename",
]

CRLF = b"\r\n"
_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})
_REENCODABLE = _IDENTITY | {"base64", "quoted-printable"}
# Parts that are never taken out whatever their disposition says.
_KEEP_TYPES = frozenset(
    {
        "text/calendar",
        "application/ics",
        "message/delivery-status",
        "message/global-delivery-status",
        "message/disposition-notification",
        "message/global-disposition-notification",
        "message/feedback-report",
        "message/global-headers",
        "text/rfc822-headers",
        "application/pgp-signature",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
    }
)
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_CID = re.compile(rb"cid:([^\s\"'<>()]+)", re.IGNORECASE)
_BODY_CLOSE = re.compile(rb"</body\s*>", re.IGNORECASE)
_CHARSET_PARAM = re.compile(rb"(;\s*)charset\*?\s*=\s*(?:\"[^\"]*\"|[^;\s]*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LinkingRules:
    min_size: int  # decoded bytes; attachments smaller than this stay
    allow_types: tuple[str, ...] = ()  # "application/pdf", "image/*" or ".pdf"; empty = all
    deny_types: tuple[str, ...] = ()  # same forms; deny wins over allow
    nested: bool = False  # also take attachments out of forwarded message/rfc822 parts


@dataclass(frozen=True, slots=True)
class MimeLimits:
    max_depth: int = 20
    max_parts: int = 1000
    max_header_size: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class Attachment:
    index: int  # order in the message
    filename: str  # decoded original name as the sender gave it ("" if none)
    safe_filename: str  # neutralised: for display and Content-Disposition
    content_type: str  # lower-case type/subtype as declared
    data: bytes  # decoded bytes


@dataclass(frozen=True, slots=True)
class Passthrough:
    reason: str  # "signed", "encrypted", "no-attachments", "limits:depth", "unparsable:..."


# ---------------------------------------------------------------- decisions


def _type_entry_matches(entry: str, content_type: str, names: Sequence[str]) -> bool:
    e = entry.strip().lower()
    if not e:
        return False
    if "/" in e:
        if e.endswith("/*"):
            return content_type.startswith(e[:-1])
        return content_type == e
    ext = e if e.startswith(".") else "." + e
    return any(n.lower().endswith(ext) for n in names if n)


def _explicitly_allowed(rules: LinkingRules, content_type: str, names: Sequence[str]) -> bool:
    """An allow entry naming this exact type or extension (no wildcard)."""
    return any(
        not entry.strip().endswith("/*") and _type_entry_matches(entry, content_type, names)
        for entry in rules.allow_types
    )


def type_allowed(rules: LinkingRules, content_type: str, names: Sequence[str]) -> bool:
    """Deny wins; an empty allow list allows everything not denied."""
    if any(_type_entry_matches(d, content_type, names) for d in rules.deny_types):
        return False
    if not rules.allow_types:
        return True
    return any(_type_entry_matches(a, content_type, names) for a in rules.allow_types)


def _is_attachment(entity: Entity, filename: str) -> bool:
    if entity.is_multipart or entity.maintype == "message":
        return False
    if entity.disposition == "attachment":
        return True
    return entity.maintype != "text" and bool(filename)


def _decode_body(raw: bytes, entity: Entity) -> bytes | None:
    body = raw[entity.body_start : entity.end]
    cte = entity.cte
    if cte == "base64":
        return decode_base64(body)
    if cte == "quoted-printable":
        return decode_qp(body)
    if cte in _IDENTITY:
        return body
    return None


def _cid_references(raw: bytes, root: Entity) -> frozenset[str]:
    refs: set[str] = set()
    for entity in root.walk():
        if entity.content_type != "text/html":
            continue
        data = _decode_body(raw, entity)
        if data is None:
            continue
        for match in _CID.finditer(data):
            value = match.group(1).decode("latin-1")
            refs.add(value.lower())
            refs.add(urllib.parse.unquote(value).lower())
    return frozenset(refs)


def _leaves(entity: Entity, in_report: bool = False) -> Iterator[tuple[Entity, bool]]:
    if entity.is_multipart:
        report = in_report or entity.content_type == "multipart/report"
        for child in entity.children:
            yield from _leaves(child, report)
    elif entity.message is not None:
        yield from _leaves(entity.message, in_report)
    else:
        yield entity, in_report


def plan(
    raw: bytes, rules: LinkingRules, limits: MimeLimits = MimeLimits()
) -> Extraction | Passthrough:
    """Decide what to take out of ``raw`` (a whole message with CRLF line ends)."""
    if not isinstance(raw, bytes):
        raise MimeError("the message must be bytes")
    try:
        root = scan_message(
            raw,
            max_depth=limits.max_depth,
            max_parts=limits.max_parts,
            max_header_size=limits.max_header_size,
            nested=rules.nested,
        )
    except Protected as exc:
        return Passthrough(exc.what)
    except LimitExceeded as exc:
        return Passthrough(f"limits:{exc.what}")
    except StructureError as exc:
        return Passthrough(f"unparsable:{exc.what}")
    except RecursionError:
        return Passthrough("limits:depth")
    cids = _cid_references(raw, root)
    taken: list[tuple[Entity, Attachment]] = []
    for leaf, in_report in _leaves(root):
        if in_report or not (leaf.parent is None or leaf.parent.is_multipart):
            continue
        name = leaf.params.filename()
        if not _is_attachment(leaf, name) or leaf.content_type in _KEEP_TYPES:
            continue
        if leaf.content_id and leaf.content_id.lower() in cids:
            continue
        safe = safe_filename(name) if name else safe_filename("")
        names = (name, safe)
        tnef = leaf.content_type in _TNEF_TYPES or safe.lower() == "winmail.dat"
        if tnef and not _explicitly_allowed(rules, leaf.content_type, names):
            continue
        if not type_allowed(rules, leaf.content_type, names):
            continue
        data = _decode_body(raw, leaf)
        if data is None or len(data) < rules.min_size:
            continue
        attachment = Attachment(
            index=len(taken),
            filename=name,
            safe_filename=safe,
            content_type=leaf.content_type,
            data=data,
        )
        taken.append((leaf, attachment))
    if not taken:
        return Passthrough("no-attachments")
    return Extraction(raw, root, taken)


# ---------------------------------------------------------------- rewriting


@dataclass(frozen=True, slots=True)
class _Edit:
    start: int
    end: int
    data: bytes
    seq: int


class _Edits:
    def __init__(self) -> None:
        self._items: list[_Edit] = []
        self._seq = itertools.count()

    def replace(self, start: int, end: int, data: bytes) -> None:
        self._items.append(_Edit(start, end, data, next(self._seq)))

    def insert(self, at: int, data: bytes) -> None:
        self.replace(at, at, data)

    def apply(self, raw: bytes) -> bytes:
        out: list[bytes] = []
        pos = 0
        for edit in sorted(self._items, key=lambda e: (e.start, e.end, e.seq)):
            if edit.start < pos:
                raise RenderError("internal: overlapping edits")
            out.append(raw[pos : edit.start])
            out.append(edit.data)
            pos = edit.end
        out.append(raw[pos:])
        return b"".join(out)


def _collides(body: bytes, boundaries: Sequence[bytes]) -> bool:
    for boundary in boundaries:
        dash = b"--" + boundary
        if body.startswith(dash) or CRLF + dash in body or b"\n" + dash in body:
            return True
    return False


def _ascii_compatible(codec: str) -> bool:
    probe = "\r\n</body>-= cid:"
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def _find_bodies(entity: Entity, removed: set[int]) -> tuple[Entity | None, Entity | None]:
    """The main text/plain and text/html bodies (either may be missing)."""
    if id(entity) in removed:
        return None, None
    if entity.is_multipart:
        kids = [c for c in entity.children if id(c) not in removed]
        if entity.content_type == "multipart/alternative":
            plain: Entity | None = None
            html: Entity | None = None
            for child in kids:
                p, h = _find_bodies(child, removed)
                plain, html = plain or p, html or h
            return plain, html
        if entity.content_type == "multipart/related":
            return _find_bodies(entity.children[0], removed) if entity.children else (None, None)
        if entity.content_type == "multipart/digest":
            return None, None
        for child in kids:
            p, h = _find_bodies(child, removed)
            if p is not None or h is not None:
                return p, h
        return None, None
    if entity.disposition == "attachment" or entity.params.filename():
        return None, None
    if entity.content_type == "text/plain":
        return entity, None
    if entity.content_type == "text/html":
        return None, entity
    return None, None


def _insert_notice(decoded: bytes, notice: bytes, html: bool, nl: bytes) -> bytes:
    if html:
        closes = list(_BODY_CLOSE.finditer(decoded))
        if closes:
            at = closes[-1].start()
            return decoded[:at] + notice + decoded[at:]
    sep = b"" if not decoded or decoded.endswith(b"\n") else nl
    return decoded + sep + nl + notice


def _body_edits(raw: bytes, entity: Entity, notice_text: str, html: bool, edits: _Edits) -> bool:
    """Put the notice into one body part; False when that part cannot take it."""
    cte = entity.cte
    if cte not in _REENCODABLE:
        return False
    decoded = _decode_body(raw, entity)
    if decoded is None:
        return False
    charset = entity.params.param("charset") or "us-ascii"
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        return False
    if not _ascii_compatible(codec):
        return False
    nl = CRLF if CRLF in decoded or b"\n" not in decoded else b"\n"
    change_charset = False
    if html:
        notice = notice_text.encode(codec, errors="xmlcharrefreplace")
    else:
        try:
            notice = notice_text.encode(codec)
        except UnicodeEncodeError:
            notice = notice_text.encode("utf-8")
            change_charset = decoded.isascii()
    notice = notice.replace(b"\n", nl)
    new = _insert_notice(decoded, notice, html, nl)
    set_qp = False
    if cte == "base64":
        body = encode_base64(new)
    elif cte == "quoted-printable":
        body = encode_qp(new)
    elif cte in ("", "7bit") and needs_encoding(new):
        body = encode_qp(new)
        set_qp = True
    else:
        body = new
    if _collides(body, entity.ancestor_boundaries()):
        return False
    edits.replace(entity.body_start, entity.end, body)
    added: list[bytes] = []
    if change_charset:
        fields = entity.headers.get_all("content-type")
        for f in fields:
            old = raw[f.start : f.end]
            new_field, n = _CHARSET_PARAM.subn(rb"\1charset=utf-8", old, count=1)
            if not n:
                new_field = old[:-2].rstrip() + b"; charset=utf-8" + CRLF
            edits.replace(f.start, f.end, new_field)
        if not fields:
            kind = b"html" if html else b"plain"
            added.append(b"Content-Type: text/" + kind + b"; charset=utf-8" + CRLF)
    if set_qp:
        fields = entity.headers.get_all("content-transfer-encoding")
        for i, f in enumerate(fields):
            edits.replace(
                f.start, f.end, b"" if i else b"Content-Transfer-Encoding: quoted-printable\r\n"
            )
        if not fields:
            added.append(b"Content-Transfer-Encoding: quoted-printable\r\n")
    if added:
        edits.insert(entity.headers.end, b"".join(added))
    return True


def _new_boundary(raw: bytes) -> bytes:
    digest = hashlib.sha256(raw).hexdigest()[:24]
    for i in itertools.count():
        candidate = f"=_ag_{digest}_{i}".encode("ascii")
        if candidate not in raw:
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _notice_part(text: str, boundaries: Sequence[bytes]) -> bytes:
    data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    cte, body = (b"quoted-printable", encode_qp(data)) if needs_encoding(data) else (b"7bit", data)
    if _collides(body, boundaries):
        cte, body = b"base64", encode_base64(data)
    return (
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: " + cte + b"\r\n"
        b"Content-Disposition: inline\r\n\r\n" + body
    )


class Extraction:
    """What ``plan()`` found: the attachments to take out, in message order."""

    __slots__ = ("_raw", "_root", "_taken", "attachments")

    def __init__(self, raw: bytes, root: Entity, taken: list[tuple[Entity, Attachment]]) -> None:
        self._raw = raw
        self._root = root
        self._taken = taken
        self.attachments: list[Attachment] = [a for _, a in taken]

    def _removed(self) -> set[int]:
        removed = {id(e) for e, _ in self._taken}
        # A multipart left without parts goes too (never the top, never the
        # root of a forwarded message).
        for entity in reversed(list(self._root.walk())):
            parent = entity.parent
            if (
                entity.is_multipart
                and entity.children
                and parent is not None
                and parent.is_multipart
                and all(id(c) in removed for c in entity.children)
            ):
                removed.add(id(entity))
        return removed

    def render(self, notices: Sequence[LinkNotice], templates: Templates) -> bytes:
        """The new message: one notice per attachment, in the same order."""
        if len(notices) != len(self.attachments):
            raise RenderError(f"{len(notices)} notices for {len(self.attachments)} attachments")
        raw, root = self._raw, self._root
        text = templates.render_text(notices)
        edits = _Edits()
        removed = self._removed()
        content_fields = [f for f in root.headers.fields if f.name.startswith("content-")]
        lengths = [f for f in content_fields if f.name == "content-length"]
        emptied = (
            root.is_multipart
            and root.content_type != "multipart/mixed"
            and all(id(c) in removed for c in root.children)
        )
        if id(root) in removed or emptied:
            # Nothing of the old body is left to keep: the top becomes a
            # multipart/mixed holding only the notice.
            self._rewrap(edits, text, content_fields, keep_body=False)
            return edits.apply(raw)
        for entity in root.walk():
            if entity is root or id(entity) not in removed:
                continue
            if entity.parent is not None and id(entity.parent) not in removed:
                start, end = entity.removal_span()
                edits.replace(start, end, b"")
        for f in lengths:
            edits.replace(f.start, f.end, b"")
        plain, html = _find_bodies(root, removed)
        placed = False
        if plain is not None:
            placed |= _body_edits(raw, plain, text, False, edits)
        if html is not None:
            placed |= _body_edits(raw, html, templates.render_html(notices), True, edits)
        if not placed:
            if root.content_type == "multipart/mixed":
                at = root.delimiters[0] if root.delimiters else root.close_delimiter
                dash = b"--" + root.boundary
                edits.insert(at, dash + CRLF + _notice_part(text, [root.boundary]) + CRLF)
            else:
                self._rewrap(edits, text, content_fields, keep_body=True, skip=lengths)
        return edits.apply(raw)

    def _rewrap(
        self,
        edits: _Edits,
        text: str,
        content_fields: list[HeaderField],
        *,
        keep_body: bool,
        skip: Sequence[HeaderField] = (),
    ) -> None:
        """Make the top a multipart/mixed whose first part is the notice; with
        ``keep_body`` the old top entity (its Content-* fields and body) follows."""
        raw, root = self._raw, self._root
        boundary = _new_boundary(raw)
        dash = b"--" + boundary
        moved = b"".join(raw[f.start : f.end] for f in content_fields if f.name != "content-length")
        for f in content_fields:
            if f not in skip:
                edits.replace(f.start, f.end, b"")
        top = b""
        if root.headers.first("mime-version") is None:
            top += b"MIME-Version: 1.0\r\n"
        top += b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
        edits.insert(root.headers.end, top)
        first = dash + CRLF + _notice_part(text, [boundary]) + CRLF
        if keep_body:
            edits.insert(root.body_start, first + dash + CRLF + moved + CRLF)
            edits.insert(root.end, CRLF + dash + b"--" + CRLF)
        else:
            edits.replace(root.body_start, root.end, first + dash + b"--" + CRLF)
