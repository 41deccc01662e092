"""``attachgate doctor``: check a sending domain's DNS the way a receiver reads it.

For each domain the gateway signs for, the doctor looks up what a receiving
server would look up and says, one line per check, whether mail from the
gateway will be trusted:

* ``dkim:<selector>`` - the published key exists, parses and matches the private key;
* ``spf`` - one valid SPF record, within the lookup limits of RFC 7208 §4.6.4,
  that authorises every public address of the gateway;
* ``dmarc`` - a DMARC policy (the domain's own or its organisational domain's);
* ``ptr:<address>`` - reverse DNS of each public address, forward-confirmed and
  equal to the gateway's hostname;
* ``mta-sts`` and ``tls-rpt`` - informational: whether they are announced.

Where something is missing or wrong the check carries the record to publish.
The decisions are pure functions over parsed records; :class:`_Dns` is the only
part that talks to the network, through dnspython's asynchronous resolver.

Exceptions::

    DoctorError              invalid input to the doctor (address, domain, nameserver)
    ├── DnsFailure           a lookup timed out or the server failed (SERVFAIL, REFUSED)
    └── RecordSyntaxError    a published record (SPF, DKIM, DMARC tag list) does not parse

Inside :func:`run_doctor` every ``DnsFailure`` and ``RecordSyntaxError`` becomes a
failed :class:`Check` with a readable detail; only bad arguments raise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import re
import urllib.parse
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "Check",
    "DnsFailure",
    "DoctorError",
    "DomainInput",
    "RecordSyntaxError",
    "Report",
    "SpfDirective",
    "SpfRecord",
    "dkim_txt_value",
    "expand_spf_macros",
    "is_spf_record",
    "parse_spf",
    "parse_tags",
    "run_doctor",
    "spf_macro_values",
    "txt_strings",
    "zone_txt",
]

Status = Literal["pass", "warn", "fail", "info"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SPF_LOOKUP_LIMIT = 10
SPF_VOID_LIMIT = 2
_MX_NAME_LIMIT = 10
_PTR_NAME_LIMIT = 10
_TXT_STRING_MAX = 255
_MIN_RSA_BITS = 1024


class DoctorError(Exception):
    """Root of the doctor's errors."""


class DnsFailure(DoctorError):
    """A DNS query got no usable answer (timeout, SERVFAIL, REFUSED, malformed reply)."""


class RecordSyntaxError(DoctorError):
    """A published record does not follow its grammar."""


# -- the public data -----------------------------------------------------------------


@dataclass(frozen=True)
class DomainInput:
    """A domain the gateway sends for, with its DKIM selectors and private keys (PEM)."""

    domain: str
    dkim: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Check:
    """The verdict of one check, with the record to publish when one is missing or wrong."""

    domain: str
    name: str
    status: Status
    detail: str
    fix: str | None = None


_STATUS_ORDER: dict[Status, int] = {"fail": 0, "warn": 1, "pass": 2, "info": 3}


@dataclass(frozen=True)
class Report:
    """All checks of one doctor run, in a stable order (per domain, then per address)."""

    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check failed; the CLI exits 0 exactly then."""
        return all(check.status != "fail" for check in self.checks)

    def to_text(self) -> str:
        """An aligned report: a heading per domain, one verdict per line, fixes indented."""
        if not self.checks:
            return "nothing to check\n"
        width = max(len(check.name) for check in self.checks)
        lines: list[str] = []
        current: str | None = None
        for check in self.checks:
            if check.domain != current:
                current = check.domain
                lines.append(current)
            lines.append(f"  {check.status.upper():<4}  {check.name:<{width}}  {check.detail}")
            if check.fix is not None:
                lines.append(f"  {'':<4}  {'':<{width}}  fix: {check.fix}")
        counts = {status: 0 for status in _STATUS_ORDER}
        for check in self.checks:
            counts[check.status] += 1
        verdict = "OK" if self.ok else "FAIL"
        lines.append(
            f"verdict: {verdict} ({counts['fail']} failed, {counts['warn']} warnings, "
            f"{counts['pass']} passed, {counts['info']} informational)"
        )
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """``{"ok": bool, "checks": [{domain, name, status, detail, fix}, ...]}``."""
        return json.dumps(
            {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}, indent=2
        )


# -- TXT helpers (pure) -------------------------------------------------------------


def txt_strings(value: str) -> list[str]:
    """Split ``value`` into character-strings of at most 255 bytes (never inside a character)."""
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for char in value:
        char_size = len(char.encode())
        if size + char_size > _TXT_STRING_MAX:
            parts.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += char_size
    if current or not parts:
        parts.append("".join(current))
    return parts


def zone_txt(name: str, value: str) -> str:
    """A zone-file line publishing ``value`` as TXT at ``name``."""
    quoted = []
    for part in txt_strings(value):
        escaped = part.replace("\\", "\\\\").replace('"', '\\"')
        quoted.append(f'"{escaped}"')
    return f"{name.rstrip('.')}. IN TXT {' '.join(quoted)}"


_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_tags(text: str) -> dict[str, str]:
    """Parse a DKIM/DMARC tag list (``a=1; b = 2;``) into a dict in published order.

    Tag names keep their case (DKIM's are case-sensitive); values are stripped of
    surrounding whitespace. A tag without ``=``, a bad name or a repeated tag raises
    :class:`RecordSyntaxError`.
    """
    tags: dict[str, str] = {}
    for raw in text.split(";"):
        spec = raw.strip()
        if not spec:
            continue
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep:
            raise RecordSyntaxError(f"tag {spec!r} has no '='")
        if not _TAG_NAME.fullmatch(name):
            raise RecordSyntaxError(f"bad tag name {name!r}")
        if name in tags:
            raise RecordSyntaxError(f"tag {name!r} appears twice")
        tags[name] = value.strip()
    return tags


# -- DKIM (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class _DkimKey:
    kind: Literal["rsa", "ed25519"]
    public: bytes  # DER SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519
    bits: int


def _load_dkim_key(private_key: bytes) -> _DkimKey:
    """Derive the public half of an RSA or Ed25519 private key (PEM, or raw base64 Ed25519)."""
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # dkimpy writes Ed25519 private keys as the bare base64 of the 32-byte seed.
        try:
            seed = base64.b64decode(private_key.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise DoctorError(f"cannot read the private key: {exc}") from exc
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _DkimKey("rsa", der, key.key_size)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return _DkimKey("ed25519", raw, 256)
    raise DoctorError(f"DKIM keys must be RSA or Ed25519, not {type(key).__name__}")


def dkim_txt_value(private_key: bytes) -> str:
    """The DKIM TXT value (``v=DKIM1; k=...; p=...``) for a private key in PEM."""
    key = _load_dkim_key(private_key)
    return f"v=DKIM1; k={key.kind}; p={base64.b64encode(key.public).decode()}"


def _judge_dkim(record_name: str, txts: Sequence[str], key: _DkimKey) -> tuple[Status, str]:
    """Decide a DKIM check from the TXT strings published at ``record_name``."""
    if not txts:
        return "fail", f"no DKIM key published at {record_name}: receivers report dkim=fail"
    if len(txts) > 1:
        return "fail", f"{len(txts)} TXT records at {record_name}: receivers may pick any one"
    try:
        tags = parse_tags(txts[0])
    except RecordSyntaxError as exc:
        return "fail", f"the DKIM record at {record_name} does not parse: {exc}"
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        return "fail", "the DKIM record must start with v=DKIM1"
    kind = tags.get("k", "rsa").lower()
    if kind != key.kind:
        return "fail", f"the record says k={kind} but the private key is {key.kind}"
    if "p" not in tags:
        return "fail", "the DKIM record has no p= (public key) tag"
    p_value = re.sub(r"\s+", "", tags["p"])
    if not p_value:
        return "fail", "the key is revoked (empty p=): receivers report dkim=fail"
    try:
        published = base64.b64decode(p_value, validate=True)
    except (binascii.Error, ValueError):
        return "fail", "p= is not valid base64"
    if published != key.public:
        return "fail", "the published key does not match the private key: signatures will fail"
    services = [s.strip() for s in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return "fail", f"s={tags['s']} does not allow email"
    if "h" in tags and "sha256" not in [h.strip() for h in tags["h"].split(":")]:
        return "fail", f"h={tags['h']} excludes sha256, which the gateway signs with"
    if key.kind == "rsa" and key.bits < _MIN_RSA_BITS:
        return "fail", f"RSA key of {key.bits} bits: receivers ignore keys under 1024 bits"
    size = f"rsa, {key.bits} bits" if key.kind == "rsa" else "ed25519"
    flags = [f.strip() for f in tags.get("t", "").split(":")]
    if "y" in flags:
        return "warn", f"key matches ({size}) but t=y (testing): receivers may ignore failures"
    return "pass", f"the published key matches the private key ({size})"


# -- SPF (pure) ----------------------------------------------------------------------

_SPF_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_SPF_LOOKUP_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_SPF_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_SPF_TERM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)")
_SPF_DUAL_CIDR = re.compile(
    r"(?::(?P<domain>.+?))?(?:/(?P<c4>0|[1-9][0-9]?))?(?://(?P<c6>0|[1-9][0-9]{0,2}))?"
)
_SPF_MACRO = re.compile(r"%\{([A-Za-z])([0-9]*)(r?)([.\-+,/_=]*)\}|%%|%_|%-|%")
_SPF_DOMAIN_LETTERS = "slodiphv"
_SPF_ALL_LETTERS = "slodiphvcrt"
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class SpfDirective:
    """One SPF mechanism with its qualifier, as published (``text``) and parsed."""

    text: str
    qualifier: str
    mechanism: str
    target: str | None = None
    network: IPNetwork | None = None
    cidr4: int = 32
    cidr6: int = 128

    @property
    def result(self) -> str:
        """The SPF result this directive gives when it matches."""
        return _SPF_QUALIFIERS[self.qualifier]


@dataclass(frozen=True)
class SpfRecord:
    """A parsed ``v=spf1`` record."""

    directives: tuple[SpfDirective, ...]
    redirect: str | None = None
    exp: str | None = None

    @property
    def has_all(self) -> bool:
        return any(d.mechanism == "all" for d in self.directives)


def is_spf_record(text: str) -> bool:
    """True for a TXT value that declares itself SPF version 1 (RFC 7208 §4.5)."""
    head = text.split(" ", 1)[0]
    return head.lower() == "v=spf1"


def expand_spf_macros(spec: str, values: Mapping[str, str]) -> str:
    """Expand the macros of an SPF macro-string (RFC 7208 §7) with ``values`` per letter.

    Letters missing from ``values`` (``c``, ``r``, ``t`` outside ``exp=``) and malformed
    macros raise :class:`RecordSyntaxError`.
    """
    out: list[str] = []
    pos = 0
    for match in _SPF_MACRO.finditer(spec):
        literal = spec[pos : match.start()]
        if any(not 0x21 <= ord(c) <= 0x7E for c in literal):
            raise RecordSyntaxError(f"invalid character in {spec!r}")
        out.append(literal)
        pos = match.end()
        token = match.group(0)
        if token == "%%":
            out.append("%")
        elif token == "%_":
            out.append(" ")
        elif token == "%-":
            out.append("%20")
        elif token == "%":
            raise RecordSyntaxError(f"bad macro in {spec!r}")
        else:
            letter, digits, reverse, delimiters = match.groups()
            lower = letter.lower()
            if lower not in values:
                raise RecordSyntaxError(f"macro letter {letter!r} is not allowed in {spec!r}")
            parts = re.split("[" + re.escape(delimiters or ".") + "]", values[lower])
            if reverse:
                parts.reverse()
            if digits:
                keep = int(digits)
                if keep == 0:
                    raise RecordSyntaxError(f"macro keeps zero labels in {spec!r}")
                parts = parts[-keep:]
            expanded = ".".join(parts)
            if letter.isupper():
                expanded = urllib.parse.quote(expanded, safe="-._~")
            out.append(expanded)
    tail = spec[pos:]
    if any(not 0x21 <= ord(c) <= 0x7E for c in tail):
        raise RecordSyntaxError(f"invalid character in {spec!r}")
    out.append(tail)
    return "".join(out)


def spf_macro_values(ip: IPAddress, sender: str, domain: str, helo: str) -> dict[str, str]:
    """The macro letters of a check_host() evaluation (``p`` is left as ``unknown``)."""
    local, _, sender_domain = sender.rpartition("@")
    dotted = str(ip) if ip.version == 4 else ".".join(ip.exploded.replace(":", ""))
    return {
        "s": sender,
        "l": local or "postmaster",
        "o": sender_domain,
        "d": domain,
        "i": dotted,
        "p": "unknown",
        "v": "in-addr" if ip.version == 4 else "ip6",
        "h": helo,
    }


def _check_domain_spec(spec: str) -> None:
    """Raise unless ``spec`` is a valid SPF domain-spec (macros allowed, RFC 7208 §7.1)."""
    expanded = expand_spf_macros(spec, dict.fromkeys(_SPF_DOMAIN_LETTERS, "x"))
    labels = expanded.removesuffix(".").split(".")
    if len(labels) < 2 and "%{" not in spec:
        raise RecordSyntaxError(f"{spec!r} is not a domain name")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise RecordSyntaxError(f"{spec!r} is not a domain name")
    if not spec.rstrip(".").endswith("}") and not re.search(r"[A-Za-z]", labels[-1]):
        raise RecordSyntaxError(f"{spec!r} does not end in a top-level domain")


def _parse_directive(word: str, qualifier: str, name: str, rest: str) -> SpfDirective:
    mechanism = name.lower()
    qual = qualifier or "+"
    if mechanism not in _SPF_MECHANISMS:
        raise RecordSyntaxError(f"unknown mechanism {word!r}")
    if mechanism == "all":
        if rest:
            raise RecordSyntaxError(f"'all' takes no argument: {word!r}")
        return SpfDirective(word, qual, mechanism)
    if mechanism in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise RecordSyntaxError(f"{mechanism} needs a domain: {word!r}")
        _check_domain_spec(rest[1:])
        return SpfDirective(word, qual, mechanism, target=rest[1:])
    if mechanism == "ptr":
        if rest and not rest.startswith(":"):
            raise RecordSyntaxError(f"bad ptr mechanism {word!r}")
        target = rest[1:] or None
        if rest:
            _check_domain_spec(rest[1:])
        return SpfDirective(word, qual, mechanism, target=target)
    if mechanism in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise RecordSyntaxError(f"{mechanism} needs an address: {word!r}")
        try:
            network = ipaddress.ip_network(rest[1:], strict=False)
        except ValueError as exc:
            raise RecordSyntaxError(f"bad network in {word!r}") from exc
        if network.version != int(mechanism[-1]):
            raise RecordSyntaxError(f"{mechanism} with an IPv{network.version} network")
        return SpfDirective(word, qual, mechanism, network=network)
    # a and mx: optional domain, optional dual CIDR length
    match = _SPF_DUAL_CIDR.fullmatch(rest)
    if match is None:
        raise RecordSyntaxError(f"bad {mechanism} mechanism {word!r}")
    domain = match.group("domain")
    if domain is not None:
        _check_domain_spec(domain)
    cidr4 = int(match.group("c4")) if match.group("c4") else 32
    cidr6 = int(match.group("c6")) if match.group("c6") else 128
    if cidr4 > 32 or cidr6 > 128:
        raise RecordSyntaxError(f"prefix length out of range in {word!r}")
    return SpfDirective(word, qual, mechanism, target=domain, cidr4=cidr4, cidr6=cidr6)


def parse_spf(text: str) -> SpfRecord:
    """Parse an SPF record (RFC 7208 §4.6.1, §12); raise :class:`RecordSyntaxError`."""
    words = [word for word in text.split(" ") if word]
    if not words or words[0].lower() != "v=spf1":
        raise RecordSyntaxError("an SPF record starts with v=spf1")
    directives: list[SpfDirective] = []
    modifiers: dict[str, str] = {}
    for word in words[1:]:
        match = _SPF_TERM.fullmatch(word)
        if match is None:
            raise RecordSyntaxError(f"invalid term {word!r}")
        qualifier, name, rest = match.groups()
        if not qualifier and rest.startswith("="):
            key, value = name.lower(), rest[1:]
            if key in ("redirect", "exp"):
                if key in modifiers:
                    raise RecordSyntaxError(f"{key}= appears twice")
                _check_domain_spec(value)
                modifiers[key] = value
            else:
                expand_spf_macros(value, dict.fromkeys(_SPF_ALL_LETTERS, "x"))
            continue
        directives.append(_parse_directive(word, qualifier, name, rest))
    return SpfRecord(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _spf_with_addresses(record: str, addresses: Sequence[IPAddress]) -> str:
    """``record`` with ``ip4:``/``ip6:`` terms for ``addresses`` right after ``v=spf1``."""
    words = [word for word in record.split(" ") if word]
    added = [f"ip{ip.version}:{ip}" for ip in addresses]
    return " ".join([words[0], *added, *words[1:]])


# -- DMARC (pure) --------------------------------------------------------------------

_DMARC_POLICIES = ("none", "quarantine", "reject")


def _is_dmarc_record(text: str) -> bool:
    return re.match(r"v\s*=\s*DMARC1\s*(;|$)", text, re.IGNORECASE) is not None


def _organisational_domain(domain: str) -> str:
    """The last two labels of ``domain`` (no public-suffix list: simple, and said so)."""
    return ".".join(domain.split(".")[-2:])


def _judge_dmarc(domain: str, found_at: str, records: Sequence[str]) -> tuple[Status, str]:
    where = f"_dmarc.{found_at}"
    if len(records) > 1:
        return "fail", f"{len(records)} DMARC records at {where}: receivers ignore them all"
    try:
        tags = {k.lower(): v for k, v in parse_tags(records[0]).items()}
    except RecordSyntaxError as exc:
        return "fail", f"the DMARC record at {where} does not parse: {exc}"
    policy = tags.get("p", "").lower()
    if found_at != domain and "sp" in tags:
        policy = tags["sp"].lower()
    if policy not in _DMARC_POLICIES:
        return "fail", f"the DMARC record at {where} has no valid p= (none/quarantine/reject)"
    adkim = tags.get("adkim", "r").lower()
    if adkim not in ("r", "s"):
        return "fail", f"adkim={tags['adkim']} is neither r nor s"
    inherited = "" if found_at == domain else f" (inherited from {found_at})"
    alignment = (
        f"DKIM aligned ({'strict' if adkim == 's' else 'relaxed'}): the gateway signs as d={domain}"
    )
    if policy == "none":
        return "warn", (
            f"p=none{inherited}: receivers only report failures, they do not act on them; "
            f"{alignment}"
        )
    pct = tags.get("pct", "100")
    partial = f", applied to {pct}% of failures" if pct != "100" else ""
    return "pass", f"p={policy}{inherited}{partial}; {alignment}"


# -- MTA-STS and TLS-RPT (pure) -------------------------------------------------------


def _judge_announcement(
    records: Sequence[str], *, what: str, version: str, tag: str, absent: str
) -> tuple[Status, str]:
    mine = [r for r in records if re.match(rf"v\s*=\s*{version}\s*(;|$)", r) is not None]
    if not mine:
        return "info", absent
    if len(mine) > 1:
        return "warn", f"{len(mine)} {what} records: receivers ignore them all"
    try:
        tags = parse_tags(mine[0])
    except RecordSyntaxError as exc:
        return "warn", f"the {what} record does not parse: {exc}"
    if not tags.get(tag):
        return "warn", f"the {what} record has no {tag}= tag"
    return "info", f"{what} announced ({tag}={tags[tag]})"


# -- DNS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    records: tuple[str, ...]
    error: str | None = None


class _Dns:
    """Cached, typed lookups; errors come back as :class:`DnsFailure`, empty answers as ()."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, timeout: float) -> None:
        self._resolver = resolver
        self._timeout = timeout
        self._cache: dict[tuple[str, str], asyncio.Task[_Answer]] = {}

    async def _query(self, name: str, rdtype: str) -> tuple[str, ...]:
        key = (name.lower().rstrip("."), rdtype)
        task = self._cache.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(*key))
            self._cache[key] = task
        answer = await asyncio.shield(task)
        if answer.error is not None:
            raise DnsFailure(answer.error)
        return answer.records

    def _servers(self) -> str:
        port = self._resolver.port
        return ", ".join(f"{server}:{port}" for server in self._resolver.nameservers)

    async def _fetch(self, name: str, rdtype: str) -> _Answer:
        what = f"{rdtype} {name}"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            return _Answer((), f"cannot look up {what}: {exc}")
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return _Answer(())
        except dns.exception.Timeout:
            return _Answer(
                (), f"no answer for {what} from {self._servers()} within {self._timeout:g} s"
            )
        except dns.resolver.NoNameservers:
            return _Answer((), f"the nameservers failed to answer {what} (SERVFAIL or REFUSED)")
        except dns.exception.DNSException as exc:
            return _Answer((), f"lookup of {what} failed: {exc}")
        if answer.rrset is None:
            return _Answer(())
        records: list[str] = []
        for rdata in answer.rrset:
            if rdtype == "TXT":
                strings: tuple[bytes, ...] = rdata.strings
                records.append(b"".join(strings).decode("utf-8", "replace"))
            elif rdtype == "MX":
                records.append(rdata.exchange.to_text(omit_final_dot=True).lower())
            elif rdtype == "PTR":
                records.append(rdata.target.to_text(omit_final_dot=True).lower())
            else:
                records.append(str(rdata.address))
        return _Answer(tuple(records))

    async def txt(self, name: str) -> tuple[str, ...]:
        return await self._query(name, "TXT")

    async def addresses(self, name: str, version: int) -> list[IPAddress]:
        records = await self._query(name, "A" if version == 4 else "AAAA")
        return [ipaddress.ip_address(record) for record in records]

    async def mx(self, name: str) -> tuple[str, ...]:
        return await self._query(name, "MX")

    async def ptr(self, ip: IPAddress) -> tuple[str, ...]:
        reverse = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
        return await self._query(reverse, "PTR")

    def close(self) -> None:
        for task in self._cache.values():
            task.cancel()


# -- SPF evaluation -------------------------------------------------------------------


class _SpfPermError(Exception):
    """check_host() would return permerror (internal to the evaluator)."""


class _SpfEvaluator:
    """Enough of RFC 7208 check_host() to decide pass/fail for one client address."""

    def __init__(self, dns_: _Dns, ip: IPAddress, sender: str, helo: str) -> None:
        self._dns = dns_
        self._ip = ip
        self._sender = sender
        self._helo = helo
        self.lookups = 0
        self.void = 0

    async def evaluate(self, domain: str) -> tuple[str, str]:
        """``(result, reason)``; result is one of RFC 7208's seven."""
        try:
            return await self._check_host(domain)
        except _SpfPermError as exc:
            return "permerror", str(exc)
        except DnsFailure as exc:
            return "temperror", str(exc)
        except RecordSyntaxError as exc:
            return "permerror", str(exc)

    def _count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > SPF_LOOKUP_LIMIT:
            raise _SpfPermError(f"more than {SPF_LOOKUP_LIMIT} DNS lookups")

    def _count_void(self) -> None:
        self.void += 1
        if self.void > SPF_VOID_LIMIT:
            raise _SpfPermError(f"more than {SPF_VOID_LIMIT} void lookups")

    def _expand(self, spec: str | None, domain: str) -> str:
        if spec is None:
            return domain
        values = spf_macro_values(self._ip, self._sender, domain, self._helo)
        expanded = expand_spf_macros(spec, values).rstrip(".").lower()
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.split(".", 1)[1]
        return expanded

    async def _check_host(self, domain: str) -> tuple[str, str]:
        records = [txt for txt in await self._dns.txt(domain) if is_spf_record(txt)]
        if not records:
            return "none", f"{domain} has no SPF record"
        if len(records) > 1:
            raise _SpfPermError(f"{domain} has {len(records)} SPF records")
        record = parse_spf(records[0])
        for directive in record.directives:
            if directive.mechanism in _SPF_LOOKUP_MECHANISMS:
                self._count_lookup()
            if await self._matches(directive, domain):
                return directive.result, f"{directive.text} in {domain}"
        if record.redirect is not None:
            self._count_lookup()
            target = self._expand(record.redirect, domain)
            result, reason = await self._check_host(target)
            if result == "none":
                raise _SpfPermError(f"redirect={target} has no SPF record")
            return result, reason
        return "neutral", f"no term of {domain} matched"

    async def _matches(self, directive: SpfDirective, domain: str) -> bool:
        ip = self._ip
        mechanism = directive.mechanism
        if mechanism == "all":
            return True
        if mechanism in ("ip4", "ip6"):
            network = directive.network
            return network is not None and network.version == ip.version and ip in network
        target = self._expand(directive.target, domain)
        if mechanism == "include":
            result, _ = await self._check_host(target)
            if result == "none":
                raise _SpfPermError(f"include:{target} has no SPF record")
            return result == "pass"
        if mechanism == "exists":
            found = await self._dns.addresses(target, 4)
            if not found:
                self._count_void()
            return bool(found)
        if mechanism == "a":
            found = await self._dns.addresses(target, ip.version)
            if not found:
                self._count_void()
            return self._in_any(found, directive)
        if mechanism == "mx":
            exchanges = await self._dns.mx(target)
            if not exchanges:
                self._count_void()
            if len(exchanges) > _MX_NAME_LIMIT:
                raise _SpfPermError(f"mx:{target} has more than {_MX_NAME_LIMIT} MX records")
            for exchange in exchanges:
                if self._in_any(await self._dns.addresses(exchange, ip.version), directive):
                    return True
            return False
        # ptr: a DNS error here means "no match" (RFC 7208 §5.5)
        try:
            names = await self._dns.ptr(ip)
            for name in names[:_PTR_NAME_LIMIT]:
                if (name == target or name.endswith("." + target)) and ip in (
                    await self._dns.addresses(name, ip.version)
                ):
                    return True
        except DnsFailure:
            return False
        return False

    def _in_any(self, found: Sequence[IPAddress], directive: SpfDirective) -> bool:
        prefix = directive.cidr4 if self._ip.version == 4 else directive.cidr6
        return any(
            self._ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            for address in found
            if address.version == self._ip.version
        )


@dataclass
class _SpfTally:
    """Lookups counted over the whole include/redirect tree, as a linting receiver would."""

    lookups: int = 0
    void: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def _walk_spf(
    dns_: _Dns, domain: str, record: SpfRecord, tally: _SpfTally, seen: frozenset[str]
) -> None:
    """Count DNS-querying terms through every include and redirect (RFC 7208 §4.6.4)."""
    children: list[str] = []
    for directive in record.directives:
        if directive.mechanism in _SPF_LOOKUP_MECHANISMS:
            tally.lookups += 1
        static = directive.target is None or "%" not in directive.target
        target = (directive.target or domain).rstrip(".").lower()
        if directive.mechanism == "include" and static:
            children.append(target)
        elif directive.mechanism == "a" and static:
            if not (await dns_.addresses(target, 4)) and not (await dns_.addresses(target, 6)):
                tally.void += 1
                tally.notes.append(f"a:{target} has no address")
        elif directive.mechanism == "mx" and static:
            if not await dns_.mx(target):
                tally.void += 1
                tally.notes.append(f"mx:{target} has no MX record")
        elif directive.mechanism == "ptr":
            tally.notes.append("the ptr mechanism is slow and discouraged (RFC 7208 §5.5)")
    if record.redirect is not None and not record.has_all:
        tally.lookups += 1
        if "%" not in record.redirect:
            children.append(record.redirect.rstrip(".").lower())
    for child in children:
        if child in seen:
            tally.problems.append(f"{child} includes itself")
            continue
        if tally.lookups > 2 * SPF_LOOKUP_LIMIT or len(seen) > 2 * SPF_LOOKUP_LIMIT:
            return
        spf = [txt for txt in await dns_.txt(child) if is_spf_record(txt)]
        if not spf:
            tally.void += 1
            tally.problems.append(f"{child} has no SPF record (receivers: permerror)")
            continue
        if len(spf) > 1:
            tally.problems.append(f"{child} has {len(spf)} SPF records (receivers: permerror)")
            continue
        try:
            parsed = parse_spf(spf[0])
        except RecordSyntaxError as exc:
            tally.problems.append(f"the SPF record of {child} is invalid: {exc}")
            continue
        await _walk_spf(dns_, child, parsed, tally, seen | {child})


async def _check_spf(
    dns_: _Dns, domain: str, addresses: Sequence[IPAddress], hostname: str
) -> Check:
    def check(status: Status, detail: str, fix: str | None = None) -> Check:
        return Check(domain, "spf", status, detail, fix)

    suggestion = " ".join(["v=spf1", *(f"ip{ip.version}:{ip}" for ip in addresses), "~all"])
    records = [txt for txt in await dns_.txt(domain) if is_spf_record(txt)]
    if not records:
        return check(
            "fail",
            "no SPF record: receivers cannot tell the gateway from a forger",
            zone_txt(domain, suggestion),
        )
    if len(records) > 1:
        return check(
            "fail", f"{len(records)} SPF records: receivers return permerror; publish only one"
        )
    try:
        record = parse_spf(records[0])
    except RecordSyntaxError as exc:
        return check("fail", f"the SPF record is invalid: {exc}", zone_txt(domain, suggestion))

    tally = _SpfTally()
    await _walk_spf(dns_, domain, record, tally, frozenset({domain}))
    problems = list(dict.fromkeys(tally.problems))
    if tally.lookups > SPF_LOOKUP_LIMIT:
        problems.insert(
            0,
            f"{tally.lookups} DNS lookups (limit {SPF_LOOKUP_LIMIT}, RFC 7208 §4.6.4): "
            "receivers return permerror",
        )
    if tally.void > SPF_VOID_LIMIT:
        problems.insert(0, f"{tally.void} void lookups (limit {SPF_VOID_LIMIT})")

    sender = f"postmaster@{domain}"
    refused: list[IPAddress] = []
    for ip in addresses:
        evaluator = _SpfEvaluator(dns_, ip, sender, hostname)
        result, reason = await evaluator.evaluate(domain)
        if result != "pass":
            refused.append(ip)
            problems.append(f"does not authorise {ip} ({result}: {reason})")
    if problems:
        fix = zone_txt(domain, _spf_with_addresses(records[0], refused)) if refused else None
        return check("fail", "; ".join(problems), fix)
    notes = list(dict.fromkeys(tally.notes))
    if any(d.mechanism == "all" and d.qualifier == "+" for d in record.directives):
        notes.insert(0, "+all authorises every host on the internet")
    authorised = ", ".join(str(ip) for ip in addresses) or "no address given"
    counts = f"{tally.lookups}/{SPF_LOOKUP_LIMIT} DNS lookups"
    if notes:
        return check("warn", f"authorises {authorised} ({counts}) but " + "; ".join(notes))
    return check("pass", f"authorises {authorised} ({counts})")


# -- the other checks ------------------------------------------------------------------


async def _check_dkim(dns_: _Dns, domain: str, selector: str, private_key: bytes) -> Check:
    name = f"dkim:{selector}"
    record_name = f"{selector}._domainkey.{domain}"
    try:
        key = _load_dkim_key(private_key)
    except DoctorError as exc:
        return Check(domain, name, "fail", f"{exc} (selector {selector})")
    status, detail = _judge_dkim(record_name, await dns_.txt(record_name), key)
    fix = None
    if status == "fail":
        value = f"v=DKIM1; k={key.kind}; p={base64.b64encode(key.public).decode()}"
        fix = zone_txt(record_name, value)
    return Check(domain, name, status, detail, fix)


async def _check_dmarc(dns_: _Dns, domain: str) -> Check:
    fix = zone_txt(f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}")
    found_at = domain
    records = [txt for txt in await dns_.txt(f"_dmarc.{domain}") if _is_dmarc_record(txt)]
    organisational = _organisational_domain(domain)
    if not records and organisational != domain:
        found_at = organisational
        records = [
            txt for txt in await dns_.txt(f"_dmarc.{organisational}") if _is_dmarc_record(txt)
        ]
    if not records:
        where = f"_dmarc.{domain}"
        if organisational != domain:
            where += f" nor _dmarc.{organisational}"
        detail = f"no DMARC record at {where}: large receivers require one from senders"
        return Check(domain, "dmarc", "fail", detail, fix)
    status, detail = _judge_dmarc(domain, found_at, records)
    return Check(domain, "dmarc", status, detail, fix if status == "fail" else None)


async def _check_ptr(dns_: _Dns, ip: IPAddress, hostname: str) -> Check:
    name = f"ptr:{ip}"
    reverse = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
    ptr_fix = f"{reverse}. IN PTR {hostname}."
    names = await dns_.ptr(ip)
    if not names:
        detail = f"no PTR record for {ip}: many receivers refuse mail without reverse DNS"
        return Check(hostname, name, "fail", detail, ptr_fix)
    confirmed: list[str] = []
    seen: dict[str, list[IPAddress]] = {}
    for ptr_name in names[:_PTR_NAME_LIMIT]:
        found = await dns_.addresses(ptr_name, ip.version)
        seen[ptr_name] = found
        if ip in found:
            confirmed.append(ptr_name)
    if not confirmed:
        first = names[0]
        found_text = ", ".join(str(a) for a in seen[first]) or "nothing"
        rtype = "A" if ip.version == 4 else "AAAA"
        detail = (
            f"PTR {first} is not forward-confirmed: {rtype} {first} gives {found_text}, not {ip}"
        )
        return Check(hostname, name, "fail", detail, f"{first}. IN {rtype} {ip}")
    if hostname not in confirmed:
        detail = (
            f"{ip} has forward-confirmed reverse DNS {confirmed[0]}, "
            f"but the gateway greets as {hostname}"
        )
        return Check(hostname, name, "warn", detail, ptr_fix)
    return Check(hostname, name, "pass", f"{ip} -> {hostname} -> {ip} (forward-confirmed)")


async def _check_mta_sts(dns_: _Dns, domain: str) -> Check:
    status, detail = _judge_announcement(
        await dns_.txt(f"_mta-sts.{domain}"),
        what="MTA-STS",
        version="STSv1",
        tag="id",
        absent="no MTA-STS policy announced (optional; it protects mail sent to this domain)",
    )
    return Check(domain, "mta-sts", status, detail)


async def _check_tls_rpt(dns_: _Dns, domain: str) -> Check:
    status, detail = _judge_announcement(
        await dns_.txt(f"_smtp._tls.{domain}"),
        what="TLS-RPT",
        version="TLSRPTv1",
        tag="rua",
        absent="no TLS-RPT record (optional; it asks senders to report TLS failures)",
    )
    return Check(domain, "tls-rpt", status, detail)


async def _guarded(domain: str, name: str, check: Awaitable[Check]) -> Check:
    """Run one check; a DNS failure or an unparsable record becomes a failed check."""
    try:
        return await check
    except DnsFailure as exc:
        return Check(domain, name, "fail", f"DNS lookup failed: {exc}")
    except RecordSyntaxError as exc:
        return Check(domain, name, "fail", f"a record does not parse: {exc}")


# -- entry point ---------------------------------------------------------------------


def _normalise_domain(domain: str) -> str:
    try:
        name = dns.name.from_text(domain.strip())
    except dns.exception.DNSException as exc:
        raise DoctorError(f"{domain!r} is not a domain name: {exc}") from exc
    text = name.to_text(omit_final_dot=True).lower()
    if not text or text == "@":
        raise DoctorError(f"{domain!r} is not a domain name")
    return text


def _make_resolver(
    nameservers: Sequence[str] | None, port: int, timeout: float
) -> dns.asyncresolver.Resolver:
    if timeout <= 0:
        raise DoctorError(f"the timeout must be positive, not {timeout}")
    if nameservers is None:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.exception.DNSException as exc:
            raise DoctorError(f"cannot read the system's resolver settings: {exc}") from exc
    else:
        if not nameservers:
            raise DoctorError("no nameserver given")
        resolver = dns.asyncresolver.Resolver(configure=False)
        try:
            resolver.nameservers = [str(ipaddress.ip_address(ns)) for ns in nameservers]
        except ValueError as exc:
            raise DoctorError(f"a nameserver must be an IP address: {exc}") from exc
    resolver.port = port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


async def run_doctor(
    domains: Sequence[DomainInput],
    *,
    public_addresses: Sequence[str],
    hostname: str,
    nameservers: Sequence[str] | None = None,
    port: int = 53,
    timeout: float = 5.0,  # noqa: ASYNC109 - bounds each DNS lookup, not the whole run
) -> Report:
    """Check every domain and public address; raise :class:`DoctorError` only for bad input.

    ``nameservers`` (IP addresses) and ``port`` choose the resolver; ``None`` uses the
    system's. ``timeout`` bounds each lookup, and lookups run concurrently, so a dead
    nameserver costs about one ``timeout`` in all.
    """
    try:
        addresses = [ipaddress.ip_address(a.strip()) for a in public_addresses]
    except ValueError as exc:
        raise DoctorError(f"a public address is not an IP address: {exc}") from exc
    host = _normalise_domain(hostname)
    names = [(_normalise_domain(d.domain), d) for d in domains]
    dns_ = _Dns(_make_resolver(nameservers, port, timeout), timeout)
    jobs: list[Awaitable[Check]] = []
    for domain, item in names:
        for selector, private_key in item.dkim:
            check = _check_dkim(dns_, domain, selector, private_key)
            jobs.append(_guarded(domain, f"dkim:{selector}", check))
        jobs.append(_guarded(domain, "spf", _check_spf(dns_, domain, addresses, host)))
        jobs.append(_guarded(domain, "dmarc", _check_dmarc(dns_, domain)))
        jobs.append(_guarded(domain, "mta-sts", _check_mta_sts(dns_, domain)))
        jobs.append(_guarded(domain, "tls-rpt", _check_tls_rpt(dns_, domain)))
    for ip in addresses:
        jobs.append(_guarded(host, f"ptr:{ip}", _check_ptr(dns_, ip, host)))
    try:
        checks = await asyncio.gather(*jobs)
    finally:
        dns_.close()
    return Report(list(checks))
