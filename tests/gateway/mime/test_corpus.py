"""Every message of the real-world corpus through plan() and render()."""

from __future__ import annotations

import re

import pytest

from gateway.mime import (
    Extraction,
    LinkingRules,
    MimeError,
    Passthrough,
    Templates,
    plan,
)
from gateway.mime.scan import scan_message
from tests.gateway.mime.checks import check_rendered, email_leaves, email_payload, parse, sha
from tests.gateway.mime.conftest import corpus_files, load, notices_for

CORPUS = corpus_files() or ["(corpus missing)"]
TEMPLATES = Templates.default()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_message_rewrites_safely(name: str, nested: bool) -> None:
    raw = load(name)
    try:
        result = plan(raw, LinkingRules(min_size=1, nested=nested))
    except MimeError as exc:  # allowed by the contract, but none is expected here
        pytest.fail(f"plan raised {exc!r}")
    if isinstance(result, Passthrough):
        assert result.reason
        return
    assert result.attachments
    notices = notices_for(result.attachments)
    out = result.render(notices, TEMPLATES)
    check_rendered(raw, result, out, [n.url for n in notices])


SIGNED = [
    "cpython/msg_45.txt",
    "mail-mime-parser/m4001.txt",
    "mail-mime-parser/m4002.txt",
    "ruby-mail/raw_email_with_nested_attachment.eml",
]


@pytest.mark.parametrize("name", SIGNED)
def test_signed_messages_pass_through(name: str) -> None:
    result = plan(load(name), LinkingRules(min_size=1, nested=True))
    assert result == Passthrough("signed")


CID_MESSAGES = [
    "mail-mime-parser/m0016.txt",
    "mail-mime-parser/m0017.txt",
    "mail-mime-parser/m1005.txt",
    "mail-mime-parser/m2004.txt",
    "mail-mime-parser/m2005.txt",
    "ruby-mail/attachment_message_rfc822_inline_image.eml",
]
_CID_REF = re.compile(rb"cid:([^\s\"'<>()]+)", re.IGNORECASE)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", CID_MESSAGES)
def test_inline_cid_images_stay(name: str, nested: bool) -> None:
    raw = load(name)
    msg = parse(raw)
    refs = set()
    for part in email_leaves(msg):
        if part.get_content_type() == "text/html":
            refs |= {m.group(1).decode().lower() for m in _CID_REF.finditer(email_payload(part))}
    inline = [
        p
        for p in email_leaves(msg)
        if str(p.get("content-id", "")).strip().strip("<>").lower() in refs
    ]
    assert inline, "the sample has cid-referenced parts"
    result = plan(raw, LinkingRules(min_size=1, nested=nested))
    if isinstance(result, Passthrough):
        assert result.reason == "no-attachments"
        return
    out = result.render(notices_for(result.attachments), TEMPLATES)
    out_parts = {
        (str(p.get("content-id", "")), sha(email_payload(p))) for p in email_leaves(parse(out))
    }
    for part in inline:
        assert (str(part["content-id"]), sha(email_payload(part))) in out_parts


def test_tnef_stays_unless_explicitly_allowed() -> None:
    raw = load("mail-mime-parser/m4006.txt")
    assert plan(raw, LinkingRules(min_size=1)) == Passthrough("no-attachments")
    assert plan(raw, LinkingRules(min_size=1, allow_types=("application/*",))) == Passthrough(
        "no-attachments"
    )
    allowed = plan(raw, LinkingRules(min_size=1, allow_types=("application/ms-tnef",)))
    assert isinstance(allowed, Extraction)
    assert [a.filename for a in allowed.attachments] == ["winmail.dat"]


NAMED = {
    "mail-mime-parser/m3004.txt": "HasenundFrösche.txt",
    "mail-mime-parser/m1015.txt": "HasenundFrösche.txt",
    "mail-mime-parser/m0024.txt": "Biodiversite de semaine en semaine.doc",
    "ruby-mail/japanese_attachment_long_name.eml": "かきくけこ" * 5 + ".txt",
    "ruby-mail/attachment_nonascii_filename.eml": "ciële.txt",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_encoded_file_names_decode_like_the_email_package(name: str) -> None:
    import email
    import email.policy

    raw = load(name)
    root = scan_message(raw, max_depth=20, max_parts=1000, max_header_size=65536, nested=False)
    ours = [e.params.filename() for e in root.walk() if e.params.filename()]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    theirs = [str(p.get_filename()) for p in msg.walk() if p.get_filename()]
    assert ours == theirs
    assert NAMED[name] in ours


def test_names_where_the_email_package_gives_up() -> None:
    # An unquoted RFC 2047 word as a parameter value: email's default policy
    # returns no name; the sender meant the KOI8-R name.
    result = plan(load("mime4j/russian-headers.msg"), LinkingRules(min_size=1))
    assert isinstance(result, Extraction)
    assert [a.filename for a in result.attachments] == ["Список.doc"]
    # A Windows path in a quoted string: backslashes are kept, then neutralised.
    raw = load("mail-mime-parser/m1005.txt")
    root = scan_message(raw, max_depth=20, max_parts=1000, max_header_size=65536, nested=False)
    names = [e.params.filename() for e in root.walk() if e.params.filename()]
    assert "C:\\TEMP\\nsmailEG.png" in names


def test_pdf_attachment_is_taken_out_byte_exact() -> None:
    raw = load("ruby-mail/attachment_pdf_lf.eml")
    result = plan(raw, LinkingRules(min_size=1))
    assert isinstance(result, Extraction)
    [pdf] = result.attachments
    assert (pdf.filename, pdf.content_type) == ("broken.pdf", "application/pdf")
    assert pdf.data.startswith(b"%PDF-1.4")
    email_pdf = [p for p in email_leaves(parse(raw)) if p.get_filename() == "broken.pdf"]
    assert sha(email_payload(email_pdf[0])) == sha(pdf.data)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cpython/msg_15.txt", "unparsable:boundary-clash"),
        ("mime4j/missing-boundary.msg", "unparsable:boundary-not-found"),
        ("mime4j/missing-inner-boundary.msg", "unparsable:boundary-not-found"),
        ("mime4j/malformedHeaderStartsBody-nocrlfcrlf.msg", "unparsable:bad-header-line"),
        ("cpython/msg_35.txt", "unparsable:header-without-blank-line"),
        ("cpython/msg_38.txt", "unparsable:missing-close-delimiter"),
        ("mime4j/base64encoded-rfc822message-nested.msg", "no-attachments"),
        ("mime4j/misplaced-boundary.msg", "no-attachments"),
    ],
)
def test_broken_structure_is_passed_through(name: str, reason: str) -> None:
    assert plan(load(name), LinkingRules(min_size=1, nested=True)) == Passthrough(reason)
