"""Checks shared by the corpus tests and the property tests."""

from __future__ import annotations

import email
import email.message
import email.policy
import hashlib

from gateway.mime import Extraction
from gateway.mime.scan import Entity


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def email_payload(part: email.message.Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def email_leaves(msg: email.message.Message) -> list[email.message.Message]:
    return [p for p in msg.walk() if not p.is_multipart()]


def is_insertion(before: bytes, after: bytes) -> bool:
    """True when ``after`` is ``before`` with one run of bytes inserted (line
    ends may have become CRLF)."""
    before = before.replace(b"\r\n", b"\n")
    after = after.replace(b"\r\n", b"\n")
    k = 0
    limit = min(len(before), len(after))
    while k < limit and before[k] == after[k]:
        k += 1
    return len(after) >= len(before) and after.endswith(before[k:])


def _kept_in_order(raw: bytes, out: bytes, kept: list[Entity]) -> bool:
    """Each kept part's bytes appear in ``out`` in document order, except at
    most two text bodies (the ones that received the notice)."""
    memo: dict[tuple[int, int, int], bool] = {}

    def match(i: int, pos: int, changed: int) -> bool:
        if i == len(kept):
            return True
        key = (i, pos, changed)
        if key in memo:
            return memo[key]
        entity = kept[i]
        part = raw[entity.start : entity.end]
        ok = False
        found = out.find(part, pos)
        tries = 0
        while found >= 0 and tries < 8 and not ok:
            ok = match(i + 1, found + len(part), changed)
            found = out.find(part, found + 1)
            tries += 1
        if not ok and changed < 2 and entity.content_type in ("text/plain", "text/html"):
            ok = match(i + 1, pos, changed + 1)
        memo[key] = ok
        return ok

    return match(0, 0, 0)


def _path(entity: Entity) -> list[int]:
    """Child indexes from the top down to ``entity`` (a forwarded message is
    the only child of its message/rfc822 part)."""
    path: list[int] = []
    node = entity
    while node.parent is not None:
        parent = node.parent
        path.append(parent.children.index(node) if parent.is_multipart else 0)
        node = parent
    return path[::-1]


def _locate(msg: email.message.Message, path: list[int]) -> email.message.Message:
    """The email package's part at ``path``."""
    part = msg
    for i in path:
        payload = part.get_payload()
        assert isinstance(payload, list), "the email package sees another structure"
        assert i < len(payload), "the email package sees another structure"
        child = payload[i]
        assert isinstance(child, email.message.Message)
        part = child
    return part


def check_rendered(raw: bytes, extraction: Extraction, out: bytes, urls: list[str]) -> None:
    """The rewrite took out exactly the planned parts and left the rest alone."""
    taken = {id(e) for e, _ in extraction._taken}
    root: Entity = extraction._root
    kept = [
        e
        for e in root.walk()
        if not e.children and e.message is None and id(e) not in taken and e is not root
    ]
    assert _kept_in_order(raw, out, kept), "a part that was not taken out changed"

    before = parse(raw)
    after = parse(out)
    # Every URL is in the output.
    for url in urls:
        assert url.encode() in out or any(
            url.encode() in email_payload(p) for p in email_leaves(after)
        ), url

    # Taken-out data equals what the email package decodes for the same parts,
    # found by their place in the tree: parts with equal data, type and
    # Content-ID are told apart by where they are, not by what they hold.
    def key_of(part: email.message.Message) -> tuple[str, str, str]:
        cid = str(part.get("content-id", "")).strip()
        return sha(email_payload(part)), part.get_content_type(), cid

    taken_parts: list[email.message.Message] = []
    for entity, attachment in extraction._taken:
        part = _locate(before, _path(entity))
        cid_field = entity.field("content-id")
        cid = cid_field.value if cid_field is not None else ""
        wanted = (sha(attachment.data), attachment.content_type, cid)
        assert key_of(part) == wanted, "taken-out data differs from the email package's decoding"
        taken_parts.append(part)
    remaining = [p for p in email_leaves(before) if not any(p is t for t in taken_parts)]
    out_leaves = email_leaves(after)
    notice_parts = [p for p in out_leaves if urls and urls[0].encode() in email_payload(p)]
    assert notice_parts, "no part carries the notice"
    if len(out_leaves) == len(remaining) + 1:
        out_leaves = [p for p in out_leaves if p is not notice_parts[0]]
    assert len(out_leaves) == len(remaining)
    for old, new in zip(remaining, out_leaves, strict=True):
        assert old.get_content_type() == new.get_content_type()
        a, b = email_payload(old), email_payload(new)
        if a != b:
            assert old.get_content_maintype() == "text"
            assert is_insertion(a, b)
