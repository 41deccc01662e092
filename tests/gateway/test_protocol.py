"""GatewaySMTP's DATA reader and STARTTLS, over real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import (
    END_OF_DATA,
    R421_STARTTLS_PIPELINING,
    DataReceiver,
    GatewaySMTP,
    normalize_line_endings,
)
from gateway.replies import R550_NUL, R552_TOO_BIG

HOST = "127.0.0.1"
WAIT = 10.0  # upper bound on waiting for an event that must happen much sooner

# --------------------------------------------------------------------------- pure parts

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def has_bare_line_ending(data: bytes) -> bool:
    return _BARE.search(data) is not None


def reference_normalize(data: bytes) -> bytes:
    """Byte-by-byte model of the line-ending rule, to check the fast version against."""
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i : i + 1]
        if byte == b"\r" and data[i + 1 : i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        out += b"\r\n" if byte in (b"\r", b"\n") else byte
        i += 1
    return bytes(out)


def dot_stuff(message: bytes) -> bytes:
    """What a client sends for a CRLF-only message that ends with CRLF (or is empty)."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


line_ending_soup = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\r\r\n"]), max_size=60
).map(b"".join)


@given(line_ending_soup)
def test_normalize_leaves_no_bare_cr_or_lf(data: bytes) -> None:
    out = normalize_line_endings(data)
    assert not has_bare_line_ending(out)
    assert out == reference_normalize(data)
    # Only line endings change: the other bytes stay, in order.
    assert out.replace(b"\r", b"").replace(b"\n", b"") == data.replace(b"\r", b"").replace(
        b"\n", b""
    )
    assert normalize_line_endings(out) == out


crlf_lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@given(crlf_lines)
def test_normalize_returns_crlf_only_input_itself(data: bytes) -> None:
    assert normalize_line_endings(data) is data


def test_normalize_examples() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
    assert normalize_line_endings(b"\r\r\n") == b"\r\n\r\n"
    assert normalize_line_endings(b"\n\r") == b"\r\n\r\n"
    assert normalize_line_endings(b"x\n.\n") == b"x\r\n.\r\n"


def replace_normalize(data: bytes) -> bytes:
    """The line-ending rule as three replaces: CRLF and bare CR to LF, then LF to CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# Mostly CR, LF, dots and one letter, so that every mix of line endings comes up.
cr_lf_dot_soup = st.lists(
    st.sampled_from(b"\r\n.a") | st.sampled_from(b"\r\n") | st.integers(0, 255), max_size=300
).map(bytes)


@given(cr_lf_dot_soup)
def test_normalize_matches_replace_reference(data: bytes) -> None:
    out = normalize_line_endings(data)
    assert out == replace_normalize(data)
    # The input itself exactly when it has nothing to change, else a new object.
    assert (out is data) == (out == data)


def receive(chunks: list[bytes], limit: int = 1 << 20) -> tuple[DataReceiver, bytes | None]:
    """Feed chunks until the end of data; the leftover includes chunks never fed."""
    receiver = DataReceiver(limit)
    for n, chunk in enumerate(chunks):
        leftover = receiver.feed(chunk)
        if leftover is not None:
            return receiver, leftover + b"".join(chunks[n + 1 :])
    return receiver, None


def test_receiver_marker_split_at_every_position() -> None:
    message = b"Subject: t\r\n\r\n..dot\r\nline\r\n"
    wire = dot_stuff(message) + b"QUIT\r\n"
    for i in range(1, len(wire)):
        for j in range(i, len(wire)):
            receiver, leftover = receive([wire[:i], wire[i:j], wire[j:]])
            assert receiver.done, (i, j)
            assert leftover == b"QUIT\r\n", (i, j)
            assert receiver.message() == message, (i, j)


def test_receiver_byte_at_a_time() -> None:
    message = b".\r\n..\r\n\r\n.x\r\n"
    wire = dot_stuff(message)
    receiver, leftover = receive([wire[i : i + 1] for i in range(len(wire))])
    assert leftover == b""
    assert receiver.message() == message


def test_receiver_empty_message() -> None:
    receiver, leftover = receive([b".\r\n"])
    assert leftover == b""
    assert receiver.size == 0
    assert receiver.message() == b""
    receiver, leftover = receive([b".", b"\r", b"\nNOOP\r\n"])
    assert leftover == b"NOOP\r\n"
    assert receiver.message() == b""


def test_receiver_leading_dot_stuffing() -> None:
    receiver, _ = receive([b"..\r\n...x\r\n.\r\n"])
    assert receiver.message() == b".\r\n..x\r\n"


def test_receiver_drops_first_dot_of_unstuffed_lines() -> None:
    # RFC 5321 4.5.2, as aiosmtpd and Postfix do for clients that forget to stuff.
    receiver, _ = receive([b".x\r\ny\r\n.z\r\n.\r\n"])
    assert receiver.message() == b"x\r\ny\r\nz\r\n"


@pytest.mark.parametrize(
    "not_an_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n"],
)
def test_receiver_only_crlf_dot_crlf_ends(not_an_end: bytes) -> None:
    receiver, leftover = receive([b"a" + not_an_end + b"b"])
    assert leftover is None
    assert not receiver.done


@given(crlf_lines, st.lists(st.integers(min_value=1, max_value=50), max_size=10))
def test_receiver_round_trip(message: bytes, cuts: list[int]) -> None:
    wire = dot_stuff(message) + b"RSET\r\n"
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(wire[pos : pos + cut])
        pos += cut
    chunks.append(wire[pos:])
    receiver, leftover = receive([c for c in chunks if c])
    assert leftover == b"RSET\r\n"
    assert receiver.size == len(wire) - len(b".\r\nRSET\r\n")
    assert receiver.message() == message


def test_receiver_size_limit_boundary() -> None:
    exact = b"x" * 98 + b"\r\n"  # 100 bytes as sent
    receiver, _ = receive([dot_stuff(exact)], limit=100)
    assert receiver.size == 100
    assert not receiver.too_big
    receiver, _ = receive([dot_stuff(b"y" + exact)], limit=100)
    assert receiver.too_big


def test_receiver_overflow_keeps_little_and_still_finds_split_marker() -> None:
    receiver = DataReceiver(100)
    for _ in range(50):
        assert receiver.feed(b"z" * 999 + b"\r") is None
    assert len(receiver._buf) <= len(END_OF_DATA)
    assert receiver.feed(b"\n.") is None
    assert receiver.feed(b"\r\nNOOP\r\n") == b"NOOP\r\n"
    assert receiver.too_big
    assert receiver.size == 50 * 1000 + 1


def test_receiver_refuses_use_out_of_order() -> None:
    receiver = DataReceiver(10)
    with pytest.raises(ValueError, match="not been received"):
        receiver.message()
    receiver.feed(b".\r\n")
    with pytest.raises(ValueError, match="already received"):
        receiver.feed(b"more")


def reference_end_of_data(stream: bytes) -> tuple[bytes, bytes, int] | None:
    """SMTP end of data read line by line: (content, leftover, size as sent), or None.

    Lines end with CRLF only (a bare CR or LF is content). The first line that
    is just "." ends the data; every line before it loses a leading dot; then
    bare CR and LF become CRLF.
    """
    lines: list[bytes] = []
    pos = 0
    while (eol := stream.find(b"\r\n", pos)) >= 0:
        line = stream[pos:eol]
        if line == b".":
            content = b"".join(each.removeprefix(b".") + b"\r\n" for each in lines)
            return replace_normalize(content), stream[eol + 2 :], pos
        lines.append(line)
        pos = eol + 2
    return None


# Heavy in CR, LF and dots: dot lines, ends of data, dots inside lines by the dozen in one
# chunk; the long runs without a dot are what the receiver skips fastest.
smtp_stream = st.lists(
    st.sampled_from(
        [b"\r\n", b"\r", b"\n", b".", b".", b"..", b"a", b"\x00", b"\r\n.", b"\r\n.\r\n"]
    )
    | st.sampled_from([b"x" * 300, b"y.z" * 40, b"\r\n." * 3, b"Q\r\nUIT\r\n"]),
    max_size=100,
).map(b"".join)


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(smtp_stream)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in pairwise(bounds)]


@given(split_streams(), st.just(1 << 20) | st.integers(1, 400))
def test_receiver_any_split_matches_whole_and_reference(
    split: tuple[bytes, list[bytes]], limit: int
) -> None:
    stream, chunks = split
    expected = reference_end_of_data(stream)
    whole = receive([stream], limit)
    in_chunks = receive(chunks, limit)
    if expected is None:
        for receiver, leftover in (whole, in_chunks):
            assert leftover is None
            assert not receiver.done
        return
    content, rest, size = expected
    for receiver, leftover in (whole, in_chunks):
        assert receiver.done
        assert leftover == rest
        assert receiver.size == size
        assert receiver.too_big == (size > limit)
        # What is too big may have been thrown away while it arrived: no content then.
        if not receiver.too_big:
            assert receiver.has_nul == (b"\x00" in stream[:size])
            assert receiver.message() == content


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 100, 257, 4096, 1 << 20])
def test_receiver_many_dots_inside_lines(chunk_size: int) -> None:
    # Hundreds of dots inside lines in one chunk, dot lines among them, a long run
    # without dots, then more of each: both ways of finding dot lines get used.
    text = b"v1.2.3 e.g. a.b.c\r\n" * 300 + b".stuffed.\r\n" + b"x" * 5000 + b"\r\n"
    message = text * 3 + b"..last.\r\n"
    wire = dot_stuff(message) + b"DATA.\r\n"
    chunks = [wire[i : i + chunk_size] for i in range(0, len(wire), chunk_size)]
    receiver, leftover = receive(chunks)
    assert leftover == b"DATA.\r\n"
    assert receiver.size == len(wire) - len(b".\r\nDATA.\r\n")
    assert receiver.message() == message


# --------------------------------------------------------------------------- servers


@dataclass
class Recorder:
    """A handler that records what reached it and answers 250."""

    messages: list[Envelope] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.senders.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope)
        self.sessions.append(session)
        self.delivered.set()
        return "250 2.0.0 Recorded"


@dataclass
class Running:
    host: str
    port: int
    handler: Recorder


Serve = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []
    sessions: list[SMTP] = []
    loop = asyncio.get_running_loop()

    def session(smtp_class: type[SMTP], handler: Recorder, kwargs: dict[str, Any]) -> SMTP:
        protocol = smtp_class(handler, loop=loop, **kwargs)
        sessions.append(protocol)
        return protocol

    async def start(smtp_class: type[SMTP] = GatewaySMTP, **kwargs: Any) -> Running:
        handler = Recorder()
        kwargs.setdefault("hostname", "gw.test")
        server = await loop.create_server(lambda: session(smtp_class, handler, kwargs), HOST, 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return Running(HOST, port, handler)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    # Python 3.11's Server.wait_closed does not wait for open sessions: close them and
    # let connection_lost run before the loop goes away.
    for protocol in sessions:
        if protocol.transport is not None:
            protocol.transport.close()
    deadline = loop.time() + WAIT
    while any(protocol.transport is not None for protocol in sessions):
        assert loop.time() < deadline, "server sessions did not close"
        await asyncio.sleep(0)


class Dialogue:
    """A raw SMTP client: sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, running: Running) -> Dialogue:
        reader, writer = await asyncio.open_connection(running.host, running.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dialogue = cls(reader, writer)
        try:
            code, _ = await dialogue.reply()
        except BaseException:
            await dialogue.close()
            raise
        assert code == 220
        return dialogue

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), WAIT)
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str, expected: int) -> str:
        await self.send(line.encode() + b"\r\n")
        code, text = await self.reply()
        assert code == expected, text
        return text

    async def envelope(self) -> None:
        await self.cmd("EHLO client.test", 250)
        await self.cmd("MAIL FROM:<s@example.com>", 250)
        await self.cmd("RCPT TO:<r@example.org>", 250)
        await self.cmd("DATA", 354)

    async def closed_by_server(self) -> bool:
        rest = await asyncio.wait_for(self.reader.read(), WAIT)
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def dialogues() -> AsyncIterator[Callable[[Running], Awaitable[Dialogue]]]:
    opened: list[Dialogue] = []

    async def open_dialogue(running: Running) -> Dialogue:
        dialogue = await Dialogue.open(running)
        opened.append(dialogue)
        return dialogue

    yield open_dialogue
    for dialogue in opened:
        await dialogue.close()


Dialogues = Callable[[Running], Awaitable[Dialogue]]


# --------------------------------------------------------------------------- messages

MESSAGE = (
    b"From: s@example.com\r\nTo: r@example.org\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.leading dot\r\n..two dots\r\n.\r\n \r\nlast\r\n"
)


def send_with_smtplib(port: int, message: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(HOST, port, timeout=WAIT) as client:
        return client.sendmail("s@example.com", ["r@example.org"], message)


async def test_smtplib_message_arrives_byte_exact(serve: Serve) -> None:
    running = await serve()
    refused = await asyncio.to_thread(send_with_smtplib, running.port, MESSAGE)
    assert refused == {}
    [envelope] = running.handler.messages
    assert envelope.content == MESSAGE
    assert envelope.original_content == MESSAGE
    assert envelope.mail_from == "s@example.com"
    assert envelope.rcpt_tos == ["r@example.org"]


async def test_content_matches_aiosmtpd(serve: Serve) -> None:
    messages = [MESSAGE, b"", b".\r\n", b"x" * 900 + b"\r\n..\r\n", b"\x80\xff 8bit\r\n"]
    received = []
    for smtp_class in (SMTP, GatewaySMTP):
        running = await serve(smtp_class)
        for message in messages:
            assert await asyncio.to_thread(send_with_smtplib, running.port, message) == {}
        received.append([e.content for e in running.handler.messages])
    assert received[0] == received[1]
    assert received[1][0] == MESSAGE


async def test_unstuffed_dots_handled_like_aiosmtpd(serve: Serve, dialogues: Dialogues) -> None:
    wire = b".a\r\n..b\r\nc.\r\n.\r\n"
    received = []
    for smtp_class in (SMTP, GatewaySMTP):
        running = await serve(smtp_class)
        dialogue = await dialogues(running)
        await dialogue.envelope()
        await dialogue.send(wire)
        assert (await dialogue.reply())[0] == 250
        received.append(running.handler.messages[0].content)
    assert received == [b"a\r\n.b\r\nc.\r\n"] * 2


async def test_aiosmtplib_message_arrives_byte_exact(serve: Serve) -> None:
    running = await serve()
    body = b"".join(b"%05d " % i + b"x" * (i % 3000) + b"\r\n" for i in range(400))
    message = b"Subject: big\r\n\r\n" + body
    async with aiosmtplib.SMTP(hostname=HOST, port=running.port) as client:
        errors, response = await client.sendmail("s@example.com", ["r@example.org"], message)
    assert errors == {}
    assert response.startswith("2.0.0 Recorded")
    assert running.handler.messages[0].content == message


def corpus_dir() -> Path:
    configured = os.environ.get("ATTACHGATE_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


def corpus_files() -> Iterator[Path]:
    root = corpus_dir()
    for folder in ("mime4j", "cpython", "ruby-mail"):
        yield from sorted(p for p in (root / folder).glob("*") if p.name != "LICENSE")


async def test_corpus_messages_arrive_as_sent(serve: Serve) -> None:
    if not corpus_dir().is_dir():
        pytest.skip(f"message corpus not found at {corpus_dir()} (set ATTACHGATE_CORPUS)")
    files = [p for p in corpus_files() if p.is_file()]
    assert files, "the corpus folder holds no messages"
    running = await serve()
    client = aiosmtplib.SMTP(hostname=HOST, port=running.port)
    async with client:
        for path in files:
            raw = path.read_bytes()
            await client.sendmail("s@example.com", ["r@example.org"], raw)
    expected = []
    for path in files:
        # The client sends CRLF line endings and a final CRLF.
        sent = normalize_line_endings(path.read_bytes())
        expected.append(sent if sent.endswith(b"\r\n") or not sent else sent + b"\r\n")
    assert [e.content for e in running.handler.messages] == expected
    longest = max(len(line) for e in expected for line in e.split(b"\r\n"))
    assert longest > 7000  # the long lines of mime4j were accepted, not refused


# --------------------------------------------------------------------------- end of data


async def test_empty_message(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b".\r\n")
    assert (await dialogue.reply())[0] == 250
    assert running.handler.messages[0].content == b""


async def test_dot_stuffing_undone(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"..\r\n...\r\nx.\r\n..y\r\n.\r\n")
    assert (await dialogue.reply())[0] == 250
    assert running.handler.messages[0].content == b".\r\n..\r\nx.\r\n.y\r\n"


async def test_marker_split_across_writes(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    message = b"Subject: split\r\n\r\nbody\r\n"
    wire = dot_stuff(message)
    splits = range(len(wire) - len(END_OF_DATA) - 2, len(wire))
    await dialogue.cmd("EHLO client.test", 250)
    for split in splits:
        await dialogue.cmd("MAIL FROM:<s@example.com>", 250)
        await dialogue.cmd("RCPT TO:<r@example.org>", 250)
        await dialogue.cmd("DATA", 354)
        await dialogue.send(wire[:split])
        await dialogue.send(wire[split:])
        assert (await dialogue.reply())[0] == 250
    assert [e.content for e in running.handler.messages] == [message] * len(splits)


async def test_commands_pipelined_after_the_end_run_in_order(
    serve: Serve, dialogues: Dialogues
) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(
        b"one\r\n.\r\nMAIL FROM:<t@example.com>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
        b"two\r\n.\r\nQUIT\r\n"
    )
    codes = [(await dialogue.reply())[0] for _ in range(6)]
    assert codes == [250, 250, 250, 354, 250, 221]
    assert [e.content for e in running.handler.messages] == [b"one\r\n", b"two\r\n"]
    assert running.handler.messages[1].mail_from == "t@example.com"
    assert await dialogue.closed_by_server()


# --------------------------------------------------------------------------- size limit


async def test_size_limit_drained_answered_once_session_usable(
    serve: Serve, dialogues: Dialogues
) -> None:
    running = await serve(data_size_limit=1000)
    dialogue = await dialogues(running)
    await dialogue.envelope()
    line = b"z" * 8190 + b"\r\n"
    for _ in range(20):
        await dialogue.send(line)
    await dialogue.send(b".\r\n")
    code, text = await dialogue.reply()
    assert (code, text) == (552, str(R552_TOO_BIG))
    assert running.handler.messages == []
    # The very next reply belongs to RSET: no second answer to the big message.
    await dialogue.cmd("RSET", 250)
    await dialogue.cmd("MAIL FROM:<s@example.com>", 250)
    await dialogue.cmd("RCPT TO:<r@example.org>", 250)
    await dialogue.cmd("DATA", 354)
    await dialogue.send(b"small\r\n.\r\n")
    assert (await dialogue.reply())[0] == 250
    assert [e.content for e in running.handler.messages] == [b"small\r\n"]


async def test_size_limit_boundary_matches_aiosmtpd(serve: Serve, dialogues: Dialogues) -> None:
    fits = b"a" * 98 + b"\r\n"
    for smtp_class in (SMTP, GatewaySMTP):
        running = await serve(smtp_class, data_size_limit=100)
        dialogue = await dialogues(running)
        await dialogue.envelope()
        await dialogue.send(dot_stuff(fits))
        assert (await dialogue.reply())[0] == 250, smtp_class
        await dialogue.cmd("MAIL FROM:<s@example.com>", 250)
        await dialogue.cmd("RCPT TO:<r@example.org>", 250)
        await dialogue.cmd("DATA", 354)
        await dialogue.send(dot_stuff(b"a" + fits))
        assert (await dialogue.reply())[0] == 552, smtp_class
        assert [e.content for e in running.handler.messages] == [fits]


# --------------------------------------------------------------------------- smuggling

SMUGGLING_VARIANTS = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nsmuggled\r\n.\r\n"


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
async def test_smuggling_variant_is_content(
    serve: Serve, dialogues: Dialogues, variant: bytes
) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"Subject: x\r\n\r\nbody" + variant + SMUGGLED + b"\r\n.\r\n")
    code, text = await dialogue.reply()
    # Whatever follows the first real end of data is read as commands: the lone CRLF
    # and the dot are not commands anyone runs.
    await dialogue.send(b"QUIT\r\n")
    while code != 221:
        assert code in (250, 550, 500), text
        code, text = await dialogue.reply()
    handler = running.handler
    assert len(handler.messages) <= 1
    assert "a@b.example" not in handler.senders
    if b"\x00" in variant:
        assert handler.messages == []
        return
    [envelope] = handler.messages
    content = envelope.content
    assert isinstance(content, bytes)
    assert not has_bare_line_ending(content)
    assert b"\x00" not in content
    assert b"MAIL FROM:<a@b.example>" in content
    assert envelope.rcpt_tos == ["r@example.org"]


async def test_nul_refused_after_real_end(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"a\x00b\r\n")
    await dialogue.send(b"more\r\n.\r\n")
    assert await dialogue.reply() == (550, str(R550_NUL))
    await dialogue.cmd("RSET", 250)
    assert running.handler.messages == []


async def test_bare_lf_message_normalised(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"Subject: lf\n\nline\rline\n.\n\r\n.\r\n")
    assert (await dialogue.reply())[0] == 250
    assert running.handler.messages[0].content == b"Subject: lf\r\n\r\nline\r\nline\r\n.\r\n\r\n"


# --------------------------------------------------------------------------- preconditions

SEQUENCES: list[list[str]] = [
    ["HELP", "HELP DATA", "EHLO client.test", "HELP DATA"],
    ["DATA"],
    ["EHLO client.test", "DATA"],
    ["EHLO client.test", "MAIL FROM:<s@example.com>", "DATA"],
    ["EHLO client.test", "MAIL FROM:<s@example.com>", "RCPT TO:<r@example.org>", "DATA x"],
    ["HELO client.test", "MAIL FROM:<s@example.com>", "RCPT TO:<r@example.org>", "DATA"],
]


async def replies_to(running: Running, commands: list[str]) -> list[str]:
    dialogue = await Dialogue.open(running)
    try:
        replies = []
        for command in commands:
            await dialogue.send(command.encode() + b"\r\n")
            replies.append((await dialogue.reply())[1])
        return replies
    finally:
        await dialogue.close()


@pytest.mark.parametrize("auth_required", [False, True])
async def test_sequence_errors_answered_like_aiosmtpd(serve: Serve, auth_required: bool) -> None:
    kwargs: dict[str, Any] = {"auth_required": auth_required}
    ours = await serve(GatewaySMTP, **kwargs)
    theirs = await serve(SMTP, **kwargs)
    for commands in SEQUENCES:
        mine = await replies_to(ours, commands)
        assert mine == await replies_to(theirs, commands)
        if auth_required and commands[0] not in ("DATA", "HELP"):
            assert mine[-1].startswith("530 5.7.0")
    assert ours.handler.messages == []


# --------------------------------------------------------------------------- timeout, EOF


async def test_timeout_during_data_closes_without_delivery(
    serve: Serve, dialogues: Dialogues
) -> None:
    running = await serve(timeout=0.3)
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"Subject: stalled\r\n\r\npart of a body")
    assert await dialogue.closed_by_server()
    assert running.handler.messages == []


async def test_disconnect_mid_data_leaves_server_serving(
    serve: Serve, dialogues: Dialogues, caplog: pytest.LogCaptureFixture
) -> None:
    running = await serve()
    quitter = await dialogues(running)
    await quitter.envelope()
    await quitter.send(b"Subject: gone\r\n\r\n" + b"x" * 100_000)
    await quitter.close()
    other = await dialogues(running)
    await other.envelope()
    await other.send(b"still here\r\n.\r\n")
    assert (await other.reply())[0] == 250
    assert [e.content for e in running.handler.messages] == [b"still here\r\n"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_half_close_mid_data_is_not_delivered(serve: Serve, dialogues: Dialogues) -> None:
    running = await serve()
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(b"Subject: half\r\n\r\nno end")
    dialogue.writer.write_eof()
    assert await dialogue.closed_by_server()
    assert running.handler.messages == []


# --------------------------------------------------------------------------- STARTTLS


@dataclass(frozen=True)
class Certificate:
    cert_pem: bytes
    key_pem: bytes

    def server_context(self, tmp: Path) -> ssl.SSLContext:
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.cert_pem.decode())
        return context


@pytest.fixture(scope="module")
def certificate() -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def test_starttls_then_message(
    serve: Serve, certificate: Certificate, tmp_path: Path
) -> None:
    running = await serve(tls_context=certificate.server_context(tmp_path), require_starttls=True)
    client = aiosmtplib.SMTP(
        hostname=HOST,
        port=running.port,
        start_tls=True,
        tls_context=certificate.client_context(),
    )
    async with client:
        await client.sendmail("s@example.com", ["r@example.org"], MESSAGE)
    [session] = running.handler.sessions
    assert session.ssl is not None
    assert running.handler.messages[0].content == MESSAGE


@pytest.mark.parametrize(
    "injected",
    [b"RSET\r\n", b"MAIL FROM:<evil@x.example>\r\n", b"MAIL FROM:<evil@x.example>\r\nRCPT TO"],
    ids=repr,
)
async def test_starttls_command_injection_dropped(
    serve: Serve, dialogues: Dialogues, certificate: Certificate, tmp_path: Path, injected: bytes
) -> None:
    running = await serve(tls_context=certificate.server_context(tmp_path))
    dialogue = await dialogues(running)
    await dialogue.cmd("EHLO client.test", 250)
    await dialogue.send(b"STARTTLS\r\n" + injected)
    assert await dialogue.reply() == (421, str(R421_STARTTLS_PIPELINING))
    assert await dialogue.closed_by_server()
    assert running.handler.senders == []


async def test_help_with_tls_matches_aiosmtpd(
    serve: Serve, certificate: Certificate, tmp_path: Path
) -> None:
    context = certificate.server_context(tmp_path)
    commands = ["HELP", "EHLO client.test", "HELP STARTTLS", "HELP DATA", "STARTTLS x"]
    ours = await replies_to(await serve(GatewaySMTP, tls_context=context), commands)
    theirs = await replies_to(await serve(SMTP, tls_context=context), commands)
    assert ours == theirs
    assert "STARTTLS" in ours[0]
    assert ours[2] == "250 Syntax: STARTTLS"


@pytest.mark.parametrize(
    ("utf8", "body", "reply", "content"),
    [
        (False, b"plain\r\n", 250, "plain\r\n"),
        (False, "caf\u00e9\r\n".encode(), 500, None),
        (True, "caf\u00e9\r\n".encode(), 250, "caf\u00e9\r\n"),
    ],
)
async def test_decode_data_like_aiosmtpd(
    serve: Serve,
    dialogues: Dialogues,
    utf8: bool,
    body: bytes,
    reply: int,
    content: str | None,
) -> None:
    running = await serve(decode_data=True, enable_SMTPUTF8=utf8)
    dialogue = await dialogues(running)
    await dialogue.envelope()
    await dialogue.send(body + b".\r\n")
    assert (await dialogue.reply())[0] == reply
    assert [e.content for e in running.handler.messages] == ([content] if content else [])
    if content:
        assert running.handler.messages[0].original_content == body
    await dialogue.cmd("RSET", 250)
