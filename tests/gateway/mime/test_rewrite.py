"""Behaviour of plan() and render() on messages written for the purpose."""

from __future__ import annotations

import datetime
import email
import email.policy
import os

import pytest

from gateway.mime import (
    Extraction,
    LinkingRules,
    LinkNotice,
    MimeLimits,
    Passthrough,
    RenderError,
    Templates,
    plan,
)
from tests.gateway.mime.build import (
    TOP,
    attachment,
    b64,
    entity,
    html,
    message,
    multipart,
    text,
)
from tests.gateway.mime.checks import check_rendered, email_leaves, email_payload, parse
from tests.gateway.mime.conftest import notices_for

RULES = LinkingRules(min_size=10)
T = Templates.default()
PDF = b"%PDF-1.7\n" + os.urandom(3000)


def extract(raw: bytes, rules: LinkingRules = RULES) -> Extraction:
    result = plan(raw, rules)
    assert isinstance(result, Extraction), result
    return result


def rendered(raw: bytes, rules: LinkingRules = RULES) -> tuple[Extraction, bytes]:
    ex = extract(raw, rules)
    notices = notices_for(ex.attachments)
    out = ex.render(notices, T)
    check_rendered(raw, ex, out, [n.url for n in notices])
    return ex, out


def test_attachment_out_notice_in_rest_untouched() -> None:
    raw = message(text(), attachment(PDF))
    ex, out = rendered(raw)
    [a] = ex.attachments
    assert (a.index, a.filename, a.safe_filename, a.content_type) == (
        0,
        "report.pdf",
        "report.pdf",
        "application/pdf",
    )
    assert a.data == PDF
    head = raw[: raw.index(b"\r\n\r\n") + 4]
    assert out.startswith(head)
    assert b"application/pdf" not in out
    body = email_payload(email_leaves(parse(out))[0])
    assert body.startswith(b"Hello,\r\nsee the file.\r\n")
    assert b"report.pdf (2.9 KB)" in body
    assert b"https://files.example.com/d/token-0" in body
    assert b"2026-12-24 10:00 UTC" in body


def test_small_attachments_stay() -> None:
    raw = message(text(), attachment(b"tiny", "a.bin", "application/octet-stream"), attachment(PDF))
    ex = extract(raw)
    assert [a.filename for a in ex.attachments] == ["report.pdf"]
    assert plan(message(text(), attachment(b"tiny")), RULES) == Passthrough("no-attachments")


@pytest.mark.parametrize(
    ("allow", "deny", "taken"),
    [
        ((), (), ["report.pdf", "run.EXE", "pic.jpg"]),
        (("application/*",), (".exe",), ["report.pdf"]),
        (("image/*",), (), ["pic.jpg"]),
        ((".PDF", "exe"), (), ["report.pdf", "run.EXE"]),
        ((), ("application/pdf", "image/*"), ["run.EXE"]),
        (("application/x-msdownload",), ("application/x-msdownload",), []),
    ],
)
def test_type_rules(allow: tuple[str, ...], deny: tuple[str, ...], taken: list[str]) -> None:
    raw = message(
        text(),
        attachment(PDF, "report.pdf"),
        attachment(PDF, "run.EXE", "application/x-msdownload"),
        attachment(PDF, "pic.jpg", "image/jpeg"),
    )
    result = plan(raw, LinkingRules(min_size=1, allow_types=allow, deny_types=deny))
    names = [a.filename for a in result.attachments] if isinstance(result, Extraction) else []
    assert names == taken


def test_parts_that_always_stay() -> None:
    calendar = entity(
        [
            "Content-Type: text/calendar; method=REQUEST; name=invite.ics",
            "Content-Disposition: attachment; filename=invite.ics",
        ],
        b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n" * 5,
    )
    uuencoded = entity(
        [
            "Content-Type: application/octet-stream; name=x.bin",
            "Content-Transfer-Encoding: x-uuencode",
            "Content-Disposition: attachment; filename=x.bin",
        ],
        b"begin 644 x.bin\r\n#86)C\r\n`\r\nend\r\n",
    )
    tnef = attachment(PDF, "winmail.dat", "application/ms-tnef")
    inline_text = entity(["Content-Type: text/plain; name=notes.txt"], b"x" * 100)
    raw = message(text(), calendar, uuencoded, tnef, inline_text)
    assert plan(raw, LinkingRules(min_size=1)) == Passthrough("no-attachments")


def test_report_parts_stay() -> None:
    dsn = entity(["Content-Type: message/delivery-status"], b"Reporting-MTA: dns; x\r\n")
    returned = attachment(PDF)
    raw = message(text(), dsn, returned, subtype="report")
    assert plan(raw, LinkingRules(min_size=1)) == Passthrough("no-attachments")


def test_cid_referenced_image_stays_other_image_goes() -> None:
    page = html('<html><body><img src="cid:logo@x"></body></html>\r\n')
    logo = attachment(PDF, "logo.png", "image/png", extra=["Content-ID: <logo@x>"])
    photo = attachment(PDF, "photo.png", "image/png", extra=["Content-ID: <photo@x>"])
    related = multipart("related", "rel-b", [page, logo])
    ex, out = rendered(message(related, photo))
    assert [a.filename for a in ex.attachments] == ["photo.png"]
    assert logo in out


def test_content_length_on_top_is_removed() -> None:
    raw = message(text(), attachment(PDF)).replace(
        b"Subject: test\r\n", b"Subject: test\r\nContent-Length: 12345\r\n"
    )
    _, out = rendered(raw)
    assert b"Content-Length" not in out
    assert b"Subject: test\r\nMIME-Version: 1.0\r\n" in out


def test_message_without_text_gains_a_notice_part_first() -> None:
    raw = multipart(
        "mixed",
        "only-b",
        [attachment(PDF), attachment(PDF, "b.pdf")],
        headers=TOP,
        preamble=b"This is a multi-part message in MIME format.\r\n",
    )
    _, out = rendered(raw)
    msg = parse(out)
    leaves = email_leaves(msg)
    assert len(leaves) == 1
    assert leaves[0].get_content_type() == "text/plain"
    assert b"b.pdf" in email_payload(leaves[0])
    assert b"This is a multi-part message in MIME format.\r\n--only-b\r\n" in out


def test_single_part_attachment_becomes_multipart_mixed() -> None:
    headers = ["From: a@example.com", "Subject: scan", "X-Keep:  odd   spacing"]
    raw = entity(
        [
            *headers,
            "Content-Type: application/pdf; name=scan.pdf",
            "Content-Transfer-Encoding: base64",
        ],
        b64(PDF),
    )
    ex, out = rendered(raw)
    assert ex.attachments[0].data == PDF
    assert out.startswith("".join(h + "\r\n" for h in headers).encode())
    msg = parse(out)
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/mixed"
    [notice] = email_leaves(msg)
    assert b"scan.pdf" in email_payload(notice)
    assert b"application/pdf" not in out


def test_related_top_without_text_is_wrapped() -> None:
    picture = entity(
        ["Content-Type: image/gif", "Content-Transfer-Encoding: base64"], b64(b"GIF89a" * 9)
    )
    raw = message(picture, attachment(PDF), subtype="related")
    ex, out = rendered(raw)
    assert [a.filename for a in ex.attachments] == ["report.pdf"]
    msg = parse(out)
    assert msg.get_content_type() == "multipart/mixed"
    structure = [p.get_content_type() for p in msg.walk()]
    assert structure == ["multipart/mixed", "text/plain", "multipart/related", "image/gif"]
    assert picture in out


def test_alternative_gets_notice_in_both() -> None:
    alt = multipart("alternative", "alt-b", [text(), html()])
    _, out = rendered(message(alt, attachment(PDF)))
    plain, page = email_leaves(parse(out))
    assert b"token-0" in email_payload(plain)
    page_body = email_payload(page)
    assert page_body.index(b"token-0") < page_body.index(b"</body>")


def test_emptied_inner_multipart_goes_away() -> None:
    inner = multipart("mixed", "inner-b", [attachment(PDF), attachment(PDF, "b.pdf")])
    raw = message(text(), inner)
    _, out = rendered(raw)
    assert b"inner-b" not in out


def _forward(*parts: bytes) -> bytes:
    inner = multipart("mixed", "fwd-b", parts, headers=["Subject: inner"])
    return entity(["Content-Type: message/rfc822"], inner)


def test_nested_attachments_only_when_asked() -> None:
    raw = message(text(), _forward(text("inner text\r\n"), attachment(PDF, "inner.pdf")))
    assert plan(raw, RULES) == Passthrough("no-attachments")
    ex, out = rendered(raw, LinkingRules(min_size=10, nested=True))
    assert [a.filename for a in ex.attachments] == ["inner.pdf"]
    assert text("inner text\r\n") in out


def test_base64_forwarded_message_stays() -> None:
    fwd = entity(
        ["Content-Type: message/rfc822", "Content-Transfer-Encoding: base64"],
        b64(message(text(), attachment(PDF))),
    )
    raw = message(text(), fwd)
    assert plan(raw, LinkingRules(min_size=1, nested=True)) == Passthrough("no-attachments")


def test_signed_forwarded_message_is_kept_whole() -> None:
    signed = multipart(
        "signed",
        "sig-b",
        [attachment(PDF, "signed.pdf"), entity(["Content-Type: application/pgp-signature"], b"s")],
        headers=["Subject: signed"],
    )
    fwd = entity(["Content-Type: message/rfc822"], signed)
    raw = message(text(), fwd, attachment(PDF + b"top", "top.pdf"))
    ex, out = rendered(raw, LinkingRules(min_size=1, nested=True))
    assert [a.filename for a in ex.attachments] == ["top.pdf"]
    assert signed in out


@pytest.mark.parametrize(
    ("ctype", "reason"),
    [
        ('multipart/signed; protocol="application/pgp-signature"; boundary="s"', "signed"),
        ('multipart/encrypted; protocol="application/pgp-encrypted"; boundary="s"', "encrypted"),
        ("application/pkcs7-mime; smime-type=enveloped-data", "encrypted"),
        ("application/x-pkcs7-mime; smime-type=signed-data", "encrypted"),
    ],
)
def test_protected_content_passes_through(ctype: str, reason: str) -> None:
    part = entity([f"Content-Type: {ctype}"], b"--s\r\n\r\nx\r\n--s--\r\n")
    assert plan(message(text(), attachment(PDF), part), RULES) == Passthrough(reason)
    assert plan(entity([*TOP, f"Content-Type: {ctype}"], b"x"), RULES) == Passthrough(reason)


def test_limits() -> None:
    deep = attachment(PDF)
    for i in range(6):
        deep = multipart("mixed", f"d{i}", [deep])
    raw = message(text(), deep)
    assert plan(raw, RULES, MimeLimits(max_depth=4)) == Passthrough("limits:depth")
    assert isinstance(plan(raw, RULES, MimeLimits(max_depth=8)), Extraction)
    many = message(text(), *[attachment(PDF, f"{i}.pdf") for i in range(20)])
    assert plan(many, RULES, MimeLimits(max_parts=10)) == Passthrough("limits:parts")
    fat = message(text(), attachment(PDF)).replace(b"Subject: test", b"Subject: " + b"x" * 5000)
    assert plan(fat, RULES, MimeLimits(max_header_size=4096)) == Passthrough("limits:header-size")


def test_transfer_encodings_decode() -> None:
    qp = entity(
        [
            "Content-Type: application/octet-stream; name=q.bin",
            "Content-Transfer-Encoding: quoted-printable",
            "Content-Disposition: attachment; filename=q.bin",
        ],
        b"caf=C3=A9 =\r\nsoft break=3D\r\nline two",
    )
    eight = entity(
        [
            "Content-Type: application/octet-stream; name=e.bin",
            "Content-Transfer-Encoding: 8bit",
            "Content-Disposition: attachment; filename=e.bin",
        ],
        "caf\u00e9 raw bytes".encode(),
    )
    messy = entity(
        [
            "Content-Type: application/octet-stream; name=m.bin",
            "Content-Transfer-Encoding: base64",
            "Content-Disposition: attachment; filename=m.bin",
        ],
        b"  aGVsbG8g\r\n d29y \t\r\nbGQ",  # white space everywhere, padding missing
    )
    ex = extract(message(text(), qp, eight, messy), LinkingRules(min_size=1))
    assert [a.data for a in ex.attachments] == [
        "caf\u00e9 soft break=\r\nline two".encode(),
        "caf\u00e9 raw bytes".encode(),
        b"hello world",
    ]


def test_lwsp_after_delimiter_and_odd_preamble() -> None:
    raw = message(text(), attachment(PDF)).replace(b"--outer-b\r\n", b"--outer-b \t\r\n")
    ex, _ = rendered(raw)
    assert ex.attachments[0].data == PDF


def test_conflicting_content_types_pass_through() -> None:
    raw = message(text(), attachment(PDF)).replace(
        b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
    )
    assert plan(raw, RULES) == Passthrough("unparsable:duplicate-content-type")


def test_missing_close_delimiter_passes_through() -> None:
    raw = message(text(), attachment(PDF))
    raw = raw[: raw.rindex(b"--outer-b--")]
    assert plan(raw, RULES) == Passthrough("unparsable:missing-close-delimiter")


def test_render_checks_its_arguments() -> None:
    ex = extract(message(text(), attachment(PDF)))
    with pytest.raises(RenderError):
        ex.render([], T)
    naive = LinkNotice("a.pdf", 1, "https://x/d/1", datetime.datetime(2026, 1, 1))
    with pytest.raises(RenderError):
        ex.render([naive], T)


def test_output_parses_with_the_default_policy() -> None:
    _, out = rendered(message(text(), attachment(PDF), attachment(PDF, "b.pdf")))
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert not [d for p in msg.walk() for d in p.defects]
