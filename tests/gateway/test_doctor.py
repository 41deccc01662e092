"""``attachgate doctor`` against a real authoritative DNS server on loopback.

Every test publishes a zone in :class:`ZoneServer`, points the doctor's resolver
at it and reads the verdicts; the pure parts (macros, tag lists, TXT splitting)
get property tests of their own.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import socket
import string
import threading
import time
from collections.abc import Iterator, Sequence

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from gateway.doctor import (
    Check,
    DoctorError,
    DomainInput,
    RecordSyntaxError,
    Report,
    dkim_txt_value,
    expand_spf_macros,
    parse_spf,
    parse_tags,
    run_doctor,
    spf_macro_values,
    txt_strings,
    zone_txt,
)
from tests.helpers.dnsserver import ZoneServer

DOMAIN = "example.com"
HOST = "gw.example.com"
GW_IP = "192.0.2.10"
SELECTOR = "s2026"
DKIM_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"

Records = list[tuple[str, str, str]]


# -- keys and records, built independently of the code under test -------------------


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _dkim_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kind = "rsa"
    else:
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        kind = "ed25519"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode()}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def good_records(dkim_value: str) -> Records:
    """A domain where everything is right for the gateway at GW_IP named HOST."""
    return [
        (DKIM_NAME, "TXT", dkim_value),
        (DOMAIN, "TXT", "v=spf1 ip4:192.0.2.10 -all"),
        # Unrelated TXT records, long enough together to force a truncated UDP answer.
        (DOMAIN, "TXT", "site-verification=" + "a" * 200),
        (DOMAIN, "TXT", "other-verification=" + "b" * 200),
        (DOMAIN, "MX", "10 mx.example.com."),
        ("mx.example.com", "A", "198.51.100.25"),
        (f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.com"),
        ("10.2.0.192.in-addr.arpa", "PTR", "gw.example.com."),
        (HOST, "A", GW_IP),
        (f"_mta-sts.{DOMAIN}", "TXT", "v=STSv1; id=20260101T000000"),
        (f"_smtp._tls.{DOMAIN}", "TXT", "v=TLSRPTv1; rua=mailto:tls@example.com"),
    ]


def replace(records: Records, name: str, rtype: str, *datas: str) -> Records:
    """``records`` with every (name, rtype) record replaced by ``datas`` (none: removed)."""
    kept = [r for r in records if not (r[0].lower() == name.lower() and r[1] == rtype)]
    return kept + [(name, rtype, data) for data in datas]


def fix_rdata(fix: str | None, name: str, rtype: str) -> str:
    """The rdata part of a zone line ``name. IN TYPE rdata`` from a Check's fix."""
    assert fix is not None
    prefix = f"{name}. IN {rtype} "
    assert fix.startswith(prefix), fix
    return fix[len(prefix) :]


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer([]) as server:
        yield server
    assert server.errors == []


async def diagnose(
    zone: ZoneServer,
    records: Records,
    *,
    domains: Sequence[DomainInput],
    addresses: Sequence[str] = (GW_IP,),
    hostname: str = HOST,
) -> dict[tuple[str, str], Check]:
    zone.set_records(records)
    assert zone.address is not None
    report = await run_doctor(
        domains,
        public_addresses=addresses,
        hostname=hostname,
        nameservers=["127.0.0.1"],
        port=zone.address[1],
        timeout=2.0,
    )
    return {(c.domain, c.name): c for c in report.checks}


@pytest.fixture
def rsa_domain(rsa_key: rsa.RSAPrivateKey) -> list[DomainInput]:
    return [DomainInput(DOMAIN, [(SELECTOR, _pem(rsa_key))])]


@pytest.fixture
def good(rsa_key: rsa.RSAPrivateKey) -> Records:
    return good_records(_dkim_value(rsa_key))


# -- everything right -------------------------------------------------------------


async def test_everything_right_passes(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    zone.set_records(good)
    assert zone.address is not None
    report = await run_doctor(
        rsa_domain,
        public_addresses=[GW_IP],
        hostname=HOST,
        nameservers=["127.0.0.1"],
        port=zone.address[1],
        timeout=2.0,
    )
    assert report.ok
    verdicts = [(c.domain, c.name, c.status) for c in report.checks]
    assert verdicts == [
        (DOMAIN, f"dkim:{SELECTOR}", "pass"),
        (DOMAIN, "spf", "pass"),
        (DOMAIN, "dmarc", "pass"),
        (DOMAIN, "mta-sts", "info"),
        (DOMAIN, "tls-rpt", "info"),
        (HOST, f"ptr:{GW_IP}", "pass"),
    ]
    assert all(c.fix is None for c in report.checks)
    checks = {c.name: c for c in report.checks}
    assert "rsa, 2048 bits" in checks[f"dkim:{SELECTOR}"].detail
    assert "authorises 192.0.2.10 (0/10 DNS lookups)" in checks["spf"].detail
    assert "p=reject" in checks["dmarc"].detail
    assert "id=20260101T000000" in checks["mta-sts"].detail
    assert "rua=mailto:tls@example.com" in checks["tls-rpt"].detail
    # The TXT set of example.com does not fit 512 bytes: the answer came over TCP.
    assert ("tcp", "example.com.", "TXT") in zone.queries
    # Answers are shared between checks: no question is asked twice over UDP.
    udp = [query for query in zone.queries if query[0] == "udp"]
    assert len(udp) == len(set(udp))


async def test_ipv4_and_ipv6_addresses_both_checked(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DOMAIN, "TXT", "v=spf1 ip4:192.0.2.10 ip6:2001:db8:1::/64 -all")
    records += [
        ("a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR", HOST),
        (HOST, "AAAA", "2001:db8:1::a"),
    ]
    checks = await diagnose(zone, records, domains=rsa_domain, addresses=[GW_IP, "2001:db8:1::a"])
    assert checks[DOMAIN, "spf"].status == "pass"
    assert "192.0.2.10, 2001:db8:1::a" in checks[DOMAIN, "spf"].detail
    assert checks[HOST, "ptr:2001:db8:1::a"].status == "pass"
    assert checks[HOST, f"ptr:{GW_IP}"].status == "pass"


# -- SPF --------------------------------------------------------------------------


async def test_no_spf_fails_with_suggested_record(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DOMAIN, "TXT", "site-verification=abc")
    checks = await diagnose(zone, records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert spf.status == "fail"
    assert "no SPF record" in spf.detail
    assert spf.fix == 'example.com. IN TXT "v=spf1 ip4:192.0.2.10 ~all"'
    # Publishing the suggestion makes the check pass.
    records = replace(records, DOMAIN, "TXT", fix_rdata(spf.fix, DOMAIN, "TXT"))
    checks = await diagnose(zone, records, domains=rsa_domain)
    assert checks[DOMAIN, "spf"].status == "pass"


def _include_tree(second_branch: int) -> Records:
    """example.com includes two branches: 4 includes, then ``second_branch`` includes."""
    records: Records = [
        (DOMAIN, "TXT", "v=spf1 include:a.spf.example.net include:b.spf.example.net -all"),
    ]
    a_leaves = [f"a{i}.spf.example.net" for i in range(4)]
    b_leaves = [f"b{i}.spf.example.net" for i in range(second_branch)]
    for branch, leaves in (("a", a_leaves), ("b", b_leaves)):
        terms = " ".join(f"include:{leaf}" for leaf in leaves)
        records.append((f"{branch}.spf.example.net", "TXT", f"v=spf1 {terms} ~all"))
    for number, leaf in enumerate(a_leaves + b_leaves):
        network = "192.0.2.10" if leaf == "a0.spf.example.net" else f"198.51.100.{number}"
        records.append((leaf, "TXT", f"v=spf1 ip4:{network} -all"))
    return records


@pytest.mark.parametrize(
    "case",
    [
        (4, "pass", "(10/10 DNS lookups)"),
        (5, "fail", "11 DNS lookups (limit 10, RFC 7208 §4.6.4): receivers return permerror"),
    ],
)
async def test_spf_lookup_limit_counts_nested_includes(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records, case: tuple[int, str, str]
) -> None:
    second_branch, status, expected = case
    records = replace(good, DOMAIN, "TXT") + _include_tree(second_branch)
    checks = await diagnose(zone, records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert spf.status == status, spf.detail
    assert expected in spf.detail


async def test_spf_not_listing_the_gateway_fails_and_fix_adds_it(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DOMAIN, "TXT", "v=spf1 ip4:198.51.100.0/24 mx -all")
    checks = await diagnose(zone, records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert spf.status == "fail"
    assert "does not authorise 192.0.2.10 (fail: -all in example.com)" in spf.detail
    assert spf.fix == 'example.com. IN TXT "v=spf1 ip4:192.0.2.10 ip4:198.51.100.0/24 mx -all"'
    records = replace(records, DOMAIN, "TXT", fix_rdata(spf.fix, DOMAIN, "TXT"))
    checks = await diagnose(zone, records, domains=rsa_domain)
    assert checks[DOMAIN, "spf"].status == "pass"


@pytest.mark.parametrize(
    ("record", "extra"),
    [
        ("v=spf1 mx -all", [("mx.example.com", "A", GW_IP)]),
        ("v=spf1 a:gw.example.com -all", []),
        ("v=spf1 a:net.example.com/24 -all", [("net.example.com", "A", "192.0.2.200")]),
        ("v=spf1 -ip4:198.51.100.1 ip4:192.0.2.0/28 -all", []),
        (
            "v=spf1 redirect=_spf.example.com",
            [("_spf.example.com", "TXT", "v=spf1 ip4:192.0.2.0/28 -all")],
        ),
        (
            "v=spf1 include:_spf.provider.example ~all",
            [("_spf.provider.example", "TXT", "v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.10 -all")],
        ),
        (
            "v=spf1 exists:%{i}._allow.example.com -all",
            [("192.0.2.10._allow.example.com", "A", "127.0.0.2")],
        ),
        ("V=SPF1 IP4:192.0.2.10 -ALL", []),
    ],
)
async def test_spf_mechanisms_that_authorise_the_gateway(
    zone: ZoneServer,
    rsa_domain: list[DomainInput],
    good: Records,
    record: str,
    extra: Records,
) -> None:
    records = replace(good, DOMAIN, "TXT", record)
    for name, rtype, data in extra:
        records = replace(records, name, rtype, data)
    checks = await diagnose(zone, records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert (spf.status, spf.fix) == ("pass", None), spf.detail


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [
                (DOMAIN, "TXT", "v=spf1 include:_spf.provider.example -all"),
                ("_spf.provider.example", "TXT", "v=spf1 ip4:198.51.100.0/24 -all"),
            ],
            "does not authorise 192.0.2.10 (fail: -all in example.com)",
        ),
        ([(DOMAIN, "TXT", "v=spf1 ?all")], "does not authorise 192.0.2.10 (neutral"),
        ([(DOMAIN, "TXT", "v=spf1 ~all")], "(softfail: ~all in example.com)"),
        ([(DOMAIN, "TXT", "v=spf1 ip4:192.0.2.10/33 -all")], "the SPF record is invalid"),
        ([(DOMAIN, "TXT", "v=spf1 ipv4:192.0.2.10 -all")], "unknown mechanism 'ipv4:192.0.2.10'"),
        ([(DOMAIN, "TXT", "v=spf1 include: -all")], "the SPF record is invalid"),
        (
            [(DOMAIN, "TXT", "v=spf1 ip4:192.0.2.10 -all"), (DOMAIN, "TXT", "v=spf1 mx -all")],
            "2 SPF records",
        ),
        (
            [
                (
                    DOMAIN,
                    "TXT",
                    "v=spf1 a:nx1.example.com a:nx2.example.com a:nx3.example.com "
                    "ip4:192.0.2.10 -all",
                )
            ],
            "3 void lookups (limit 2)",
        ),
        (
            [(DOMAIN, "TXT", "v=spf1 include:nothing.example.org ip4:192.0.2.10 -all")],
            "nothing.example.org has no SPF record",
        ),
        ([(DOMAIN, "TXT", "v=spf1 redirect=example.com")], "example.com includes itself"),
    ],
)
async def test_spf_records_that_fail(
    zone: ZoneServer,
    rsa_domain: list[DomainInput],
    good: Records,
    records: Records,
    expected: str,
) -> None:
    zone_records = replace(good, DOMAIN, "TXT") + records
    checks = await diagnose(zone, zone_records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert spf.status == "fail"
    assert expected in spf.detail


async def test_spf_ptr_mechanism_warns(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DOMAIN, "TXT", "v=spf1 ptr:example.com -all")
    checks = await diagnose(zone, records, domains=rsa_domain)
    spf = checks[DOMAIN, "spf"]
    assert spf.status == "warn"
    assert "authorises 192.0.2.10" in spf.detail
    assert "ptr mechanism" in spf.detail


async def test_spf_plus_all_warns(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DOMAIN, "TXT", "v=spf1 +all")
    checks = await diagnose(zone, records, domains=rsa_domain)
    assert checks[DOMAIN, "spf"].status == "warn"
    assert "+all authorises every host" in checks[DOMAIN, "spf"].detail


# -- DKIM -------------------------------------------------------------------------


async def test_dkim_key_mismatch_fails_with_the_right_record(
    zone: ZoneServer,
    rsa_domain: list[DomainInput],
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    records = good_records(_dkim_value(other_rsa_key))
    checks = await diagnose(zone, records, domains=rsa_domain)
    dkim = checks[DOMAIN, f"dkim:{SELECTOR}"]
    assert dkim.status == "fail"
    assert "does not match the private key" in dkim.detail
    assert dkim.fix is not None
    published = "".join(re.findall(r'"([^"]*)"', dkim.fix))
    assert published == _dkim_value(rsa_key)


async def test_dkim_missing_fails_and_fix_is_publishable(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, DKIM_NAME, "TXT")
    checks = await diagnose(zone, records, domains=rsa_domain)
    dkim = checks[DOMAIN, f"dkim:{SELECTOR}"]
    assert dkim.status == "fail"
    assert f"no DKIM key published at {DKIM_NAME}" in dkim.detail
    rdata = fix_rdata(dkim.fix, DKIM_NAME, "TXT")
    strings = re.findall(r'"([^"]*)"', rdata)
    assert len(strings) == 2
    assert all(len(s.encode()) <= 255 for s in strings)
    checks = await diagnose(zone, replace(records, DKIM_NAME, "TXT", rdata), domains=rsa_domain)
    assert checks[DOMAIN, f"dkim:{SELECTOR}"].status == "pass"


@pytest.mark.parametrize("form", ["pem", "raw-base64"])
async def test_ed25519_dkim_right(
    zone: ZoneServer, ed_key: ed25519.Ed25519PrivateKey, good: Records, form: str
) -> None:
    if form == "pem":
        private = _pem(ed_key)
    else:
        seed = ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = base64.b64encode(seed) + b"\n"
    records = replace(good, DKIM_NAME, "TXT", _dkim_value(ed_key))
    checks = await diagnose(zone, records, domains=[DomainInput(DOMAIN, [(SELECTOR, private)])])
    dkim = checks[DOMAIN, f"dkim:{SELECTOR}"]
    assert (dkim.status, dkim.fix) == ("pass", None)
    assert "ed25519" in dkim.detail


async def test_traditional_rsa_pem_and_two_selectors(
    zone: ZoneServer,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    good: Records,
) -> None:
    traditional = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert traditional.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    records = [*good, (f"ed1._domainkey.{DOMAIN}", "TXT", _dkim_value(ed_key))]
    domain = DomainInput(DOMAIN, [(SELECTOR, traditional), ("ed1", _pem(ed_key))])
    checks = await diagnose(zone, records, domains=[domain])
    assert checks[DOMAIN, f"dkim:{SELECTOR}"].status == "pass"
    assert checks[DOMAIN, "dkim:ed1"].status == "pass"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=DKIM1; k=rsa; p=", "revoked"),
        ("v=DKIM1; k=rsa", "no p="),
        ("v=DKIM1; k=rsa; p=!!!notbase64", "not valid base64"),
        ("v=DKIM2; k=rsa; p=AAAA", "must start with v=DKIM1"),
        ("v=DKIM1; k=rsa; k=ed25519; p=AAAA", "does not parse"),
        ("v=DKIM1; k=ed25519; p=AAAA", "k=ed25519 but the private key is rsa"),
    ],
)
async def test_dkim_records_that_fail(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records, record: str, expected: str
) -> None:
    checks = await diagnose(zone, replace(good, DKIM_NAME, "TXT", record), domains=rsa_domain)
    dkim = checks[DOMAIN, f"dkim:{SELECTOR}"]
    assert dkim.status == "fail"
    assert expected in dkim.detail


async def test_dkim_testing_flag_warns(
    zone: ZoneServer, rsa_domain: list[DomainInput], rsa_key: rsa.RSAPrivateKey, good: Records
) -> None:
    record = _dkim_value(rsa_key).replace("k=rsa;", "k=rsa; t=y;")
    checks = await diagnose(zone, replace(good, DKIM_NAME, "TXT", record), domains=rsa_domain)
    assert checks[DOMAIN, f"dkim:{SELECTOR}"].status == "warn"


async def test_unreadable_private_key_is_a_failed_check(zone: ZoneServer, good: Records) -> None:
    domain = DomainInput(DOMAIN, [(SELECTOR, b"-----BEGIN PRIVATE KEY-----\nnope\n")])
    checks = await diagnose(zone, good, domains=[domain])
    dkim = checks[DOMAIN, f"dkim:{SELECTOR}"]
    assert dkim.status == "fail"
    assert "cannot read the private key" in dkim.detail


# -- DMARC ------------------------------------------------------------------------


async def test_no_dmarc_fails_with_fix(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    checks = await diagnose(zone, replace(good, f"_dmarc.{DOMAIN}", "TXT"), domains=rsa_domain)
    dmarc = checks[DOMAIN, "dmarc"]
    assert dmarc.status == "fail"
    assert "no DMARC record at _dmarc.example.com" in dmarc.detail
    assert dmarc.fix == (
        '_dmarc.example.com. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.com"'
    )


async def test_dmarc_p_none_warns_but_report_is_ok(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; p=none; adkim=s")
    zone.set_records(records)
    assert zone.address is not None
    report = await run_doctor(
        rsa_domain,
        public_addresses=[GW_IP],
        hostname=HOST,
        nameservers=["127.0.0.1"],
        port=zone.address[1],
    )
    dmarc = next(c for c in report.checks if c.name == "dmarc")
    assert dmarc.status == "warn"
    assert "p=none" in dmarc.detail
    assert "DKIM aligned (strict)" in dmarc.detail
    assert report.ok


@pytest.mark.parametrize(
    ("record", "status", "expected"),
    [
        ("v=DMARC1; p=quarantine", "pass", "p=quarantine (inherited from example.com)"),
        ("v=DMARC1; p=reject; sp=none", "warn", "p=none (inherited from example.com)"),
    ],
)
async def test_subdomain_inherits_organisational_dmarc(
    zone: ZoneServer, good: Records, record: str, status: str, expected: str
) -> None:
    records = replace(good, f"_dmarc.{DOMAIN}", "TXT", record)
    checks = await diagnose(zone, records, domains=[DomainInput("news.example.com", [])])
    dmarc = checks["news.example.com", "dmarc"]
    assert dmarc.status == status
    assert expected in dmarc.detail


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=DMARC1; p=reject", "v=DMARC1; p=none"], "2 DMARC records"),
        (["v=DMARC1; p=maybe"], "no valid p="),
        (["v=DMARC1; rua=mailto:d@example.com"], "no valid p="),
        (["not-dmarc=1"], "no DMARC record"),
    ],
)
async def test_dmarc_records_that_fail(
    zone: ZoneServer,
    rsa_domain: list[DomainInput],
    good: Records,
    records: list[str],
    expected: str,
) -> None:
    checks = await diagnose(
        zone, replace(good, f"_dmarc.{DOMAIN}", "TXT", *records), domains=rsa_domain
    )
    assert checks[DOMAIN, "dmarc"].status == "fail"
    assert expected in checks[DOMAIN, "dmarc"].detail


# -- PTR --------------------------------------------------------------------------


async def test_ptr_missing_fails(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, "10.2.0.192.in-addr.arpa", "PTR")
    checks = await diagnose(zone, records, domains=rsa_domain)
    ptr = checks[HOST, f"ptr:{GW_IP}"]
    assert ptr.status == "fail"
    assert "no PTR record for 192.0.2.10" in ptr.detail
    assert ptr.fix == "10.2.0.192.in-addr.arpa. IN PTR gw.example.com."


async def test_ptr_not_forward_confirmed_fails(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, HOST, "A", "198.51.100.7")
    checks = await diagnose(zone, records, domains=rsa_domain)
    ptr = checks[HOST, f"ptr:{GW_IP}"]
    assert ptr.status == "fail"
    assert "not forward-confirmed" in ptr.detail
    assert "198.51.100.7" in ptr.detail
    assert ptr.fix == "gw.example.com. IN A 192.0.2.10"


async def test_ptr_name_other_than_hostname_warns(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, "10.2.0.192.in-addr.arpa", "PTR", "host-10.isp.example.")
    records.append(("host-10.isp.example", "A", GW_IP))
    checks = await diagnose(zone, records, domains=rsa_domain)
    ptr = checks[HOST, f"ptr:{GW_IP}"]
    assert ptr.status == "warn"
    assert "host-10.isp.example" in ptr.detail
    assert "greets as gw.example.com" in ptr.detail
    assert ptr.fix == "10.2.0.192.in-addr.arpa. IN PTR gw.example.com."


# -- MTA-STS and TLS-RPT ------------------------------------------------------------


async def test_mta_sts_and_tls_rpt_absent_or_malformed(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    records = replace(good, f"_mta-sts.{DOMAIN}", "TXT")
    records = replace(records, f"_smtp._tls.{DOMAIN}", "TXT", "v=TLSRPTv1;")
    checks = await diagnose(zone, records, domains=rsa_domain)
    assert checks[DOMAIN, "mta-sts"].status == "info"
    assert "no MTA-STS" in checks[DOMAIN, "mta-sts"].detail
    assert checks[DOMAIN, "tls-rpt"].status == "warn"
    assert "no rua= tag" in checks[DOMAIN, "tls-rpt"].detail


# -- DNS failures -----------------------------------------------------------------


async def test_silent_dns_server_fails_fast_with_timeout_detail(
    rsa_domain: list[DomainInput],
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        report = await run_doctor(
            rsa_domain,
            public_addresses=[GW_IP],
            hostname=HOST,
            nameservers=["127.0.0.1"],
            port=port,
            timeout=0.5,
        )
        elapsed = time.monotonic() - started
    assert not report.ok
    assert len(report.checks) == 6
    for check in report.checks:
        assert check.status == "fail", check
        assert f"from 127.0.0.1:{port} within 0.5 s" in check.detail
        assert check.detail.startswith("DNS lookup failed: no answer for")
    # Lookups run concurrently: one timeout, not six in a row.
    assert elapsed < 2.0


class ServfailServer:
    """A UDP nameserver that answers every query with SERVFAIL."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            wire, peer = self.sock.recvfrom(65535)
            if wire == b"stop":
                return
            response = dns.message.make_response(dns.message.from_wire(wire))
            response.set_rcode(dns.rcode.SERVFAIL)
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> ServfailServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"stop", ("127.0.0.1", self.port))
        self._thread.join(timeout=5)
        self.sock.close()


async def test_servfail_is_a_failed_check(rsa_domain: list[DomainInput]) -> None:
    with ServfailServer() as server:
        report = await run_doctor(
            rsa_domain,
            public_addresses=[GW_IP],
            hostname=HOST,
            nameservers=["127.0.0.1"],
            port=server.port,
            timeout=2.0,
        )
    assert not report.ok
    assert all(c.status == "fail" for c in report.checks)
    assert all("SERVFAIL" in c.detail for c in report.checks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"public_addresses": ["gw.example.com"]}, "not an IP address"),
        ({"nameservers": ["dns.example.com"]}, "nameserver must be an IP address"),
        ({"nameservers": []}, "no nameserver"),
        ({"timeout": 0.0}, "timeout must be positive"),
        ({"hostname": "bad..name"}, "not a domain name"),
    ],
)
async def test_bad_arguments_raise_doctor_error(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "public_addresses": [GW_IP],
        "hostname": HOST,
        "nameservers": ["127.0.0.1"],
        "timeout": 1.0,
    }
    arguments.update(kwargs)
    with pytest.raises(DoctorError, match=message):
        await run_doctor([DomainInput(DOMAIN, [])], **arguments)  # type: ignore[arg-type]


# -- the test nameserver itself -------------------------------------------------------


async def test_zone_server_answers_like_an_authoritative_server(zone: ZoneServer) -> None:
    zone.set_records(
        [
            ("Sel._DomainKey.Example.COM", "TXT", '"v=DKIM1; k=rsa; " "p=AAAA"'),
            ("a.b.example.com", "A", "192.0.2.1"),
        ]
    )
    assert zone.address is not None
    host, port = zone.address

    async def ask(name: str, rtype: str, *, tcp: bool = False) -> dns.message.Message:
        query = dns.message.make_query(name, rtype)
        if tcp:
            return await dns.asyncquery.tcp(query, host, timeout=2, port=port)
        return await dns.asyncquery.udp(query, host, timeout=2, port=port)

    txt = await ask("sel._domainkey.example.com", "TXT")
    assert txt.rcode() == dns.rcode.NOERROR
    assert txt.flags & dns.flags.AA
    assert [rdata.strings for rdata in txt.answer[0]] == [(b"v=DKIM1; k=rsa; ", b"p=AAAA")]
    over_tcp = await ask("SEL._domainkey.example.com", "TXT", tcp=True)
    assert over_tcp.answer == txt.answer
    nodata = await ask("sel._domainkey.example.com", "MX")
    assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
    empty_non_terminal = await ask("b.example.com", "A")
    assert (empty_non_terminal.rcode(), empty_non_terminal.answer) == (dns.rcode.NOERROR, [])
    missing = await ask("c.example.com", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    zone.set_records([])
    gone = await ask("a.b.example.com", "A")
    assert gone.rcode() == dns.rcode.NXDOMAIN


# -- the report ---------------------------------------------------------------------


async def test_to_text_aligns_verdicts_and_indents_fixes(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    zone.set_records(replace(good, f"_dmarc.{DOMAIN}", "TXT"))
    assert zone.address is not None
    report = await run_doctor(
        rsa_domain,
        public_addresses=[GW_IP],
        hostname=HOST,
        nameservers=["127.0.0.1"],
        port=zone.address[1],
    )
    lines = report.to_text().splitlines()
    assert lines[0] == DOMAIN
    assert HOST in lines
    verdicts = [line for line in lines if re.match(r"  (PASS|WARN|FAIL|INFO)  ", line)]
    assert len(verdicts) == len(report.checks)
    dmarc_index = next(i for i, line in enumerate(lines) if line.startswith("  FAIL  dmarc "))
    dmarc_line, fix_line = lines[dmarc_index], lines[dmarc_index + 1]
    detail_column = dmarc_line.index("no DMARC record")
    assert fix_line.index("fix: ") == detail_column
    assert fix_line[:detail_column].strip() == ""
    assert fix_line.endswith('"v=DMARC1; p=none; rua=mailto:postmaster@example.com"')
    # Every detail starts in the same column.
    details = {c.detail for c in report.checks}
    columns = {next(line.index(d) for line in verdicts if line.endswith(d)) for d in details}
    assert columns == {detail_column}
    assert lines[-1] == "verdict: FAIL (1 failed, 0 warnings, 3 passed, 2 informational)"


async def test_to_json_round_trips(
    zone: ZoneServer, rsa_domain: list[DomainInput], good: Records
) -> None:
    zone.set_records(replace(good, "10.2.0.192.in-addr.arpa", "PTR"))
    assert zone.address is not None
    report = await run_doctor(
        rsa_domain,
        public_addresses=[GW_IP],
        hostname=HOST,
        nameservers=["127.0.0.1"],
        port=zone.address[1],
    )
    data = json.loads(report.to_json())
    assert data["ok"] is False
    assert [Check(**item) for item in data["checks"]] == report.checks
    ptr = data["checks"][-1]
    assert ptr == {
        "domain": HOST,
        "name": f"ptr:{GW_IP}",
        "status": "fail",
        "detail": report.checks[-1].detail,
        "fix": "10.2.0.192.in-addr.arpa. IN PTR gw.example.com.",
    }


@pytest.mark.parametrize(
    ("statuses", "ok"),
    [((), True), (("pass", "info", "warn"), True), (("pass", "fail"), False), (("fail",), False)],
)
def test_report_ok_is_no_failure(statuses: tuple[str, ...], ok: bool) -> None:
    checks = [Check(DOMAIN, f"c{i}", s, "detail") for i, s in enumerate(statuses)]  # type: ignore[arg-type]
    assert Report(checks).ok is ok


# -- pure parts ---------------------------------------------------------------------

# RFC 7208 §7.4: sender strong-bad@email.example.com, client 192.0.2.3 / 2001:db8::cb01.
_RFC_V4 = spf_macro_values(
    ipaddress.ip_address("192.0.2.3"),
    "strong-bad@email.example.com",
    "email.example.com",
    "mx.example.org",
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("%%%_%-", "% %20"),
    ],
)
def test_macro_expansion_matches_rfc_7208_examples(spec: str, expected: str) -> None:
    assert expand_spf_macros(spec, _RFC_V4) == expected


def test_macro_expansion_ipv6_matches_rfc_7208_example() -> None:
    values = spf_macro_values(
        ipaddress.ip_address("2001:db8::cb01"),
        "strong-bad@email.example.com",
        "email.example.com",
        "mx.example.org",
    )
    assert expand_spf_macros("%{ir}.%{v}._spf.%{d2}", values) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


@pytest.mark.parametrize("spec", ["%{c}", "%{x}", "50%", "%{d0}", "a b"])
def test_bad_macros_raise(spec: str) -> None:
    with pytest.raises(RecordSyntaxError):
        expand_spf_macros(spec, _RFC_V4)


@given(st.text(min_size=0, max_size=1200))
def test_txt_strings_rejoin_and_fit(value: str) -> None:
    parts = txt_strings(value)
    assert "".join(parts) == value
    assert all(len(p.encode()) <= 255 for p in parts)
    assert all(parts) or parts == [""]


def test_zone_txt_escapes_quotes() -> None:
    assert zone_txt("x.example.com.", 'a"b\\c') == 'x.example.com. IN TXT "a\\"b\\\\c"'


_tag_names = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters),
    st.text(string.ascii_letters + string.digits + "_", max_size=8),
)
_tag_values = (
    st.text(string.ascii_letters + string.digits + "+/=:@.-_ ", min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)


@given(st.dictionaries(_tag_names, _tag_values, max_size=6), st.sampled_from([";", "; ", " ; "]))
def test_parse_tags_round_trips(tags: dict[str, str], separator: str) -> None:
    text = separator.join(f"{k}={v}" for k, v in tags.items())
    assert parse_tags(text) == tags


_spf_terms = st.one_of(
    st.builds(lambda q, n: f"{q}ip4:198.51.100.{n}", st.sampled_from("+-~?"), st.integers(0, 255)),
    st.builds(lambda n: f"ip6:2001:db8::{n:x}/64", st.integers(0, 65535)),
    st.builds(lambda h: f"include:{h}.example.net", st.from_regex(r"[a-z]{1,10}", fullmatch=True)),
    st.builds(lambda c: f"a/{c}", st.integers(0, 32)),
    st.builds(lambda c: f"mx:mail.example.org//{c}", st.integers(0, 128)),
    st.just("exists:%{ir}.%{l1r-}.spf.example.com"),
    st.just("ptr"),
)


@given(st.lists(_spf_terms, max_size=8), st.sampled_from(["-all", "~all", "?all", ""]))
def test_parse_spf_accepts_valid_records(terms: list[str], final: str) -> None:
    words = [*terms, final] if final else terms
    record = parse_spf(" ".join(["v=spf1", *words]))
    assert [d.text for d in record.directives] == words


@pytest.mark.parametrize(
    "text",
    [
        "v=spf2 -all",
        "spf1 -all",
        "v=spf1 all:x",
        "v=spf1 ip4:2001:db8::1",
        "v=spf1 ip6:192.0.2.1",
        "v=spf1 a/33",
        "v=spf1 a//129",
        "v=spf1 mx:example",
        "v=spf1 redirect=a.example.com redirect=b.example.com",
        "v=spf1 exists:%{c}.example.com",
        "v=spf1 include:exa mple.com",
    ],
)
def test_parse_spf_rejects_invalid_records(text: str) -> None:
    with pytest.raises(RecordSyntaxError):
        parse_spf(text)


def test_dkim_txt_value_is_the_published_form(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    assert dkim_txt_value(_pem(rsa_key)) == _dkim_value(rsa_key)
    assert dkim_txt_value(_pem(ed_key)) == _dkim_value(ed_key)
