"""Attachment linking under load, judged by Postfix's ``smtp-source`` and ``smtp-sink``.

(a) Throughput: messages of about 1.4 MiB, each with one 1 MiB attachment (base64),
    from an account in a local domain with linking on (``min_size`` 10 KiB),
    trusted network, DKIM off; ``smtp-source -F`` sends the prepared file over
    10 sessions to ``attachgate serve --workers 2``, which passes the rewritten
    messages on to ``smtp-sink``. Reported: messages/s and MiB/s of attachment
    data taken out. Every round checks that the sink got every message and that
    the gateway wrote one link record per message (so every attachment really
    was taken out). A stock Postfix relaying the same file unchanged, in the
    same rounds, gives the reference.

    smtp-source sends the same file every time, so the blob store writes the
    blob once and afterwards finds it stored (content addressing); decoding,
    hashing, the link record and the rewrite happen for every message.

    ``--unique``: the same measurement with a different random attachment in
    every message, so that every message makes the gateway store a new blob
    (temp file written and fsynced, renamed, directory fsynced), which the
    default variant never does after the first message. smtp-source cannot vary
    its content, so a load client of our own sends instead: a separate process
    (not sharing the measuring process's GIL) that builds the messages of a
    round before the clock starts (the same shape as the file above, each with
    its own attachment and Message-ID, CRLF and dot-stuffed), then runs
    ``--sessions`` SMTP sessions that each send message after message over one
    connection (EHLO once, then MAIL, RCPT, DATA per message; every reply
    code checked; QUIT at the end). Timed, as above, from the client's start
    until the sink has every message. Every round also checks that the blob
    directory gained at least one blob per message. Postfix gets the very same
    messages from the same client in the same rounds; the client's CPU time
    is reported so that its share of the two cores can be judged.

(b) Memory: peak RSS (``VmHWM``) of one gateway process while 20 sessions each
    send one 25 MiB message (``max_message_size`` raised), linking on; a fresh
    process per round.

Each figure is the median of ``--rounds`` rounds (3). Downloads are measured by
``bench/download.py``.

    python bench/linking.py [--rounds 3] [--messages 200] [--sessions 10] [--unique]
                            [--big-sessions 20] [--big-mib 25] [--skip-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import secrets
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

if not __package__:
    # Run as a file, this folder would come first on sys.path; put the
    # repository root there instead so that gateway/, tests/ and bench/ import.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from bench.common import (
    GatewayProcess,
    PostfixInstance,
    PySpy,
    Smarthost,
    SmtpSink,
    figures,
    free_port,
    gateway_config,
    missing_load_tools,
    missing_postfix,
    print_profile,
    run_smtp_source,
    smtp_source_args,
    vm_kib,
)
from storage.local import is_valid_digest

MIB = 1024 * 1024
DOMAIN = "bench.example"
SENDER = f"sender@{DOMAIN}"
RECIPIENT = "rcpt@remote.example"


def write_message(path: Path, attachment_bytes: int) -> int:
    """A text+HTML message with one random attachment, LF line endings
    (``smtp-source -F`` turns each line end into CRLF). Returns the file size."""
    data = bench_message(os.urandom(attachment_bytes), "\n", f"<linking-bench@{DOMAIN}>")
    path.write_bytes(data)
    return len(data)


def bench_message(attachment: bytes, linesep: str, message_id: str) -> bytes:
    """Text + HTML alternative + ``attachment`` as application/octet-stream
    ``figures.bin`` (base64), with ``linesep`` line ends."""
    msg = EmailMessage(policy=SMTP_POLICY.clone(linesep=linesep))
    msg["From"] = f"Bench Sender <{SENDER}>"
    msg["To"] = f"<{RECIPIENT}>"
    msg["Subject"] = "Quarterly figures"
    msg["Date"] = "Tue, 24 Nov 2026 08:00:00 +0000"
    msg["Message-ID"] = message_id
    msg.set_content("Hello,\n\nthe figures are attached.\n\nRegards\n")
    msg.add_alternative(
        "<html><body><p>Hello,</p><p>the figures are attached.</p><p>Regards</p></body></html>\n",
        subtype="html",
    )
    msg.add_attachment(
        attachment,
        maintype="application",
        subtype="octet-stream",
        filename="figures.bin",
    )
    return msg.as_bytes()


def linking_config(workdir: Path, sink_port: int, max_size: str = "50MiB") -> dict[str, Any]:
    return gateway_config(
        workdir,
        free_port(),
        sink_port,
        {
            "smtp": {"max_message_size": max_size, "command_timeout": "10m"},
            "links": {"secret_keys": ["bench-secret-key-0123456789abcdef"]},
            "domains": {DOMAIN: {}},
            "accounts": {
                SENDER: {"linking": {"enabled": True, "min_size": "10KiB", "quota": "1000GiB"}}
            },
        },
    )


def link_records(state_db: Path) -> int:
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM links").fetchone()
    return int(count)


def stored_blobs(root: Path) -> int:
    """Complete blobs in a local blob store (``root/ab/cd/<digest>``; temp files left out)."""
    if not root.is_dir():
        return 0
    # Temp files (".tmp-…") are not valid digests.
    return sum(1 for path in root.glob("??/??/*") if is_valid_digest(path.name))


# --------------------------------------------------------------------------
# --unique: our own load client, a different attachment in every message
# --------------------------------------------------------------------------

EHLO_NAME = "source.example"  # what smtp-source says (smtp_source_args)
_PLACEHOLDER = bytes(range(57))  # exactly one base64 line (76 characters)
_ID_MARK = b"x" * 16  # stands for the 16 hex digits of a message's own Message-ID


def smtp_data(message: bytes) -> bytes:
    """``message`` (CRLF line ends) as sent after DATA: dot-stuffed, ending with
    CRLF ``.`` CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class MessageMaker:
    """Messages shaped like ``write_message()``'s, CRLF line ends, each with its own
    attachment and Message-ID, ready for DATA.

    The email package takes about 20 ms to render a 1 MiB attachment; here it
    renders one template around a one-line placeholder attachment, and every
    message is the template with a fresh base64 body spliced in (about 6 ms).
    """

    def __init__(self) -> None:
        message_id = f"<linking-bench-{_ID_MARK.decode()}@{DOMAIN}>"
        template = bench_message(_PLACEHOLDER, "\r\n", message_id)
        line = base64.encodebytes(_PLACEHOLDER).replace(b"\n", b"\r\n")
        head, found, tail = template.partition(line)
        if not found or line in tail or head.count(_ID_MARK) != 1:
            raise RuntimeError("the message template has no unique placeholder")
        self._head = head
        self._tail = tail

    def message(self, attachment: bytes) -> bytes:
        """The message with ``attachment``, dot-stuffed and ending in CRLF ``.`` CRLF."""
        head = self._head.replace(_ID_MARK, secrets.token_hex(8).encode(), 1)
        body = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
        return smtp_data(head + body + self._tail)


class SmtpReplyError(RuntimeError):
    """The server answered something other than what the step expects."""


async def _expect(reader: asyncio.StreamReader, code: int, step: str) -> None:
    lines: list[bytes] = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise SmtpReplyError(f"{step}: connection closed after {b''.join(lines)!r}")
        lines.append(line)
        if line[3:4] != b"-":
            break
    if not lines[-1].startswith(b"%d " % code) and lines[-1].rstrip() != b"%d" % code:
        raise SmtpReplyError(f"{step}: expected {code}, got {b''.join(lines)!r}")


async def _session(port: int, payloads: Iterator[bytes], sent: list[int]) -> None:
    """One SMTP session: EHLO, then MAIL/RCPT/DATA for message after message from
    the shared ``payloads`` until none are left, then QUIT."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rcpt = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
    try:
        await _expect(reader, 220, "greeting")
        writer.write(f"EHLO {EHLO_NAME}\r\n".encode())
        await _expect(reader, 250, "EHLO")
        for payload in payloads:
            writer.write(mail)
            await _expect(reader, 250, "MAIL FROM")
            writer.write(rcpt)
            await _expect(reader, 250, "RCPT TO")
            writer.write(b"DATA\r\n")
            await _expect(reader, 354, "DATA")
            writer.write(payload)
            await writer.drain()
            await _expect(reader, 250, "end of data")
            sent[0] += 1
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221, "QUIT")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _send_all(port: int, sessions: int, batch: list[bytes], timeout: float) -> None:
    payloads = iter(batch)
    sent = [0]
    async with asyncio.timeout(timeout):
        await asyncio.gather(
            *(_session(port, payloads, sent) for _ in range(min(sessions, len(batch))))
        )
    if sent[0] != len(batch):
        raise RuntimeError(f"sent {sent[0]} of {len(batch)} messages")


def _client_main(conn: Connection, attachment_bytes: int) -> None:
    """The load client's process: build a batch, send it (as often as asked), repeat."""
    maker = MessageMaker()
    batch: list[bytes] = []
    while True:
        request = conn.recv()
        try:
            if request[0] == "build":
                batch = []  # let the last batch go before building the next
                batch = [maker.message(os.urandom(attachment_bytes)) for _ in range(request[1])]
                conn.send(("built", sum(map(len, batch))))
            elif request[0] == "send":
                _, port, sessions, timeout = request
                cpu = time.process_time()
                asyncio.run(_send_all(port, sessions, batch, timeout))
                conn.send(("sent", time.process_time() - cpu))
            else:
                return
        except Exception:
            conn.send(("error", traceback.format_exc()))


class LoadClient:
    """The load client in a process of its own (forked before anything else runs,
    so it holds nothing of the bench's but its pipe)."""

    def __init__(self, attachment_bytes: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_client_main,
            args=(child, attachment_bytes),
            name="linking-load-client",
            daemon=True,
        )
        self._proc.start()
        child.close()

    def _ask(self, request: tuple[Any, ...], timeout: float) -> tuple[Any, ...]:
        self._conn.send(request)
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the load client did not answer {request[0]!r} in {timeout}s")
        reply: tuple[Any, ...] = self._conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"the load client failed:\n{reply[1]}")
        return reply

    def build(self, messages: int) -> int:
        """Build the next batch of ``messages`` distinct messages; their total size."""
        return int(self._ask(("build", messages), 600)[1])

    def send(self, port: int, sessions: int, timeout: float = 300) -> float:
        """Send the current batch to ``port``; the client's CPU seconds for it."""
        return float(self._ask(("send", port, sessions, timeout), timeout + 30)[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()


# --------------------------------------------------------------------------
# (a) Throughput
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    target: str
    seconds: float  # load client start until the sink had every message
    messages: int
    client_cpu: float | None = None  # the load client's CPU seconds (--unique only)


def wait_delivered(
    name: str, sink: SmtpSink, before: int, messages: int, postfix: PostfixInstance | None
) -> None:
    sink.wait_messages(before + messages, timeout=300)
    if postfix is not None:
        postfix.wait_queue_empty(timeout=300, interval=0.02)
    got = sink.messages() - before
    if got != messages:
        raise RuntimeError(f"{name}: the sink got {got} messages, {messages} were sent")


def send_file(
    name: str,
    port: int,
    sink: SmtpSink,
    message_file: Path,
    messages: int,
    sessions: int,
    postfix: PostfixInstance | None = None,
) -> Timed:
    before = sink.messages()
    args = smtp_source_args(
        port,
        messages=messages,
        sessions=sessions,
        message_file=message_file,
        sender=SENDER,
        recipient=RECIPIENT,
    )
    start = time.perf_counter()
    run = run_smtp_source(args)
    if run.returncode != 0:
        raise RuntimeError(f"smtp-source against {name} exited {run.returncode}: {run.output}")
    wait_delivered(name, sink, before, messages, postfix)
    return Timed(name, time.perf_counter() - start, messages)


class Load(Protocol):
    """What sends a round's messages: ``prepare`` (untimed), then ``send`` per target."""

    def prepare(self, messages: int) -> None: ...

    def send(
        self,
        name: str,
        port: int,
        sink: SmtpSink,
        messages: int,
        sessions: int,
        postfix: PostfixInstance | None = None,
    ) -> Timed: ...


@dataclass
class FileLoad:
    """smtp-source sending the same file every time."""

    message_file: Path

    def prepare(self, messages: int) -> None:
        pass

    def send(
        self,
        name: str,
        port: int,
        sink: SmtpSink,
        messages: int,
        sessions: int,
        postfix: PostfixInstance | None = None,
    ) -> Timed:
        return send_file(name, port, sink, self.message_file, messages, sessions, postfix)


@dataclass
class UniqueLoad:
    """The load client sending a batch of distinct messages; every target that a
    round sends to gets the same batch."""

    client: LoadClient
    built: int = 0

    def prepare(self, messages: int) -> None:
        self.client.build(messages)
        self.built = messages

    def send(
        self,
        name: str,
        port: int,
        sink: SmtpSink,
        messages: int,
        sessions: int,
        postfix: PostfixInstance | None = None,
    ) -> Timed:
        if messages != self.built:
            raise ValueError(f"{messages} messages asked for, {self.built} built")
        before = sink.messages()
        start = time.perf_counter()
        cpu = self.client.send(port, sessions)
        wait_delivered(name, sink, before, messages, postfix)
        return Timed(name, time.perf_counter() - start, messages, cpu)


def throughput(opts: argparse.Namespace, workdir: Path) -> None:
    attachment = opts.attachment_kib * 1024
    if not opts.unique:
        message_file = workdir / "one-attachment.eml"
        size = write_message(message_file, attachment)
        print(
            f"(a) {opts.messages} messages of {size / MIB:.2f} MiB, one "
            f"{attachment / MIB:.2f} MiB attachment each, {opts.sessions} sessions, "
            f"{opts.rounds} rounds",
            flush=True,
        )
        run_throughput(opts, workdir, FileLoad(message_file))
        return
    # Forked first, before the sink, gateway and Postfix are started.
    client = LoadClient(attachment)
    try:
        size = client.build(1)
        print(
            f"(a) --unique: {opts.messages} messages of {size / MIB:.2f} MiB, each with its "
            f"own random {attachment / MIB:.2f} MiB attachment (a new blob per message), "
            f"{opts.sessions} sessions reusing their connection, {opts.rounds} rounds",
            flush=True,
        )
        run_throughput(opts, workdir, UniqueLoad(client))
    finally:
        client.close()


def run_throughput(opts: argparse.Namespace, workdir: Path, load: Load) -> None:
    attachment = opts.attachment_kib * 1024
    unique = isinstance(load, UniqueLoad)
    sink = SmtpSink(workdir=workdir)
    sink.start()
    gw_dir = workdir / "gw-a"
    config = linking_config(gw_dir, sink.port)
    blob_root = Path(config["storage"]["path"])
    gateway = GatewayProcess(config, gw_dir, workers=opts.workers)
    postfix = (
        None if opts.skip_postfix else PostfixInstance(smarthost=Smarthost("127.0.0.1", sink.port))
    )
    gw_name = f"attachgate ({opts.workers} workers)"
    rounds: list[Timed] = []
    try:
        gateway.start()
        if postfix is not None:
            postfix.start()
        warm = min(20, opts.messages)
        load.prepare(warm)
        load.send(gw_name, gateway.port, sink, warm, opts.sessions)
        if postfix is not None:
            load.send("postfix", postfix.port, sink, warm, opts.sessions, postfix)
        for n in range(opts.rounds):
            load.prepare(opts.messages)
            links_before = link_records(gw_dir / "state.db")
            blobs_before = stored_blobs(blob_root)
            spy = None
            if opts.profile and n == 0:
                spy = PySpy(gateway.worker_pids()[0], workdir / "linking.prof")
                time.sleep(0.5)  # py-spy needs a moment to attach before the load starts
            r = load.send(gw_name, gateway.port, sink, opts.messages, opts.sessions)
            if spy is not None:
                spy.stop()
                print_profile(workdir / "linking.prof", "py-spy", opts.top)
            taken_out = link_records(gw_dir / "state.db") - links_before
            if taken_out != opts.messages:
                raise RuntimeError(
                    f"{taken_out} link records for {opts.messages} messages: "
                    "not every attachment was taken out"
                )
            new_blobs = stored_blobs(blob_root) - blobs_before
            if unique and new_blobs < opts.messages:
                raise RuntimeError(
                    f"{new_blobs} new blobs for {opts.messages} messages: "
                    "not every attachment was stored"
                )
            rounds.append(r)
            if unique:
                print(
                    f"round {n + 1}: {gw_name:<24} {r.messages / r.seconds:7.1f} messages/s "
                    f"{r.messages * attachment / MIB / r.seconds:7.1f} MiB/s stored "
                    f"({new_blobs} new blobs){client_note(r)}",
                    flush=True,
                )
            else:
                print(
                    f"round {n + 1}: {gw_name:<24} {r.messages / r.seconds:7.1f} messages/s "
                    f"{r.messages * attachment / MIB / r.seconds:7.1f} MiB/s taken out",
                    flush=True,
                )
            if postfix is not None:
                p = load.send("postfix", postfix.port, sink, opts.messages, opts.sessions, postfix)
                rounds.append(p)
                print(
                    f"round {n + 1}: {'postfix (plain relay)':<24} "
                    f"{p.messages / p.seconds:7.1f} messages/s{client_note(p)}",
                    flush=True,
                )
    finally:
        gateway.stop()
        if postfix is not None:
            postfix.stop()
            postfix.remove()
        sink.close()
    gw = figures([r.messages / r.seconds for r in rounds if r.target == gw_name])
    mib = figures(
        [r.messages * attachment / MIB / r.seconds for r in rounds if r.target == gw_name]
    )
    print(f"attachgate, linking on:   {gw.show('{:.1f}')} messages/s")
    if unique:
        print(f"attachments stored:       {mib.show('{:.1f}')} MiB/s (a new blob each)")
    else:
        print(f"attachments taken out:    {mib.show('{:.1f}')} MiB/s")
    pf_rates = [r.messages / r.seconds for r in rounds if r.target == "postfix"]
    if pf_rates:
        pf = figures(pf_rates)
        print(f"Postfix, plain relay:     {pf.show('{:.1f}')} messages/s")
        print(f"attachgate / Postfix:     {gw.median / pf.median:.2f}")
    for target in (gw_name, "postfix") if unique else ():
        shares = [
            r.client_cpu / r.seconds
            for r in rounds
            if r.target == target and r.client_cpu is not None
        ]
        if shares:
            label = "gateway" if target == gw_name else "Postfix"
            print(f"load client CPU ({label}): {figures(shares).show('{:.0%}')} of one core")


def client_note(timed: Timed) -> str:
    if timed.client_cpu is None:
        return ""
    per_message = 1000 * timed.client_cpu / timed.messages
    return f", client CPU {timed.client_cpu:.2f} s ({per_message:.1f} ms/message)"


def memory(opts: argparse.Namespace, workdir: Path) -> None:
    big_file = workdir / "big.eml"
    # base64 with line breaks grows the payload by about 4/3 · 78/76.
    raw = int(opts.big_mib * MIB * 3 / 4 * 76 / 78)
    size = write_message(big_file, raw)
    in_flight = size * opts.big_sessions
    print(
        f"\n(b) {opts.big_sessions} sessions each sending one {size / MIB:.1f} MiB message "
        f"({in_flight / MIB:.0f} MiB in flight), linking on, 1 worker, {opts.rounds} rounds",
        flush=True,
    )
    peaks: list[float] = []
    secs: list[float] = []
    baselines: list[float] = []
    sink = SmtpSink(workdir=workdir)
    sink.start()
    try:
        for n in range(opts.rounds):
            gw_dir = workdir / f"gw-b{n}"
            max_size = f"{opts.big_mib * 2}MiB"
            with GatewayProcess(
                linking_config(gw_dir, sink.port, max_size), gw_dir, workers=1
            ) as gw:
                pid = gw.worker_pids()[0]
                baseline = vm_kib(pid, "VmRSS") / 1024
                r = send_file(
                    "attachgate", gw.port, sink, big_file, opts.big_sessions, opts.big_sessions
                )
                peak = vm_kib(pid, "VmHWM") / 1024
                taken_out = link_records(gw_dir / "state.db")
            if taken_out != opts.big_sessions:
                raise RuntimeError(f"{taken_out} link records for {opts.big_sessions} messages")
            peaks.append(peak)
            secs.append(r.seconds)
            baselines.append(baseline)
            print(
                f"round {n + 1}: peak RSS {peak:6.0f} MiB (at rest {baseline:4.0f} MiB), "
                f"{r.seconds:5.1f} s for the batch",
                flush=True,
            )
    finally:
        sink.close()
    peak_fig = figures(peaks)
    print(f"peak RSS:                 {peak_fig.show('{:.0f}')} MiB")
    print(f"at rest before the load:  {figures(baselines).show('{:.0f}')} MiB")
    print(f"bytes in flight:          {in_flight / MIB:.0f} MiB")
    print(f"peak RSS / in flight:     {peak_fig.median * MIB / in_flight:.2f}")
    print(f"batch time:               {figures(secs).show('{:.1f}')} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--attachment-kib", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--big-sessions", type=int, default=20)
    parser.add_argument("--big-mib", type=int, default=25)
    parser.add_argument("--skip-postfix", action="store_true", help="no Postfix reference")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--unique",
        action="store_true",
        help="throughput with a different attachment in every message (our own load client)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on the first worker in round 1"
    )
    parser.add_argument("--top", type=int, default=25, help="functions to list when profiling")
    opts = parser.parse_args(argv)
    problem = missing_load_tools() or (None if opts.skip_postfix else missing_postfix())
    if problem:
        print(f"linking bench: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="attachgate-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        if not opts.skip_throughput:
            throughput(opts, workdir)
        if not opts.skip_memory:
            memory(opts, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
