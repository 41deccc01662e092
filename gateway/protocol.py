"""The SMTP session: aiosmtpd with a chunked, smuggling-proof DATA reader.

aiosmtpd reads DATA one line at a time and joins a list of lines at the end,
which caps a process at a few tens of MiB/s and holds several copies of each
message. :class:`GatewaySMTP` keeps every other part of aiosmtpd and replaces
``smtp_DATA`` with a reader that takes whatever the socket has buffered,
looks for the end-of-data marker with ``bytes.find`` and undoes dot-stuffing
with one ``replace``. It holds about one copy of a message while receiving and
two for a moment at the end.

The rules of the reader:

* The only end of data is ``CRLF . CRLF`` (counting the CRLF that ended the
  DATA command, so ``.`` CRLF right after ``354`` is an empty message).
  ``LF . LF``, ``CR . CR``, ``LF . CRLF`` and the other spellings used for SMTP
  smuggling are ordinary content.
* Bare CR and bare LF in the content become CRLF, so a smuggled ``LF . LF``
  turns into an ordinary dot line that the outbound client stuffs again.
* A message containing NUL is refused (``550 5.6.0``) once the real end of
  data has been read.
* More than ``data_size_limit`` bytes are read and thrown away up to the real
  end of data, then answered once with ``552 5.3.4``; the handler is not
  called and the session stays usable. Lines are not limited in length: the
  size limit is the only bound (with :attr:`GatewaySMTP.unlimited_data_cap`
  standing in when aiosmtpd's limit is switched off).
* The idle timeout is restarted by every chunk that arrives.

``STARTTLS`` with more plaintext pipelined behind it (command injection, as in
CVE-2011-0411) is answered with ``421`` and the connection is closed, so no
injected command runs.

Errors: this module defines no exceptions of its own. Bad input is answered
with an SMTP reply; a peer that goes away ends its session quietly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from typing import Any, Final

from aiosmtpd.smtp import MISSING, SMTP, syntax

from gateway.replies import R550_NUL, R552_TOO_BIG, Reply

__all__ = [
    "END_OF_DATA",
    "R421_STARTTLS_PIPELINING",
    "DataReceiver",
    "GatewaySMTP",
    "normalize_line_endings",
]

log = logging.getLogger("attachgate.protocol")

END_OF_DATA: Final = b"\r\n.\r\n"
_MARKER_TAIL: Final = len(END_OF_DATA) - 1
_DOT_LINE: Final = b"\r\n."
_DOT: Final = b"."
_CR: Final = 13
_LF: Final = 10
# _find_end looks for single dots (a memchr each) until it has stepped over more dots inside
# lines than _DOT_MISSES plus one per _BYTES_PER_DOT_MISS bytes, about what a Python step per
# dot costs; then for CR LF "." (slower per byte: CR LF ends every line).
_DOT_MISSES: Final = 2
_BYTES_PER_DOT_MISS: Final = 256
# Every byte value but CR and LF, for deleting all the others with bytes.translate.
_NOT_CR_LF: Final = bytes(b for b in range(256) if b not in (_CR, _LF))
# A CR and a byte after it other than LF (the regex engine skips to each CR quickly).
_CR_THEN_NOT_LF: Final = re.compile(rb"\r[^\n]")
# What ends a line of the message that the terminator follows; it belongs to the message.
_CRLF: Final = b"\r\n"
# StreamReader.read(n) returns at most what is buffered; asking for "everything" empties
# the buffer, so bytes read past the end of data can be handed back in order.
_READ_ALL: Final = sys.maxsize

R421_STARTTLS_PIPELINING: Final = Reply(
    421, "4.7.0", "Commands pipelined after STARTTLS, closing connection"
)


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF; CRLF stays as it is.

    Input that already has CRLF line endings only is returned as the same
    object. Two passes tell, copying only the line breaks: with every byte but
    CR and LF deleted, what is left must be CR LF repeated (as many CRs as
    LFs, taking turns, the last an LF); and no CR may be followed by a byte
    other than LF (a CR at the very end would be the last of them). Then
    every CR has its LF right after it, which leaves no LF bare either.
    """
    breaks = data.translate(None, _NOT_CR_LF)
    half, odd = divmod(len(breaks), 2)
    if not odd and breaks == _CRLF * half and _CR_THEN_NOT_LF.search(data) is None:
        return data
    # Every CRLF becomes LF; what CR is left was bare and becomes LF too; then each LF
    # (one per line break) becomes CRLF.
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class DataReceiver:
    """One DATA transfer, fed with chunks as they arrive; no I/O.

    ``feed`` returns ``None`` until the end-of-data marker has been seen,
    then the bytes that followed it (the next commands of a pipelining
    client), which the caller hands back to the command reader. Afterwards
    ``too_big``, ``has_nul`` and ``message()`` tell what was received.

    The buffer starts with the CRLF that ended the DATA command, so the empty
    message, a leading ``..`` and a marker split across chunks need no
    special cases.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_dots",
        "_limit",
        "_overflow",
        "_received",
        "_scan_from",
        "_size",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray(_CRLF)
        self._scan_from = 0
        self._received = 0
        self._overflow = False
        self._done = False
        self._size = 0
        self._dots = False  # a line starting with "." was seen (stuffing to undo)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def size(self) -> int:
        """Bytes of the message as sent (dot-stuffed, without the final ``.`` CRLF)."""
        return self._size

    @property
    def too_big(self) -> bool:
        return self._overflow or self._size > self._limit

    @property
    def has_nul(self) -> bool:
        return b"\x00" in self._buf

    def feed(self, chunk: bytes) -> bytes | None:
        if self._done:
            raise ValueError("the end of data was already received")
        buf = self._buf
        self._received += len(chunk)
        buf += chunk
        idx = self._find_end()
        if idx < 0:
            # Up to ".\r" of the terminator may already be here; the rest is message.
            if not self._overflow and self._received - 2 > self._limit:
                self._overflow = True
            if self._overflow:
                # Draining: keep only what may be the start of a split marker.
                del buf[:-_MARKER_TAIL]
                self._scan_from = 0
            return None
        end = idx + len(END_OF_DATA)
        leftover = bytes(buf[end:])
        # Keep the CRLF that ended the last line; drop ".\r\n" and what follows.
        del buf[idx + len(_CRLF) :]
        self._done = True
        self._size = self._received - len(leftover) - 3
        if self._overflow:
            buf.clear()
        return leftover

    def _find_end(self) -> int:
        """Where the end-of-data marker starts, or -1.

        One pass finds every line that starts with a dot: the marker is the
        first such line that is nothing but the dot; any other means there
        is dot-stuffing to undo. Where fewer than two bytes follow a dot line
        the next chunk decides, so the next scan starts there.

        The pass looks for single dots and checks that CR LF comes before
        each, which skips a body without dots (base64) far faster than
        looking for CR LF "." (CR LF ends every line). Once this call has
        stepped over more dots inside lines than ``_DOT_MISSES`` plus one per
        ``_BYTES_PER_DOT_MISS`` bytes, it looks for CR LF "." for the rest of
        the call, so text full of dots costs no Python step per dot. Both
        ways find the same lines, so the result does not depend on the way.
        """
        buf = self._buf
        pos = self._scan_from  # no dot line starts before pos
        start = pos
        misses = 0
        by_dot = True
        while True:
            if by_dot:
                dot = buf.find(_DOT, pos + len(_CRLF))
                if dot >= 0 and (buf[dot - 1] != _LF or buf[dot - 2] != _CR):
                    misses += 1
                    by_dot = misses <= _DOT_MISSES + (dot - start) // _BYTES_PER_DOT_MISS
                    # No dot line starts before dot - 1 (nor there: it would need a CR at dot).
                    pos = dot - 1
                    continue
                idx = dot - len(_CRLF) if dot >= 0 else -1
            else:
                idx = buf.find(_DOT_LINE, pos)
            if idx < 0:
                # A CR LF "." split across chunks may start in the last 2 bytes.
                self._scan_from = max(pos, len(buf) - len(_DOT_LINE) + 1)
                return -1
            after = buf[idx + len(_DOT_LINE) : idx + len(END_OF_DATA)]
            if len(after) < len(_CRLF):
                self._scan_from = idx
                return -1
            if after == _CRLF:
                return idx
            self._dots = True
            pos = idx + len(_DOT_LINE)

    def message(self) -> bytes:
        """The content: dot-stuffing undone, line endings normalised.

        Hands over the buffer; a second call returns ``b""``.
        """
        if not self._done:
            raise ValueError("the end of data has not been received yet")
        buf = self._buf
        self._buf = bytearray()
        # RFC 5321 4.5.2: the first dot of every line that starts with one goes (the
        # terminator is already cut off), which for "..x" is undoing the stuffing.
        if self._dots:
            buf = buf.replace(_DOT_LINE, _CRLF)
        del buf[: len(_CRLF)]
        data = bytes(buf)
        del buf
        return normalize_line_endings(data)


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a chunked DATA reader and a stricter STARTTLS."""

    unlimited_data_cap: int = 1 << 30
    """Bound on one message when ``data_size_limit`` is ``None`` or 0."""

    @property
    def _peer(self) -> Any:
        return self.session.peer if self.session is not None else None

    def _set_post_data_state(self) -> None:
        # Typed override only: aiosmtpd leaves this method unannotated.
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def data_refused(self, reason: str) -> None:
        """The reader refused the message before the handler saw it (a hook)."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        # The same checks and replies, in the same order, as aiosmtpd's smtp_DATA.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return

        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit: int = self.data_size_limit or self.unlimited_data_cap
        receiver = DataReceiver(limit)
        reader: asyncio.StreamReader = self._reader
        leftover: bytes | None = None
        while leftover is None:
            try:
                chunk = await reader.read(_READ_ALL)
            except asyncio.CancelledError:
                # Timeout or disconnect: connection_lost cancelled this session.
                log.info("%r connection lost during DATA", self._peer)
                self._writer.close()
                raise
            if not chunk:
                log.info("%r end of stream during DATA", self._peer)
                self._writer.close()
                return
            self._reset_timeout()
            leftover = receiver.feed(chunk)
        # Nothing was awaited since the read emptied the reader's buffer, so the
        # bytes after the marker go back in front of anything that arrives later.
        if leftover and not reader.at_eof():
            reader.feed_data(leftover)

        if receiver.too_big:
            log.info("%r message too big: %d bytes", self._peer, receiver.size)
            self.data_refused("too-big")
            self._set_post_data_state()
            await self.push(str(R552_TOO_BIG))
            return
        if receiver.has_nul:
            log.info("%r message refused: NUL in DATA", self._peer)
            self.data_refused("nul")
            self._set_post_data_state()
            await self.push(str(R550_NUL))
            return

        original_content = receiver.message()
        content: bytes | str = original_content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    self._set_post_data_state()
                    await self.push("500 Error: strict ASCII mode")
                    return
        self.envelope.content = content
        self.envelope.original_content = original_content

        status: Any = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not arg and self.tls_context and self._plaintext_pending():
            log.warning("%r commands pipelined after STARTTLS", self._peer)
            # Throw the plaintext away first: the command loop must find nothing to run
            # before connection_lost cancels it.
            self._discard_plaintext()
            await self.push(str(R421_STARTTLS_PIPELINING))
            if self.transport is not None:
                self.transport.close()
            return
        await super().smtp_STARTTLS(arg)

    def _plaintext_pending(self) -> bool:
        # StreamReader has no public way to ask how much is buffered; aiosmtpd itself
        # reaches into the same buffer to drop plaintext after the TLS handshake.
        buffered: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return len(buffered) > 0

    def _discard_plaintext(self) -> None:
        buffered: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        buffered.clear()
