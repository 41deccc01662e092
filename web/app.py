"""The download service: landing pages and file downloads behind signed links.

Routes::

    GET      /d/{token}        landing page (name, size, sender's domain, expiry, button)
    GET|HEAD /d/{token}/file   the bytes (ETag, conditional requests, single Range)
    GET      /healthz          "ok", or 503 when the state store does not answer

A forged, malformed or unknown token is ``404``; an expired token, a revoked
link or an expired record is ``410``. The page never says which cause it was.
Unexpected errors become a plain ``500`` page; details go to the log only.

Ranges: one ``bytes=a-b``, ``a-`` or ``-n`` range is answered with ``206``.
A request with several ranges gets the whole body with ``200`` (RFC 9110
allows a server to ignore Range; this keeps overlapping-range amplification
away). Syntactically broken or unsatisfiable ranges get ``416`` with
``Content-Range: bytes */size``.

Files are sent with ``sendfile`` when the blob store gives a local path, and
streamed in chunks from ``open_range`` otherwise; a file is never read into
memory whole. A ``GET`` that starts at byte 0 counts as a download; ``HEAD``,
``304`` and resumed ranges do not.

The response-building decisions are pure functions (``parse_range``,
``content_disposition``, ``safe_content_type``, ``etag_matches``,
``if_range_allows``, ``human_size``, ``sender_domain``, ``display_name``);
the handlers only translate between them and aiohttp.

This module raises no exceptions of its own; token errors are
``web.links.LinkError`` and storage errors ``storage.interfaces.StorageError``.
"""

from __future__ import annotations

import asyncio
import enum
import html
import io
import logging
import os
import re
import stat
import string
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

from aiohttp import web

from storage.interfaces import BlobNotFound, BlobStore, LinkRecord, StateStore
from web.links import BadToken, ExpiredToken, LinkSigner
from web.metrics import Metrics
from web.templates import PartialCache

__all__ = [
    "BLOBS_KEY",
    "OPTIONS_KEY",
    "SIGNER_KEY",
    "STATE_KEY",
    "ByteRange",
    "RangeVerdict",
    "WebOptions",
    "build_app",
    "content_disposition",
    "display_name",
    "etag_matches",
    "human_size",
    "if_range_allows",
    "parse_range",
    "safe_content_type",
    "sender_domain",
]

log = logging.getLogger("attachgate.web")

CHUNK_SIZE = 1024 * 1024
HEALTH_TIMEOUT = 2.0

PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

FILE_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Referrer-Policy": "no-referrer",
    # The browser may keep a copy but must ask again (ETag makes that a 304),
    # so a revoked link stops working; shared caches keep nothing.
    "Cache-Control": "private, no-cache",
    "Accept-Ranges": "bytes",
}

SERVER_NAME = "attachgate"


@dataclass(frozen=True)
class WebOptions:
    public_url: str
    clock: Callable[[], float] = time.time
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class _Pages:
    landing: string.Template
    not_found: str
    gone: str
    error: str
    plain: string.Template


STATE_KEY = web.AppKey("attachgate.state", StateStore)
BLOBS_KEY = web.AppKey("attachgate.blobs", BlobStore)
SIGNER_KEY = web.AppKey("attachgate.signer", LinkSigner)
OPTIONS_KEY = web.AppKey("attachgate.options", WebOptions)
_PAGES_KEY = web.AppKey("attachgate.pages", _Pages)


# --------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``start`` .. ``end`` inclusive of a representation of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


class RangeVerdict(enum.Enum):
    WHOLE = "whole"  # ignore the Range header, send everything with 200
    UNSATISFIABLE = "unsatisfiable"  # 416


MAX_RANGE_HEADER = 1024
_RANGE_SPEC = re.compile(r"(?:(\d{1,18})-(\d{0,18})|-(\d{1,18}))")


def _evaluate_spec(match: re.Match[str], size: int) -> ByteRange | RangeVerdict:
    first, last, suffix = match.groups()
    if suffix is not None:
        length = int(suffix)
        if length == 0:
            return RangeVerdict.UNSATISFIABLE
        if size == 0:
            # A suffix range of an empty body is satisfiable but names no
            # byte, so there is nothing a Content-Range could describe.
            return RangeVerdict.WHOLE
        return ByteRange(max(0, size - length), size - 1, size)
    start = int(first)
    end = int(last) if last else size - 1
    if (last and end < start) or start >= size:
        return RangeVerdict.UNSATISFIABLE
    return ByteRange(start, min(end, size - 1), size)


def parse_range(header: str, size: int) -> ByteRange | RangeVerdict:
    """Decide what a ``Range`` header asks of a body of ``size`` bytes.

    One satisfiable range gives a ByteRange; several well-formed ranges of
    which at least one is satisfiable give WHOLE; anything malformed or
    unsatisfiable gives UNSATISFIABLE.
    """
    if len(header) > MAX_RANGE_HEADER:
        return RangeVerdict.UNSATISFIABLE
    unit, sep, ranges = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return RangeVerdict.UNSATISFIABLE
    matches = [_RANGE_SPEC.fullmatch(spec.strip()) for spec in ranges.split(",") if spec.strip()]
    if not matches or any(m is None for m in matches):
        return RangeVerdict.UNSATISFIABLE
    verdicts = [_evaluate_spec(m, size) for m in matches if m is not None]
    if len(verdicts) == 1:
        return verdicts[0]
    if all(v is RangeVerdict.UNSATISFIABLE for v in verdicts):
        return RangeVerdict.UNSATISFIABLE
    return RangeVerdict.WHOLE


def _entity_tags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def etag_matches(header: str, etag: str) -> bool:
    """``If-None-Match`` semantics: weak comparison, ``*`` matches anything."""
    tags = _entity_tags(header)
    if tags == ["*"]:
        return True
    return any(tag.removeprefix("W/") == etag for tag in tags)


def if_range_allows(header: str, etag: str, last_modified: float) -> bool:
    """True when the ``If-Range`` validator still names this representation.

    An entity tag must match strongly; a date must equal Last-Modified.
    """
    value = header.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    if when.tzinfo is None:
        return False
    return int(when.timestamp()) == int(last_modified)


_TYPE_RE = re.compile(r"[A-Za-z0-9!#$&^_.+\-]{1,64}/[A-Za-z0-9!#$&^_.+\-]{1,127}")


def safe_content_type(value: str) -> str:
    """The stored ``type/subtype`` (parameters dropped), or octet-stream."""
    essence = value.split(";", 1)[0].strip()
    if _TYPE_RE.fullmatch(essence):
        return essence.lower()
    return "application/octet-stream"


# Characters that reorder or hide text: bidi embeddings, overrides, isolates
# and marks. Shown or saved as-is they make "gpj.exe" look like "exe.jpg".
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def display_name(filename: str) -> str:
    """The file name with control, bidi and path-separator characters replaced."""
    out: list[str] = []
    for ch in filename:
        if ch in _BIDI_CONTROLS:
            out.append("\ufffd")
        elif unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in "/\\":
            out.append("_")
        else:
            out.append(ch)
    # Leading dots hide files on Unix; trailing dots and spaces vanish on Windows.
    name = "".join(out).strip(" .\t")
    return name or "download"


MAX_FALLBACK_NAME = 150


def _ascii_fallback(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name)
    chars: list[str] = []
    for ch in decomposed:
        if unicodedata.combining(ch):
            continue
        code = ord(ch)
        if code < 0x20 or code >= 0x7F or ch in '"\\%/':
            chars.append("_")
        else:
            chars.append(ch)
    fallback = "".join(chars).strip(" .")
    if len(fallback) > MAX_FALLBACK_NAME:
        stem, dot, ext = fallback.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            fallback = stem[: MAX_FALLBACK_NAME - len(ext) - 1] + "." + ext
        else:
            fallback = fallback[:MAX_FALLBACK_NAME]
    stem, dot, ext = fallback.rpartition(".")
    if not dot:
        stem, ext = fallback, ""
    # When nothing readable survived (an all non-Latin name) keep only the
    # extension, so the file still opens with the right program.
    if not any(c.isalnum() for c in fallback):
        fallback = "download"
    elif not any(c.isalnum() for c in stem) and ext.isalnum() and len(ext) <= 10:
        fallback = "download." + ext
    return fallback or "download"


def content_disposition(filename: str) -> str:
    """An RFC 6266 ``attachment`` value with an ASCII fallback and ``filename*``."""
    name = display_name(filename)
    fallback = _ascii_fallback(name)
    encoded = quote(name, safe="", encoding="utf-8", errors="strict")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_size(size: int) -> str:
    """``"1 byte"``, ``"512 bytes"``, ``"1.5 MiB"``."""
    if size < 1024:
        return "1 byte" if size == 1 else f"{size} bytes"
    value = float(size)
    for unit in _UNITS[:-1]:
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} {_UNITS[-1]}"


def sender_domain(sender: str) -> str:
    """Only the domain of the sender's address, lower-cased ('' when none)."""
    _, at, domain = sender.rpartition("@")
    domain = domain.strip().strip(">").lower()
    return domain if at and domain else ""


def format_expiry(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------


def _load_pages() -> _Pages:
    read = PartialCache().page
    return _Pages(
        landing=string.Template(read("landing.html")),
        not_found=read("not_found.html"),
        gone=read("gone.html"),
        error=read("error.html"),
        plain=string.Template(read("status.html")),
    )


def _html(text: str, status: int) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _status_page(pages: _Pages, status: int, reason: str) -> web.Response:
    text = pages.plain.substitute(status=status, reason=html.escape(reason))
    return _html(text, status)


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------


async def _resolve(request: web.Request) -> tuple[str, LinkRecord]:
    """The token and the live link record it names; 404 or 410 otherwise."""
    app = request.app
    options = app[OPTIONS_KEY]
    token = request.match_info["token"]
    try:
        link_id = app[SIGNER_KEY].verify(token)
    except ExpiredToken:
        options.metrics.inc("attachgate_download_refusals_total", status="410")
        raise web.HTTPGone() from None
    except BadToken:
        options.metrics.inc("attachgate_download_refusals_total", status="404")
        raise web.HTTPNotFound() from None
    record = await app[STATE_KEY].get_link(link_id)
    if record is None:
        options.metrics.inc("attachgate_download_refusals_total", status="404")
        raise web.HTTPNotFound()
    if record.revoked or record.expires <= options.clock():
        options.metrics.inc("attachgate_download_refusals_total", status="410")
        raise web.HTTPGone()
    return token, record


def _file_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/d/{quote(token, safe='')}/file"


async def landing(request: web.Request) -> web.Response:
    token, record = await _resolve(request)
    app = request.app
    pages = app[_PAGES_KEY]
    domain = sender_domain(record.sender)
    app[OPTIONS_KEY].metrics.inc("attachgate_landing_views_total")
    text = pages.landing.substitute(
        filename=html.escape(display_name(record.filename)),
        size=html.escape(human_size(record.size)),
        sender=html.escape(domain or "an unknown sender"),
        expires=html.escape(format_expiry(record.expires)),
        file_url=html.escape(_file_url(app[OPTIONS_KEY].public_url, token)),
    )
    return _html(text, 200)


def _open_local(blobs: BlobStore, digest: str) -> tuple[io.BufferedReader, int] | None:
    """Open a blob file for sendfile.

    Returns None when the store is not local; raises BlobNotFound when the
    file is missing or not a regular file. Runs in a worker thread.
    """
    path = blobs.local_path(digest)
    if path is None:
        return None
    try:
        fobj = path.open("rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise BlobNotFound(digest) from None
    try:
        st = os.fstat(fobj.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BlobNotFound(digest)
    except BaseException:
        fobj.close()
        raise
    return fobj, st.st_size


def _read_at(fobj: io.BufferedReader, offset: int, length: int) -> bytes:
    return os.pread(fobj.fileno(), length, offset)


async def _send_chunks(
    resp: web.StreamResponse, fobj: io.BufferedReader, offset: int, count: int
) -> None:
    loop = asyncio.get_running_loop()
    while count > 0:
        chunk = await loop.run_in_executor(None, _read_at, fobj, offset, min(CHUNK_SIZE, count))
        if not chunk:
            raise OSError("blob file shorter than expected")
        await resp.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


async def _send_file(
    request: web.Request, resp: web.StreamResponse, fobj: io.BufferedReader, byte_range: ByteRange
) -> None:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, fobj, byte_range.start, byte_range.length)
    except NotImplementedError:
        # Event loops without sendfile (uvloop) stream through the executor.
        await _send_chunks(resp, fobj, byte_range.start, byte_range.length)


async def _send_stream(
    resp: web.StreamResponse, blobs: BlobStore, digest: str, byte_range: ByteRange
) -> None:
    sent = 0
    async for chunk in blobs.open_range(digest, byte_range.start, byte_range.end):
        await resp.write(chunk)
        sent += len(chunk)
    if sent != byte_range.length:
        raise OSError(f"blob stream gave {sent} bytes, {byte_range.length} expected")


async def download(request: web.Request) -> web.StreamResponse:
    _, record = await _resolve(request)
    app = request.app
    blobs = app[BLOBS_KEY]
    digest = record.blob_digest
    etag = f'"{digest}"'
    headers: dict[str, str] = dict(FILE_HEADERS)
    headers["ETag"] = etag
    headers["Last-Modified"] = formatdate(record.created, usegmt=True)

    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            return web.Response(status=304, headers=headers)
    else:
        since = request.if_modified_since
        if since is not None and int(record.created) <= since.timestamp():
            return web.Response(status=304, headers=headers)

    loop = asyncio.get_running_loop()
    try:
        opened = await loop.run_in_executor(None, _open_local, blobs, digest)
        if opened is None:
            fobj, size = None, await blobs.size(digest)
        else:
            fobj, size = opened
    except BlobNotFound:
        log.error("blob missing for link", extra={"link_id": record.link_id, "digest": digest})
        app[OPTIONS_KEY].metrics.inc("attachgate_download_refusals_total", status="410")
        raise web.HTTPGone() from None

    try:
        return await _respond_with_file(request, record, headers, fobj, size)
    finally:
        if fobj is not None:
            await loop.run_in_executor(None, fobj.close)


async def _respond_with_file(
    request: web.Request,
    record: LinkRecord,
    headers: dict[str, str],
    fobj: io.BufferedReader | None,
    size: int,
) -> web.StreamResponse:
    app = request.app
    headers["Content-Type"] = safe_content_type(record.content_type)
    headers["Content-Disposition"] = content_disposition(record.filename)

    byte_range = ByteRange(0, size - 1, size)
    status = 200
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if range_header is not None and (
        if_range is None or if_range_allows(if_range, headers["ETag"], record.created)
    ):
        verdict = parse_range(range_header, size)
        if verdict is RangeVerdict.UNSATISFIABLE:
            headers["Content-Range"] = f"bytes */{size}"
            del headers["Content-Disposition"]
            headers["Content-Type"] = "text/plain; charset=utf-8"
            return web.Response(status=416, headers=headers, text="range not satisfiable\n")
        if isinstance(verdict, ByteRange):
            byte_range, status = verdict, 206
            headers["Content-Range"] = verdict.content_range

    if request.method == "GET" and byte_range.start == 0:
        app[OPTIONS_KEY].metrics.inc("attachgate_downloads_total")
        try:
            await app[STATE_KEY].record_download(record.link_id, app[OPTIONS_KEY].clock())
        except Exception:
            # A counter that cannot be written must not cost the recipient
            # the file; the failure is logged for the administrator.
            log.exception("could not count a download", extra={"link_id": record.link_id})

    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = byte_range.length if size else 0
    await resp.prepare(request)
    if request.method == "HEAD" or size == 0:
        await resp.write_eof()
        return resp
    try:
        if fobj is not None:
            await _send_file(request, resp, fobj, byte_range)
        else:
            await _send_stream(resp, app[BLOBS_KEY], record.blob_digest, byte_range)
        await resp.write_eof()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The status line is out: nothing can be answered any more. Drop the
        # connection so the client sees a short body rather than a wrong one.
        if isinstance(exc, ConnectionError):
            log.debug("download interrupted", extra={"link_id": record.link_id})
        else:
            log.exception("download failed mid-body", extra={"link_id": record.link_id})
        if request.transport is not None:
            request.transport.close()
    return resp


async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            await request.app[STATE_KEY].get_link("healthz-probe")
    except Exception as exc:
        # Probed every few seconds while the store is down: one line, no trace.
        log.warning("health check: state store does not answer: %r", exc)
        return web.Response(status=503, text="unavailable\n", headers={"Cache-Control": "no-store"})
    return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------
# Middleware, headers, assembly
# --------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    pages = request.app[_PAGES_KEY]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _html(pages.not_found, 404)
        if exc.status == 410:
            return _html(pages.gone, 410)
        if exc.status < 400:
            raise
        resp = _status_page(pages, exc.status, exc.reason)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error", extra={"path": request.path, "method": request.method})
        return _html(pages.error, 500)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = SERVER_NAME


def build_app(
    state: StateStore, blobs: BlobStore, signer: LinkSigner, options: WebOptions
) -> web.Application:
    """The download service as an aiohttp application; the caller runs it."""
    app = web.Application(middlewares=[_error_pages], client_max_size=64 * 1024)
    app[STATE_KEY] = state
    app[BLOBS_KEY] = blobs
    app[SIGNER_KEY] = signer
    app[OPTIONS_KEY] = options
    app[_PAGES_KEY] = _load_pages()
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/d/{token}", landing)
    app.router.add_get("/d/{token}/file", download)
    return app
