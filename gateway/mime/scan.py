"""The byte-level part scanner.

``scan_message`` finds the structure of a message as offsets into its bytes:
where each entity's headers and body are, where the delimiter lines of each
multipart are, and (when asked) the entities of forwarded ``message/rfc822``
parts. Nothing is decoded or copied; the caller decides what to change.

Delimiter lines follow RFC 2046: ``--boundary`` at the start of a line,
optionally ``--`` for the close delimiter, then optional linear white space,
then CRLF. The CRLF before a delimiter line belongs to the delimiter. A
multipart is scanned top-down, so a line of an inner part that matches an
outer boundary ends the outer part there, as the RFC requires; whatever that
leaves broken inside (a missing close delimiter, say) is reported as a
``StructureError`` instead of being guessed at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.mime.errors import LimitExceeded, Protected, ScanError, StructureError
from gateway.mime.headers import (
    CRLF,
    HeaderBlock,
    HeaderField,
    Params,
    content_id_of,
    content_type_of,
    cte_of,
    parse_header_block,
)

_PROTECTED = {
    "multipart/signed": "signed",
    "multipart/encrypted": "encrypted",
    "application/pkcs7-mime": "encrypted",
    "application/x-pkcs7-mime": "encrypted",
    "application/pgp-encrypted": "encrypted",
}
# A body we can look into as a message: no transfer encoding to undo.
_IDENTITY_CTES = frozenset({"", "7bit", "8bit", "binary"})
_MAX_BOUNDARY = 998


@dataclass(eq=False, slots=True)
class Entity:
    """One MIME entity (a message or a body part) located in the raw bytes.

    ``start``/``end`` span the entity's content: for a body part that excludes
    the CRLF that belongs to the next delimiter line.
    """

    start: int
    end: int
    headers: HeaderBlock
    content_type: str
    params: Params
    cte: str
    disposition: str
    content_id: str
    depth: int
    index: int  # document order among all scanned entities
    parent: Entity | None = None
    # multipart: children and the line starts of their delimiter lines
    boundary: bytes = b""
    children: list[Entity] = field(default_factory=list)
    delimiters: list[int] = field(default_factory=list)
    close_delimiter: int = -1
    # message/rfc822 scanned because nested linking is on
    message: Entity | None = None

    @property
    def body_start(self) -> int:
        return self.headers.body_start

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    @property
    def maintype(self) -> str:
        return self.content_type.split("/", 1)[0]

    def field(self, name: str) -> HeaderField | None:
        return self.headers.first(name)

    def removal_span(self) -> tuple[int, int]:
        """Bytes to delete to take this part out of its multipart: its delimiter
        line, its content and the CRLF that belongs to the next delimiter."""
        parent = self.parent
        if parent is None or not parent.is_multipart:
            raise ValueError("only a part of a multipart can be removed")
        i = parent.children.index(self)
        nxt = parent.delimiters[i + 1] if i + 1 < len(parent.children) else parent.close_delimiter
        return parent.delimiters[i], nxt

    def ancestor_boundaries(self) -> list[bytes]:
        """The boundaries of every multipart this entity sits in, innermost first."""
        found: list[bytes] = []
        node = self.parent
        while node is not None:
            if node.boundary:
                found.append(node.boundary)
            node = node.parent
        return found

    def walk(self) -> Iterator[Entity]:
        yield self
        for child in self.children:
            yield from child.walk()
        if self.message is not None:
            yield from self.message.walk()


@dataclass(slots=True)
class _State:
    raw: bytes
    max_depth: int
    max_parts: int
    max_header_size: int
    nested: bool
    count: int = 0


def scan_message(
    raw: bytes,
    *,
    max_depth: int,
    max_parts: int,
    max_header_size: int,
    nested: bool,
) -> Entity:
    """Scan a whole message. Raises ``StructureError``, ``LimitExceeded`` or
    ``Protected`` (signed or encrypted content outside forwarded messages)."""
    state = _State(raw, max_depth, max_parts, max_header_size, nested)
    return _scan_entity(state, 0, len(raw), depth=0, parent=None, default_type="text/plain")


def _single(block: HeaderBlock, name: str) -> str | None:
    found = block.get_all(name)
    if not found:
        return None
    first = found[0].value
    for other in found[1:]:
        if " ".join(other.value.split()).lower() != " ".join(first.split()).lower():
            raise StructureError(f"duplicate-{name}")
    return first


def _scan_entity(
    state: _State, start: int, end: int, *, depth: int, parent: Entity | None, default_type: str
) -> Entity:
    if depth > state.max_depth:
        raise LimitExceeded("depth")
    state.count += 1
    if state.count > state.max_parts:
        raise LimitExceeded("parts")
    is_message = parent is None or not parent.is_multipart
    block = parse_header_block(
        state.raw, start, end, max_size=state.max_header_size, allow_mbox_from=is_message
    )
    ct_value = _single(block, "content-type")
    cd_value = _single(block, "content-disposition")
    ctype = content_type_of(ct_value, default_type)
    params = Params(ct_value, cd_value)
    entity = Entity(
        start=start,
        end=end,
        headers=block,
        content_type=ctype,
        params=params,
        cte=cte_of(_single(block, "content-transfer-encoding")),
        disposition=params.disposition(),
        content_id=content_id_of(_single(block, "content-id")),
        depth=depth,
        index=state.count - 1,
        parent=parent,
    )
    if ctype in _PROTECTED:
        raise Protected(_PROTECTED[ctype])
    if entity.is_multipart:
        _scan_multipart(state, entity)
    elif ctype == "message/rfc822" and state.nested and entity.cte in _IDENTITY_CTES:
        _scan_forwarded(state, entity)
    return entity


def _scan_forwarded(state: _State, entity: Entity) -> None:
    """Look into a forwarded message; one we cannot read safely stays opaque."""
    count = state.count
    try:
        entity.message = _scan_entity(
            state,
            entity.body_start,
            entity.end,
            depth=entity.depth + 1,
            parent=entity,
            default_type="text/plain",
        )
    except LimitExceeded:
        raise
    except ScanError:
        state.count = count
        entity.message = None


def _boundary_of(entity: Entity) -> bytes:
    value = entity.params.param("boundary")
    if not value:
        raise StructureError("no-boundary")
    if value != value.rstrip() or len(value) > _MAX_BOUNDARY:
        raise StructureError("bad-boundary")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise StructureError("bad-boundary") from exc


def _delimiter_end(raw: bytes, line_start: int, dash_len: int, end: int) -> tuple[int, bool]:
    """If a delimiter line starts at ``line_start`` (its ``--boundary`` already
    matched), return (offset after the line, is_close); else (-1, False)."""
    k = line_start + dash_len
    is_close = raw.startswith(b"--", k, end)
    if is_close:
        k += 2
    while k < end and raw[k] in (0x20, 0x09):
        k += 1
    if k == end:
        return end, is_close
    if raw.startswith(CRLF, k, end):
        return k + 2, is_close
    return -1, False


def _scan_multipart(state: _State, entity: Entity) -> None:
    raw = state.raw
    boundary = _boundary_of(entity)
    ancestor = entity.parent
    while ancestor is not None:
        if ancestor.boundary == boundary:
            raise StructureError("boundary-clash")
        ancestor = ancestor.parent
    entity.boundary = boundary
    dash = b"--" + boundary
    crlf_dash = CRLF + dash
    begin, end = entity.body_start, entity.end
    opens: list[tuple[int, int]] = []  # (line start, line end)
    close = -1
    pos = begin
    candidate = begin if raw.startswith(dash, begin, end) else -1
    while True:
        if candidate < 0:
            hit = raw.find(crlf_dash, pos, end)
            if hit < 0:
                break
            candidate = hit + 2
        line_end, is_close = _delimiter_end(raw, candidate, len(dash), end)
        if line_end >= 0:
            if is_close:
                close = candidate
                break
            opens.append((candidate, line_end))
            pos = line_end - 2 if line_end - 2 >= candidate else line_end
        else:
            pos = candidate + 1
        candidate = -1
    if close < 0:
        raise StructureError("missing-close-delimiter" if opens else "boundary-not-found")
    entity.close_delimiter = close
    default = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
    for i, (line_start, line_end) in enumerate(opens):
        nxt = opens[i + 1][0] if i + 1 < len(opens) else close
        part_end = max(line_end, nxt - 2)
        entity.delimiters.append(line_start)
        child = _scan_entity(
            state,
            line_end,
            part_end,
            depth=entity.depth + 1,
            parent=entity,
            default_type=default,
        )
        entity.children.append(child)
