"""The download service over real HTTP, with real files and real SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from email.utils import formatdate
from pathlib import Path

import pytest
from multidict import CIMultiDictProxy

from tests.web.conftest import DAY, KEYS, WebEnv
from web.app import FILE_HEADERS, PAGE_HEADERS
from web.links import LinkSigner

DATA = os.urandom(100_000)
SIZE = len(DATA)


def assert_headers(headers: CIMultiDictProxy[str], expected: dict[str, str]) -> None:
    for name, value in expected.items():
        assert headers.get(name) == value, name


async def fetch(env: WebEnv, url: str, **headers: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with env.session.get(url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def raw_request(env: WebEnv, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send a request line exactly as written (no client-side normalisation)."""
    host, port = env.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- landing page --------------------------------------------------------


async def test_landing_page(web_env: WebEnv) -> None:
    token = await web_env.add_file(
        DATA, filename="Quarterly report.pdf", sender="alice.smith@Sales.Example.com"
    )
    status, headers, body = await fetch(web_env, web_env.page_url(token))
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert_headers(headers, dict(PAGE_HEADERS))
    page = body.decode()
    assert "Quarterly report.pdf" in page
    assert "97.7 KiB" in page
    assert "sales.example.com" in page
    assert "alice" not in page.lower()
    assert "2026-10-21 14:13 UTC" in page  # T0 + 30 days
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    links = re.findall(r'href="([^"]*)"', page)
    assert links == [web_env.file_url(token)]
    assert "<script" not in page.lower()
    assert not re.search(r"\b(src|srcset|action)=", page)
    assert "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert headers["Server"] == "attachgate"


async def test_landing_page_escapes_a_hostile_name(web_env: WebEnv) -> None:
    hostile = '<script>alert("x")</script>\u202egpj.exe" onmouseover="x'
    token = await web_env.add_file(b"x", filename=hostile, sender='"<b>"@evil.example')
    status, _, body = await fetch(web_env, web_env.page_url(token))
    assert status == 200
    page = body.decode()
    assert "<script" not in page
    assert "\u202e" not in page
    assert "onmouseover=" not in page.replace("onmouseover=&quot;", "")
    assert (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;_script&gt;\ufffdgpj.exe&quot; onmouseover" in page
    )
    assert "<b>" not in page
    assert "evil.example" in page


async def test_head_on_the_landing_page(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    async with web_env.session.head(web_env.page_url(token)) as resp:
        assert resp.status == 200
        assert_headers(resp.headers, dict(PAGE_HEADERS))
        assert await resp.read() == b""


# --- token and record states -----------------------------------------------


async def _not_found_body(env: WebEnv) -> bytes:
    status, headers, body = await fetch(env, f"{env.base_url}/d/nonsense")
    assert status == 404
    assert_headers(headers, dict(PAGE_HEADERS))
    return body


async def test_forged_malformed_and_unknown_tokens_all_look_alike(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    reference = await _not_found_body(web_env)
    assert b"Link not found" in reference
    payload, stamp, signature = token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    other_salt = LinkSigner(KEYS, 30 * DAY, clock=web_env.clock, salt="other").sign(
        web_env.records[token].link_id
    )
    retired = LinkSigner(["retired-key"], 30 * DAY, clock=web_env.clock).sign(
        web_env.records[token].link_id
    )
    unknown = web_env.signer.sign("no-such-link")
    for bad in (f"{payload}.{stamp}.{flipped}", other_salt, retired, unknown, "x" * 600, "a.b.c"):
        for url in (web_env.page_url(bad), web_env.file_url(bad)):
            status, headers, body = await fetch(web_env, url)
            assert status == 404, bad
            assert body == reference
            assert_headers(headers, dict(PAGE_HEADERS))
    assert await web_env.download_count(token) == 0


async def test_rotated_key_keeps_old_links_working(web_env: WebEnv) -> None:
    # The server verifies with KEYS = [current, previous]: a link signed when
    # "previous" was the only key still works.
    token = await web_env.add_file(DATA)
    link_id = web_env.records[token].link_id
    old = LinkSigner([KEYS[1]], 30 * DAY, clock=web_env.clock).sign(link_id)
    status, _, body = await fetch(web_env, web_env.file_url(old))
    assert status == 200
    assert body == DATA


async def test_expired_token_is_gone(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA, expires_in=90 * DAY)
    web_env.clock.advance(30 * DAY)
    assert (await fetch(web_env, web_env.file_url(token)))[0] == 200
    web_env.clock.advance(1)
    for url in (web_env.page_url(token), web_env.file_url(token)):
        status, headers, body = await fetch(web_env, url)
        assert status == 410
        assert b"no longer available" in body
        assert_headers(headers, dict(PAGE_HEADERS))


async def test_expired_record_is_gone(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA, expires_in=DAY)
    web_env.clock.advance(DAY - 1)
    assert (await fetch(web_env, web_env.page_url(token)))[0] == 200
    web_env.clock.advance(1)
    assert (await fetch(web_env, web_env.page_url(token)))[0] == 410
    assert (await fetch(web_env, web_env.file_url(token)))[0] == 410


async def test_revoked_link_is_gone(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    assert await web_env.state.revoke_link(web_env.records[token].link_id)
    expired_body = None
    for url in (web_env.page_url(token), web_env.file_url(token)):
        status, _, body = await fetch(web_env, url)
        assert status == 410
        expired_body = expired_body or body
        assert body == expired_body


async def test_missing_blob_is_gone_not_an_error(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    await web_env.blobs.delete(web_env.records[token].blob_digest)
    status, _, body = await fetch(web_env, web_env.file_url(token))
    assert status == 410
    assert b"Traceback" not in body


# --- the file --------------------------------------------------------------


async def test_file_download_headers_and_bytes(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA, filename="Grüße «report».pdf")
    status, headers, body = await fetch(any_env, any_env.file_url(token))
    assert status == 200
    assert body == DATA
    assert_headers(headers, dict(FILE_HEADERS))
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Length"] == str(SIZE)
    assert headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert headers["Last-Modified"] == formatdate(any_env.clock(), usegmt=True)
    assert headers["Content-Disposition"] == (
        'attachment; filename="Gruße _report_.pdf"'.replace("ß", "_")
        + "; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%C2%ABreport%C2%BB.pdf"
    )
    assert headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert headers["X-Frame-Options"] == "DENY"
    assert "Content-Encoding" not in headers


async def test_content_type_is_stored_never_guessed(web_env: WebEnv) -> None:
    cases = {
        ("page.html", "application/pdf"): "application/pdf",
        ("photo.jpg", "text/plain; charset=utf-8"): "text/plain",
        ("archive.zip", "not a type"): "application/octet-stream",
        ("notes.txt", ""): "application/octet-stream",
    }
    for (name, stored), served in cases.items():
        token = await web_env.add_file(name.encode(), filename=name, content_type=stored)
        _, headers, _ = await fetch(web_env, web_env.file_url(token))
        assert headers["Content-Type"] == served, name


async def test_a_gz_sibling_is_never_served(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA, filename="data.bin")
    path = web_env.blobs.local_path(web_env.records[token].blob_digest)
    assert path is not None
    Path(f"{path}.gz").write_bytes(b"not the file")
    Path(f"{path}.br").write_bytes(b"not the file either")
    status, headers, body = await fetch(
        web_env, web_env.file_url(token), **{"Accept-Encoding": "gzip, br"}
    )
    assert status == 200
    assert body == DATA
    assert "Content-Encoding" not in headers


async def test_head_gives_headers_without_body_or_count(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA)
    async with any_env.session.head(any_env.file_url(token)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(SIZE)
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
        assert await resp.read() == b""
    assert await any_env.download_count(token) == 0
    await fetch(any_env, any_env.file_url(token))
    assert await any_env.download_count(token) == 1
    async with any_env.session.head(any_env.file_url(token)) as resp:
        assert resp.status == 200
    assert await any_env.download_count(token) == 1


async def test_download_counting(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    url = web_env.file_url(token)
    await fetch(web_env, url)
    assert await web_env.download_count(token) == 1
    await fetch(web_env, url, Range="bytes=0-9")
    assert await web_env.download_count(token) == 2
    await fetch(web_env, url, Range="bytes=10-")
    assert await web_env.download_count(token) == 2
    _, headers, _ = await fetch(web_env, url)
    await fetch(web_env, url, **{"If-None-Match": headers["ETag"]})
    assert await web_env.download_count(token) == 3
    await fetch(web_env, url, Range="bytes=5-1")
    await fetch(web_env, web_env.page_url(token))
    assert await web_env.download_count(token) == 3
    record = await web_env.state.get_link(web_env.records[token].link_id)
    assert record is not None
    assert record.last_download == web_env.clock()


async def test_empty_file(web_env: WebEnv) -> None:
    token = await web_env.add_file(b"", filename="empty.txt", content_type="text/plain")
    status, headers, body = await fetch(web_env, web_env.file_url(token))
    assert (status, body, headers["Content-Length"]) == (200, b"", "0")
    status, headers, _ = await fetch(web_env, web_env.file_url(token), Range="bytes=0-")
    assert (status, headers["Content-Range"]) == (416, "bytes */0")


# --- ranges and validators -----------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=-500", SIZE - 500, SIZE - 1),
        ("bytes=99000-", 99000, SIZE - 1),
        ("bytes=99990-200000", 99990, SIZE - 1),
        ("bytes=0-", 0, SIZE - 1),
    ],
)
async def test_single_range(any_env: WebEnv, header: str, start: int, end: int) -> None:
    token = await any_env.add_file(DATA)
    status, headers, body = await fetch(any_env, any_env.file_url(token), Range=header)
    assert status == 206
    assert body == DATA[start : end + 1]
    assert headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert_headers(headers, dict(FILE_HEADERS))


async def test_resume_from_the_middle(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA)
    url = any_env.file_url(token)
    # A download that broke off after 37,123 bytes, then resumed.
    async with any_env.session.get(url) as resp:
        first = await resp.content.readexactly(37_123)
        etag = resp.headers["ETag"]
    status, headers, rest = await fetch(any_env, url, Range="bytes=37123-", **{"If-Range": etag})
    assert status == 206
    assert first + rest == DATA
    assert headers["Content-Range"] == f"bytes 37123-{SIZE - 1}/{SIZE}"


async def test_multi_range_gets_the_whole_body(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA)
    status, headers, body = await fetch(any_env, any_env.file_url(token), Range="bytes=0-1,5-9")
    assert status == 200
    assert body == DATA
    assert "Content-Range" not in headers


@pytest.mark.parametrize(
    "header",
    [
        "bytes=999999999-",
        "bytes=5-1",
        "bytes=-0",
        f"bytes={SIZE}-",
        "bytes=",
        "bytes=abc",
        "garbage",
        "items=0-1",
        "bytes=0-1,junk",
        "bytes=" + "1" * 30 + "-",
    ],
)
async def test_absurd_ranges_are_unsatisfiable(any_env: WebEnv, header: str) -> None:
    token = await any_env.add_file(DATA)
    status, headers, body = await fetch(any_env, any_env.file_url(token), Range=header)
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{SIZE}"
    assert DATA[:16] not in body
    assert await any_env.download_count(token) == 0


async def test_if_range_with_another_validator_gets_the_whole_body(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA)
    url = any_env.file_url(token)
    status, _, body = await fetch(any_env, url, Range="bytes=10-", **{"If-Range": '"stale"'})
    assert (status, body) == (200, DATA)
    date = formatdate(any_env.clock(), usegmt=True)
    status, _, body = await fetch(any_env, url, Range="bytes=10-", **{"If-Range": date})
    assert (status, body) == (206, DATA[10:])


async def test_if_none_match_gives_304(any_env: WebEnv) -> None:
    token = await any_env.add_file(DATA)
    url = any_env.file_url(token)
    etag = f'"{hashlib.sha256(DATA).hexdigest()}"'
    for value in (etag, f"W/{etag}", f'"x", {etag}', "*"):
        status, headers, body = await fetch(any_env, url, **{"If-None-Match": value})
        assert status == 304
        assert body == b""
        assert headers["ETag"] == etag
    status, _, body = await fetch(any_env, url, **{"If-None-Match": '"other"'})
    assert (status, body) == (200, DATA)
    assert await any_env.download_count(token) == 1


async def test_if_modified_since(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    url = web_env.file_url(token)
    status, _, _ = await fetch(
        web_env, url, **{"If-Modified-Since": formatdate(web_env.clock(), usegmt=True)}
    )
    assert status == 304
    earlier = formatdate(web_env.clock() - 60, usegmt=True)
    status, _, body = await fetch(web_env, url, **{"If-Modified-Since": earlier})
    assert (status, body) == (200, DATA)


# --- paths, methods, health, failures --------------------------------------


async def test_traversal_and_encoded_paths_are_not_found(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    targets = [
        "/d/../../etc/passwd",
        "/d/%2e%2e/%2e%2e/etc/passwd",
        "/d/%2e%2e/",
        "/d/..%2f..%2fetc%2fpasswd",
        "/d/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file",
        f"/d/{token}%2ffile",
        f"/d/{token}%2Ffile",
        f"/d/{token}/file%2f..%2f..%2fetc%2fpasswd",
        f"/d/{token}/..%2f..%2f..%2fetc%2fpasswd",
        "/d//etc/passwd",
        "/d/",
        "/etc/passwd",
        "/d/%00",
        "/d/%E2%80%AE",
    ]
    for target in targets:
        status, body = await raw_request(web_env, target)
        assert status == 404, target
        assert b"root:" not in body
        assert DATA[:16] not in body
    assert await web_env.download_count(token) == 0
    # The same token on the right path does serve the file.
    status, body = await raw_request(web_env, f"/d/{token}/file")
    assert (status, body) == (200, DATA)


async def test_wrong_method_gets_a_plain_page(web_env: WebEnv) -> None:
    token = await web_env.add_file(DATA)
    async with web_env.session.post(web_env.file_url(token), data=b"x") as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
        assert_headers(resp.headers, dict(PAGE_HEADERS))
        assert "Method Not Allowed" in await resp.text()


async def test_healthz(web_env: WebEnv) -> None:
    status, headers, body = await fetch(web_env, f"{web_env.base_url}/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Cache-Control"] == "no-store"
    await web_env.state.close()
    status, _, body = await fetch(web_env, f"{web_env.base_url}/healthz")
    assert (status, body) == (503, b"unavailable\n")


async def test_internal_errors_are_a_plain_500(
    web_env: WebEnv, caplog: pytest.LogCaptureFixture
) -> None:
    token = await web_env.add_file(DATA)
    await web_env.state.close()
    for url in (web_env.page_url(token), web_env.file_url(token)):
        status, headers, body = await fetch(web_env, url)
        assert status == 500
        assert b"Something went wrong" in body
        for leak in (b"Traceback", b"StateUnavailable", b"sqlite", b"closed"):
            assert leak not in body
        assert_headers(headers, dict(PAGE_HEADERS))
    assert any(r.exc_info and "StateUnavailable" in repr(r.exc_info[1]) for r in caplog.records)
