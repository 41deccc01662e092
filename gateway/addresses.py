"""The strict envelope address parser.

Every address the gateway decides on (``MAIL FROM``, ``RCPT TO``, ``send_as`` lists,
control addresses) passes through :func:`parse_mailbox` or :func:`parse_reverse_path`.
The standard library's ``email.utils.parseaddr`` is never used to decide anything: it
accepts forms that other mail systems read differently (CVE-2023-27043).

The parser is deliberately narrower than RFC 5321. It refuses every form that has
ever been used to route mail through a relay behind its back: the percent hack
(``user%remote@local``), bang paths (``remote!user``), a quoted local part that holds
an ``@`` or ``%`` or ``!``, address literals (``user@[192.0.2.1]``), a trailing dot
and more than one ``@``. A source route (``@a,@b:user@host``) is parsed, checked and
dropped; the result says that it was there (``had_route``) so that the caller can
refuse routed recipients.

Exceptions::

    ValueError
     └── AddressError      the text is not an acceptable mailbox; str() is the reason

All functions here are pure.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Final

import idna

__all__ = [
    "MAX_DOMAIN_OCTETS",
    "MAX_LABEL_OCTETS",
    "MAX_LOCAL_OCTETS",
    "MAX_MAILBOX_OCTETS",
    "MAX_PATH_OCTETS",
    "Address",
    "AddressError",
    "domain_matches",
    "parse_mailbox",
    "parse_reverse_path",
]

MAX_LOCAL_OCTETS: Final = 64
MAX_DOMAIN_OCTETS: Final = 253
MAX_LABEL_OCTETS: Final = 63
MAX_MAILBOX_OCTETS: Final = 254
# RFC 5321 4.5.3.1.3: a path, with its punctuation and any source route, fits in 256
# octets; the angle brackets are allowed on top of that.
MAX_PATH_OCTETS: Final = 256 + 2

# RFC 5321 atext less "%" and "!" (refused with their own reasons before this is used).
_ATEXT: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$&'*+-/=?^_`{|}~"
)
_LDH: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_DIGITS: Final = frozenset("0123456789")


class AddressError(ValueError):
    """The text is not an acceptable mailbox; ``str(exc)`` is a short reason."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox that passed the strict parser.

    ``local`` is the local part as given (case and any quoting preserved); ``domain`` is
    lower-case ASCII, with internationalised labels as IDNA A-labels.
    """

    local: str
    domain: str
    had_route: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Canonical lookup key: the local part lower-cased, then ``@``, then the domain.

        A quoted local part whose content is a plain dot-atom (``"user"``) is keyed
        without its quotes, so it cannot slip past a lookup made with the plain form.
        """
        return f"{_canonical_local(self.local).lower()}@{self.domain}"


def parse_mailbox(text: str, *, smtputf8: bool = False) -> Address:
    """Parse one mailbox, bare (``user@example.com``) or in angle brackets.

    A source route in front of the mailbox is checked and dropped; the result then has
    ``had_route=True``. Raises :class:`AddressError` for anything else that is not a
    plain, unambiguous mailbox. Non-ASCII is accepted only with ``smtputf8=True``.
    """
    inner = _strip_path(text)
    if not inner:
        raise AddressError("empty address")
    had_route = False
    if inner.startswith("@"):
        inner = _strip_route(inner, smtputf8=smtputf8)
        had_route = True
        if not inner:
            raise AddressError("source route without a mailbox")
    local, domain_text = _split_mailbox(inner)
    # The local part is judged first so that a relay trick is named as such even
    # when the text has no usable domain ("remote!user", "\"user@remote\"").
    _check_local(local, smtputf8=smtputf8)
    if domain_text is None:
        raise AddressError("missing @")
    domain = _to_domain(domain_text, smtputf8=smtputf8)
    address = Address(local=local, domain=domain, had_route=had_route)
    if _octets(str(address)) > MAX_MAILBOX_OCTETS:
        raise AddressError("address too long")
    return address


def parse_reverse_path(text: str, *, smtputf8: bool = False) -> Address | None:
    """Parse the argument of ``MAIL FROM``: ``""`` or ``"<>"`` is the null sender (None).

    Anything else must be a mailbox as :func:`parse_mailbox` accepts it.
    """
    if text in ("", "<>"):
        return None
    return parse_mailbox(text, smtputf8=smtputf8)


def domain_matches(domain: str, pattern: str) -> bool:
    """Tell whether ``domain`` is covered by ``pattern``, ignoring case.

    A pattern names one domain exactly; a pattern with a leading dot
    (``.example.com``) names every subdomain of it but not the domain itself.
    An empty domain or pattern, or a pattern that is just ``"."``, matches nothing.
    """
    domain = domain.lower()
    pattern = pattern.lower()
    if not domain or not pattern or pattern == ".":
        return False
    if pattern.startswith("."):
        return len(domain) > len(pattern) and domain.endswith(pattern)
    return domain == pattern


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_characters(text: str) -> None:
    """Refuse characters that have no place anywhere in a path."""
    for char in text:
        if char == "\x00":
            raise AddressError("NUL in address")
        if char in "\r\n":
            raise AddressError("CR or LF in address")
        category = unicodedata.category(char)
        if category == "Cc":
            raise AddressError("control character in address")
        if category == "Cs":
            raise AddressError("invalid character in address")


def _strip_path(text: str) -> str:
    """Check the path as a whole and remove one pair of angle brackets."""
    if _octets(text) > MAX_PATH_OCTETS:
        raise AddressError("address too long")
    _check_characters(text)
    if text and (text[0].isspace() or text[-1].isspace()):
        raise AddressError("whitespace around address")
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise AddressError("unbalanced angle brackets")
        return text[1:-1]
    if text.endswith(">"):
        raise AddressError("unbalanced angle brackets")
    return text


def _strip_route(text: str, *, smtputf8: bool) -> str:
    """Check an RFC 5321 source route (``@a,@b:``) at the start of ``text``; drop it."""
    route, colon, rest = text.partition(":")
    if not colon:
        raise AddressError("malformed source route")
    for hop in route.split(","):
        if not hop.startswith("@") or len(hop) == 1:
            raise AddressError("malformed source route")
        try:
            _to_domain(hop[1:], smtputf8=smtputf8)
        except AddressError as exc:
            raise AddressError(f"malformed source route: {exc}") from exc
    return rest


def _split_mailbox(text: str) -> tuple[str, str | None]:
    """Split at the one ``@`` outside a quoted local part; the domain is None without one."""
    if text.startswith('"'):
        end = _quoted_end(text)
        local, rest = text[:end], text[end:]
        if not rest:
            return local, None
        if not rest.startswith("@"):
            raise AddressError("text after quoted local part")
        domain = rest[1:]
        if "@" in domain:
            raise AddressError("more than one @")
        return local, domain
    count = text.count("@")
    if count == 0:
        return text, None
    if count > 1:
        raise AddressError("more than one @")
    local, _, domain = text.partition("@")
    return local, domain


def _quoted_end(text: str) -> int:
    """Index just past the closing quote of the quoted string at the start of ``text``."""
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        index += 1
    raise AddressError("unterminated quoted local part")


def _check_local(local: str, *, smtputf8: bool) -> None:
    if not local:
        raise AddressError("empty local part")
    if _octets(local) > MAX_LOCAL_OCTETS:
        raise AddressError("local part too long")
    if local.startswith('"'):
        _check_quoted_local(local, smtputf8=smtputf8)
    else:
        _check_dot_atom_local(local, smtputf8=smtputf8)


def _check_non_ascii(char: str, *, smtputf8: bool, where: str) -> None:
    if not smtputf8:
        raise AddressError(f"non-ASCII {where} needs SMTPUTF8")
    # Format characters (bidi overrides, zero-width joiners), separators and private or
    # unassigned code points only ever serve to make two addresses look alike.
    if unicodedata.category(char)[0] in "CZ":
        raise AddressError(f"invalid character in {where}")


def _check_dot_atom_local(local: str, *, smtputf8: bool) -> None:
    if "%" in local:
        raise AddressError("percent hack in local part")
    if "!" in local:
        raise AddressError("bang path in local part")
    if " " in local:
        raise AddressError("space in local part")
    if local.startswith(".") or local.endswith("."):
        raise AddressError("dot at start or end of local part")
    if ".." in local:
        raise AddressError("two dots in a row in local part")
    for char in local:
        if char in _ATEXT or char == ".":
            continue
        if ord(char) >= 0x80:
            _check_non_ascii(char, smtputf8=smtputf8, where="local part")
            continue
        raise AddressError(f"character {char!r} not allowed in local part")


def _quoted_content(local: str) -> str:
    """The content of a quoted local part with its quoted pairs resolved."""
    body = local[1:-1]
    content: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            if index + 1 >= len(body):
                raise AddressError("unterminated quoted local part")
            char = body[index + 1]
            index += 1
        elif char == '"':
            raise AddressError("unescaped quote in local part")
        content.append(char)
        index += 1
    return "".join(content)


def _check_quoted_local(local: str, *, smtputf8: bool) -> None:
    if len(local) < 2 or not local.endswith('"'):
        raise AddressError("unterminated quoted local part")
    content = _quoted_content(local)
    if not content:
        raise AddressError("empty local part")
    if "@" in content:
        raise AddressError("@ in quoted local part")
    if "%" in content:
        raise AddressError("percent hack in quoted local part")
    if "!" in content:
        raise AddressError("bang path in quoted local part")
    for char in content:
        if ord(char) >= 0x80:
            _check_non_ascii(char, smtputf8=smtputf8, where="local part")
        # Every other character left here is printable ASCII (controls were refused
        # for the whole path), which RFC 5321 allows in a quoted string.


def _canonical_local(local: str) -> str:
    """The plainest spelling of a local part: unquoted when its content is a dot-atom."""
    if not local.startswith('"'):
        return local
    content = _quoted_content(local)
    atoms = content.split(".")
    if all(atoms) and all(char in _ATEXT or ord(char) >= 0x80 for char in content if char != "."):
        return content
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _to_domain(text: str, *, smtputf8: bool) -> str:
    """Check a domain and return it lower-case, with A-labels for any non-ASCII label."""
    if not text:
        raise AddressError("empty domain")
    if text.startswith("["):
        raise AddressError("address literal not allowed")
    if text.endswith("."):
        raise AddressError("trailing dot in domain")
    labels = text.split(".")
    if len(labels) < 2:
        raise AddressError("domain needs at least two labels")
    converted = [_to_label(label, smtputf8=smtputf8) for label in labels]
    if set(converted[-1]) <= _DIGITS:
        raise AddressError("numeric top-level domain")
    domain = ".".join(converted)
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    return domain


def _to_label(label: str, *, smtputf8: bool) -> str:
    if not label:
        raise AddressError("empty label in domain")
    if not label.isascii():
        if not smtputf8:
            raise AddressError("non-ASCII domain needs SMTPUTF8")
        try:
            label = idna.encode(label.lower()).decode("ascii")
        except UnicodeError as exc:
            raise AddressError("domain label is not valid IDNA") from exc
    label = label.lower()
    if len(label) > MAX_LABEL_OCTETS:
        raise AddressError("domain label too long")
    if not set(label) <= _LDH:
        raise AddressError("character not allowed in domain")
    if label.startswith("-") or label.endswith("-"):
        raise AddressError("hyphen at start or end of domain label")
    return label
