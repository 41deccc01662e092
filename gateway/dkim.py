"""DKIM signing of outgoing mail: dkimpy's canonicalisation, ``cryptography``'s RSA and Ed25519.

dkimpy does the RFC 6376 work (parsing the header block, relaxed canonicalisation of
headers and body, selecting the signed header instances, folding the signature header).
Its private-key operation is pure Python (``pow`` on big integers) and costs most of the
time of a signature, so the one step that uses the private key is done here with the
``cryptography`` package instead.

Why not subclass ``dkim.DKIM``: the RSA operation sits in the middle of
``DomainSigner.gen_header`` as a call to a module-level function, with header building
before and after it, so there is no single method to override without rewriting that
method; and ``DKIM.sign`` takes ``t=`` from ``time.time()`` and cannot write ``x=``,
while we need a controllable clock and an expiry. So this module builds the tag list
itself and hands every RFC 6376 step to dkimpy's own helpers (``rfc822_parse``,
``CanonicalizationPolicy``, ``hash_headers``, ``fold``) in the same order as
``DKIM.sign``; only the digest is signed here. The result is byte-for-byte what
``dkim.sign`` produces for the same message, key, header list and timestamp (RSA
PKCS#1 v1.5 and Ed25519 are deterministic), which the tests check.

Header choices (RFC 6376 §5.4, §5.4.2, §8.15): From, Date, Message-ID, Subject, To,
Cc, Reply-To, MIME-Version, Content-Type, Content-Transfer-Encoding, In-Reply-To and
References are signed when present. Every one of them may appear at most once in a
message (RFC 5322 §3.6 for the first nine and the last two, RFC 2045 for the MIME
fields; To and Cc are single fields holding a list of addresses), so when oversigning
is on each one present is listed once more than it occurs: a copy added on the way
then breaks the signature instead of being shown to the reader. Absent fields are not
listed, so a relay may still add, say, a Reply-To without breaking the signature.

Exceptions::

    DkimError                    root of everything raised here
    ├── DkimKeyError             a key cannot be used (unreadable, wrong format, bad name)
    │   ├── KeyTooSmallError     RSA key shorter than 1024 bits (RFC 8301)
    │   └── KeyFileExistsError   write_private_key would overwrite (also FileExistsError)
    └── DuplicateHeaderError     a singleton header field occurs twice; names the field
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

__all__ = [
    "DkimError",
    "DkimKey",
    "DkimKeyError",
    "DuplicateHeaderError",
    "KeyFileExistsError",
    "KeyTooSmallError",
    "SignOptions",
    "Signer",
    "author_domain",
    "dns_txt_chunks",
    "generate_key",
    "load_key",
    "public_txt_record",
    "with_header_separator",
    "write_private_key",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 1024
RECOMMENDED_RSA_BITS = 2048

#: Header fields signed when present, in the order they are listed in ``h=``.
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "date",
    "message-id",
    "subject",
    "to",
    "cc",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "in-reply-to",
    "references",
)

#: Fields whose duplicates are refused when ``SignOptions.refuse_duplicates`` is set.
DUPLICATE_CHECKED: tuple[str, ...] = ("from", "subject", "date", "message-id")

_DISPLAY_NAMES = {
    "from": "From",
    "subject": "Subject",
    "date": "Date",
    "message-id": "Message-ID",
}

_SIG_NAME = b"DKIM-Signature"
_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_B64_PLACEHOLDER = b"0" * 60


class DkimError(Exception):
    """Root of every error raised by the DKIM module."""


class DkimKeyError(DkimError):
    """A private key cannot be used: unreadable, unsupported, malformed or misnamed."""


class KeyTooSmallError(DkimKeyError):
    """An RSA key shorter than 1024 bits; receivers must not accept it (RFC 8301)."""


class KeyFileExistsError(DkimKeyError, FileExistsError):
    """``write_private_key`` refuses to replace an existing file."""


class DuplicateHeaderError(DkimError):
    """A header field that must occur once occurs more often; ``header`` names it."""

    def __init__(self, header: str, count: int) -> None:
        super().__init__(f"message has {count} {header} header fields; refusing to sign")
        self.header = header
        self.count = count


def _check_name(kind: str, value: str) -> str:
    """A lower-cased DNS name of LDH labels, or DkimKeyError naming ``kind``."""
    name = value.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
        raise DkimKeyError(f"invalid DKIM {kind} {value!r}")
    return name


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: ``d=`` domain, ``s=`` selector, algorithm and PKCS#8 PEM."""

    domain: str
    selector: str
    algorithm: Algorithm
    private_pem: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", _check_name("domain", self.domain))
        object.__setattr__(self, "selector", _check_name("selector", self.selector))
        if self.algorithm not in ("rsa-sha256", "ed25519-sha256"):
            raise DkimKeyError(f"unsupported DKIM algorithm {self.algorithm!r}")


@dataclass(frozen=True)
class SignOptions:
    """How signatures are made.

    ``oversign``: list each signed singleton field once more than it occurs (see the
    module docstring). ``expire_after``: seconds until the signature expires (``x=``),
    or None for no expiry. ``refuse_duplicates``: raise DuplicateHeaderError for a
    message with two From, Subject, Date or Message-ID fields instead of signing it.
    """

    oversign: bool = True
    expire_after: float | None = None
    refuse_duplicates: bool = True

    def __post_init__(self) -> None:
        if self.expire_after is not None and not self.expire_after > 0:
            raise ValueError(f"expire_after must be positive, got {self.expire_after!r}")


# -- keys ----------------------------------------------------------------------------------


def _pkcs8_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _parse_private_key(data: bytes, origin: str) -> PrivateKey:
    """PEM (PKCS#1 or PKCS#8) RSA/Ed25519, or dkimpy's base64 Ed25519 seed."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise DkimKeyError(f"{origin}: the private key is encrypted") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise DkimKeyError(f"{origin}: not a usable PEM private key") from exc
    else:
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error as exc:
            raise DkimKeyError(f"{origin}: neither PEM nor a base64 Ed25519 seed") from exc
        if len(seed) != 32:
            raise DkimKeyError(f"{origin}: neither PEM nor a base64 Ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyTooSmallError(
                f"{origin}: RSA key of {key.key_size} bits is too small "
                f"(at least {MIN_RSA_BITS}, RFC 8301)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{origin}: {type(key).__name__} keys cannot sign DKIM (RSA or Ed25519)")


def _algorithm_of(key: PrivateKey) -> Algorithm:
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def _mode_warning(path: Path, mode: int) -> str | None:
    perms = stat.S_IMODE(mode)
    if not perms & 0o077:
        return None
    if perms & 0o004:
        who = "readable by others"
    elif perms & 0o040:
        who = "readable by its group"
    else:
        who = "accessible to group or others"
    return f"key file {path} is {who} (mode {perms:04o}); chmod 600"


def load_key(domain: str, selector: str, path: Path) -> tuple[DkimKey, list[str]]:
    """Read a private key file; return the key and warnings for the administrator.

    Raises DkimKeyError (naming the file) for an unreadable, unsupported or too small key.
    """
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except OSError as exc:
        raise DkimKeyError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    key = _parse_private_key(data, f"key file {path}")
    warnings: list[str] = []
    mode_warning = _mode_warning(path, mode)
    if mode_warning is not None:
        warnings.append(mode_warning)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < RECOMMENDED_RSA_BITS:
        warnings.append(
            f"key file {path} holds a {key.key_size}-bit RSA key; "
            f"{RECOMMENDED_RSA_BITS} bits are recommended (RFC 8301)"
        )
    dkim_key = DkimKey(
        domain=domain, selector=selector, algorithm=_algorithm_of(key), private_pem=_pkcs8_pem(key)
    )
    return dkim_key, warnings


def public_txt_record(private_pem: bytes) -> str:
    """The DNS TXT value publishing the public half of ``private_pem``."""
    key = _parse_private_key(private_pem, "private key")
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")


def generate_key(algorithm: Literal["rsa", "ed25519"], bits: int = 2048) -> tuple[bytes, str]:
    """A new private key as PKCS#8 PEM and the TXT record value that publishes it."""
    key: PrivateKey
    if algorithm == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits, got {bits}")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}")
    pem = _pkcs8_pem(key)
    return pem, public_txt_record(pem)


def dns_txt_chunks(value: str, size: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most ``size`` bytes (RFC 1035 §3.3)."""
    raw = value.encode("ascii")
    if not raw:
        return [""]
    return [raw[i : i + size].decode("ascii") for i in range(0, len(raw), size)]


def write_private_key(path: Path, pem: bytes) -> None:
    """Write ``pem`` to a new file created with mode 0600; never replace an existing one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileExistsError(f"key file {path} exists; not overwriting it") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


# -- the author's domain -------------------------------------------------------------------

_SPECIALS = frozenset('()<>[]:;@\\,."')
_Token = tuple[str, str]


def _tokens(text: str) -> list[_Token] | None:
    """RFC 5322 lexical tokens of a header value; comments dropped; None if malformed."""
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            depth = 0
            while i < n:
                c = text[i]
                if c == "\\":
                    i += 2
                    continue
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= n:
                return None
            i += 1
        elif ch == '"':
            j = i + 1
            buf: list[str] = []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                return None
            out.append(("quoted", "".join(buf)))
            i = j + 1
        elif ch == "[":
            j = text.find("]", i)
            if j < 0:
                return None
            out.append(("literal", text[i : j + 1]))
            i = j + 1
        elif ch in _SPECIALS:
            if ch in ")]\\":
                return None
            out.append(("special", ch))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            out.append(("atom", text[i:j]))
            i = j
    return out


def _split_mailboxes(tokens: list[_Token]) -> list[list[_Token]] | None:
    """Split at top-level commas; None for groups or unbalanced angle brackets."""
    boxes: list[list[_Token]] = [[]]
    in_angle = False
    for token in tokens:
        if token == ("special", "<"):
            if in_angle:
                return None
            in_angle = True
        elif token == ("special", ">"):
            if not in_angle:
                return None
            in_angle = False
        elif not in_angle and token in (("special", ":"), ("special", ";")):
            return None
        elif not in_angle and token == ("special", ","):
            boxes.append([])
            continue
        boxes[-1].append(token)
    if in_angle:
        return None
    return [box for box in boxes if box]


def _domain_of_addr_spec(tokens: list[_Token]) -> str | None:
    ats = [k for k, token in enumerate(tokens) if token == ("special", "@")]
    if len(ats) != 1:
        return None
    local, domain = tokens[: ats[0]], tokens[ats[0] + 1 :]
    if not local or not domain:
        return None
    if any(kind == "special" and value != "." for kind, value in local):
        return None
    if any(kind not in ("atom", "special") for kind, _ in domain):
        return None
    if any(kind == "special" and value != "." for kind, value in domain):
        return None
    name = "".join(value for _, value in domain).lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(p) for p in labels):
        return None
    return name


def author_domain(value: bytes) -> str | None:
    """The domain of the single mailbox in a From header value, lower-cased (A-labels).

    Accepts display names (atoms, quoted strings, RFC 2047 encoded words), comments and
    an obsolete route in the angle address. Returns None for no address, several
    addresses, a group, a domain literal or anything that does not parse.
    """
    tokens = _tokens(value.decode("utf-8", "replace"))
    if tokens is None:
        return None
    boxes = _split_mailboxes(tokens)
    if boxes is None or len(boxes) != 1:
        return None
    box = boxes[0]
    if ("special", "<") in box:
        start = box.index(("special", "<"))
        end = box.index(("special", ">"))
        phrase, addr, rest = box[:start], box[start + 1 : end], box[end + 1 :]
        if rest or any(kind == "special" and v != "." for kind, v in phrase):
            return None
        if ("special", ":") in addr:
            # obs-route: "<@relay1,@relay2:user@example.com>"
            last = len(addr) - 1 - addr[::-1].index(("special", ":"))
            addr = addr[last + 1 :]
        return _domain_of_addr_spec(addr)
    return _domain_of_addr_spec(box)


# -- the header block ----------------------------------------------------------------------

_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def with_header_separator(message: bytes) -> bytes:
    """``message`` with the empty line between header and body where a writer left it out.

    A line in the header block that is neither a field, a continuation nor a leading
    mbox ``From `` line starts the body, as RFC 5322 readers (Python's email package,
    mime4j) take it; a verifier cannot parse the header block otherwise. The message is
    returned unchanged when its header block is well formed.
    """
    offset = 0
    first = True
    while offset < len(message):
        stop = message.find(b"\n", offset)
        stop = len(message) if stop < 0 else stop + 1
        content = message[offset:stop].rstrip(b"\r\n")
        if not content:
            return message
        well_formed = (
            _FIELD_START.match(content) is not None
            or (not first and content[:1] in (b" ", b"\t"))
            or (first and content.startswith(b"From "))
        )
        if not well_formed:
            newline = (
                b"\n"
                if message[stop - 2 : stop] != b"\r\n" and message[stop - 1 : stop] == b"\n"
                else b"\r\n"
            )
            return message[:offset] + newline + message[offset:]
        offset = stop
        first = False
    return message


# -- signing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LoadedKey:
    selector: bytes
    algorithm: Algorithm
    key: PrivateKey


def _signature_value(key: PrivateKey, digest: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return key.sign(digest)


class Signer:
    """Signs messages for the configured domains; immutable after construction.

    ``sign`` keeps all state in local variables, so one Signer serves many executor
    threads at once.
    """

    def __init__(
        self,
        keys: Sequence[DkimKey],
        options: SignOptions = SignOptions(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        by_domain: dict[str, list[_LoadedKey]] = {}
        for entry in keys:
            origin = f"key {entry.selector}._domainkey.{entry.domain}"
            loaded = _parse_private_key(entry.private_pem, origin)
            if _algorithm_of(loaded) != entry.algorithm:
                raise DkimKeyError(f"{origin}: the key is not an {entry.algorithm} key")
            by_domain.setdefault(entry.domain, []).append(
                _LoadedKey(entry.selector.encode("ascii"), entry.algorithm, loaded)
            )
        self._keys: dict[str, tuple[_LoadedKey, ...]] = {
            domain: tuple(found) for domain, found in by_domain.items()
        }
        self._options = options
        self._clock = clock

    def domains(self) -> set[str]:
        """The domains this signer has at least one key for."""
        return set(self._keys)

    def sign(self, message: bytes) -> bytes:
        """``message`` with one DKIM-Signature per key of its author's domain prepended.

        Returned unchanged when the From field names no single mailbox or its domain has
        no key. Raises DuplicateHeaderError (when refusing duplicates). A header block
        that lacks the empty line before the body gets it (see with_header_separator)
        in the returned message.
        """
        original = message
        message = with_header_separator(message)
        # Parses: with_header_separator ended the header block at the first line that
        # is not a field, a continuation or a leading mbox "From " line.
        headers, body = dkim.rfc822_parse(message)
        headers = cast("list[list[bytes]]", headers)
        counts: dict[str, int] = {}
        from_values: list[bytes] = []
        for name, value in headers:
            lname = name.decode("ascii").lower()
            counts[lname] = counts.get(lname, 0) + 1
            if lname == "from":
                from_values.append(value)
        domains = {author_domain(value) for value in from_values}
        if not any(d in self._keys for d in domains if d is not None):
            return original
        if self._options.refuse_duplicates:
            for lname in DUPLICATE_CHECKED:
                if counts.get(lname, 0) > 1:
                    raise DuplicateHeaderError(_DISPLAY_NAMES[lname], counts[lname])
        if len(domains) != 1:
            return original
        (domain,) = domains
        if domain is None:
            return original
        keys = self._keys[domain]

        include: list[bytes] = []
        for lname in SIGNED_HEADERS:
            present = counts.get(lname, 0)
            if present:
                include.extend(
                    [lname.encode("ascii")] * (present + (1 if self._options.oversign else 0))
                )

        now = int(self._clock())
        expires = (
            None
            if self._options.expire_after is None
            else now + max(1, math.ceil(self._options.expire_after))
        )
        body_hash = base64.b64encode(hashlib.sha256(_CANON.canonicalize_body(body)).digest())
        canonical_headers = _CANON.canonicalize_headers(headers)
        prepared = _Prepared(
            domain=domain.encode("ascii"),
            now=now,
            expires=expires,
            include=tuple(include),
            body_hash=body_hash,
            canonical_headers=canonical_headers,
        )
        lines = [_signature_header(entry, prepared) for entry in keys]
        return b"".join(lines) + message


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What every signature of one message shares."""

    domain: bytes
    now: int
    expires: int | None
    include: tuple[bytes, ...]
    body_hash: bytes
    canonical_headers: object


def _signature_header(entry: _LoadedKey, prepared: _Prepared) -> bytes:
    """One complete ``DKIM-Signature: ...\\r\\n`` line, folded as dkimpy folds it."""
    fields: list[tuple[bytes, bytes]] = [
        (b"v", b"1"),
        (b"a", entry.algorithm.encode("ascii")),
        (b"c", b"relaxed/relaxed"),
        (b"d", prepared.domain),
        (b"i", b"@" + prepared.domain),
        (b"q", b"dns/txt"),
        (b"s", entry.selector),
        (b"t", str(prepared.now).encode("ascii")),
    ]
    if prepared.expires is not None:
        fields.append((b"x", str(prepared.expires).encode("ascii")))
    fields += [
        (b"h", b" : ".join(prepared.include)),
        (b"bh", prepared.body_hash),
        # A placeholder b= of fixed length makes the folding of every tag before it
        # the same in the hashed and in the final header.
        (b"b", _B64_PLACEHOLDER),
    ]
    namelen = len(_SIG_NAME)
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=namelen)
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher,
        _CANON,
        prepared.canonical_headers,
        list(prepared.include),
        (_SIG_NAME, b" " + unsigned),
        {},
    )
    signature = _signature_value(entry.key, hasher.digest())
    fields[-1] = (b"b", base64.b64encode(signature))
    joined = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
    return _SIG_NAME + b": " + cast(bytes, dkim.fold(joined, namelen=namelen))
