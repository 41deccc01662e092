"""Micro-benchmark: receiving DATA with aiosmtpd's reader versus GatewaySMTP's.

Each run starts a fresh server in a child process (a handler that only
answers 250), then 10 client sessions on loopback send 200 messages of 1 MiB
between them, each message already dot-stuffed so the client does no work
per line. Prints the median of 3 runs per reader, the server's peak RSS and
the ratio.

    python bench/data_reader.py [--messages 200] [--sessions 10] [--size-mib 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.protocol import GatewaySMTP

READERS: dict[str, type[SMTP]] = {"aiosmtpd": SMTP, "GatewaySMTP": GatewaySMTP}


class Answer250:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


def serve(reader_name: str, conn: Connection) -> None:
    """Child process: serve until told to stop, then report peak RSS in KiB."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        smtp_class = READERS[reader_name]
        handler = Answer250()
        server = await loop.create_server(
            lambda: smtp_class(handler, loop=loop, hostname="bench", data_size_limit=None),
            "127.0.0.1",
            0,
        )
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)
        server.close()

    asyncio.run(main())
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def make_message(size: int) -> bytes:
    """A mail with one base64 body of about ``size`` bytes, CRLF lines of 76."""
    raw = os.urandom(size * 3 // 4)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    header = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    return header + encoded


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


async def session(port: int, wire: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await reply(reader) == 220
        writer.write(b"EHLO bench\r\n")
        assert await reply(reader) == 250
        for _ in range(count):
            for command in (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>"):
                writer.write(command + b"\r\n")
                assert await reply(reader) == 250
            writer.write(b"DATA\r\n")
            assert await reply(reader) == 354
            writer.write(wire)
            await writer.drain()
            code = await reply(reader)
            assert code == 250, code
        writer.write(b"QUIT\r\n")
        assert await reply(reader) == 221
    finally:
        writer.close()
        await writer.wait_closed()


@dataclass
class Run:
    seconds: float
    peak_rss_kib: int


def one_run(reader_name: str, wire: bytes, messages: int, sessions: int) -> Run:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(reader_name, child), daemon=True
    )
    process.start()
    port: int = parent.recv()
    share = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]

    async def load() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(session(port, wire, n) for n in share))
        return time.perf_counter() - started

    seconds = asyncio.run(load())
    parent.send("stop")
    peak: int = parent.recv()
    process.join()
    return Run(seconds, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size-mib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    args: Any = parser.parse_args(argv)
    message = make_message(int(args.size_mib * 1024 * 1024))
    wire = message + b".\r\n"  # base64 lines never start with a dot: nothing to stuff
    mib = len(message) * args.messages / (1024 * 1024)
    print(
        f"{args.messages} messages of {len(message) / 1024 / 1024:.2f} MiB over "
        f"{args.sessions} sessions, median of {args.runs} runs"
    )
    medians: dict[str, float] = {}
    for name in READERS:
        runs = [one_run(name, wire, args.messages, args.sessions) for _ in range(args.runs)]
        median = statistics.median(r.seconds for r in runs)
        medians[name] = median
        peak = max(r.peak_rss_kib for r in runs) / 1024
        times = ", ".join(f"{r.seconds:.2f}" for r in runs)
        print(
            f"{name:>12}: {median:6.2f} s  ({mib / median:7.1f} MiB/s, "
            f"{args.messages / median:6.1f} msg/s)  runs [{times}]  server peak RSS {peak:.0f} MiB"
        )
    ratio = medians["aiosmtpd"] / medians["GatewaySMTP"]
    print(f"GatewaySMTP is {ratio:.1f}x faster than aiosmtpd's DATA reader")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
