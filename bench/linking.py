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

(b) Memory: peak RSS (``VmHWM``) of one gateway process while 20 sessions each
    send one 25 MiB message (``max_message_size`` raised), linking on; a fresh
    process per round.

Each figure is the median of ``--rounds`` rounds (3). Downloads are measured by
``bench/download.py``.

    python bench/linking.py [--rounds 3] [--messages 200] [--sessions 10]
                            [--big-sessions 20] [--big-mib 25] [--skip-memory]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

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

MIB = 1024 * 1024
DOMAIN = "bench.example"
SENDER = f"sender@{DOMAIN}"
RECIPIENT = "rcpt@remote.example"


def write_message(path: Path, attachment_bytes: int) -> int:
    """A text+HTML message with one random attachment, LF line endings
    (``smtp-source -F`` turns each line end into CRLF). Returns the file size."""
    msg = EmailMessage(policy=SMTP_POLICY.clone(linesep="\n"))
    msg["From"] = f"Bench Sender <{SENDER}>"
    msg["To"] = f"<{RECIPIENT}>"
    msg["Subject"] = "Quarterly figures"
    msg["Date"] = "Tue, 24 Nov 2026 08:00:00 +0000"
    msg["Message-ID"] = f"<linking-bench@{DOMAIN}>"
    msg.set_content("Hello,\n\nthe figures are attached.\n\nRegards\n")
    msg.add_alternative(
        "<html><body><p>Hello,</p><p>the figures are attached.</p><p>Regards</p></body></html>\n",
        subtype="html",
    )
    msg.add_attachment(
        os.urandom(attachment_bytes),
        maintype="application",
        subtype="octet-stream",
        filename="figures.bin",
    )
    data = msg.as_bytes()
    path.write_bytes(data)
    return len(data)


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


@dataclass(frozen=True)
class Timed:
    target: str
    seconds: float  # smtp-source start until the sink had every message
    messages: int


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
    sink.wait_messages(before + messages, timeout=300)
    if postfix is not None:
        postfix.wait_queue_empty(timeout=300, interval=0.02)
    seconds = time.perf_counter() - start
    got = sink.messages() - before
    if got != messages:
        raise RuntimeError(f"{name}: the sink got {got} messages, {messages} were sent")
    return Timed(name, seconds, messages)


def throughput(opts: argparse.Namespace, workdir: Path) -> None:
    attachment = opts.attachment_kib * 1024
    message_file = workdir / "one-attachment.eml"
    size = write_message(message_file, attachment)
    print(
        f"(a) {opts.messages} messages of {size / MIB:.2f} MiB, one {attachment / MIB:.2f} MiB "
        f"attachment each, {opts.sessions} sessions, {opts.rounds} rounds",
        flush=True,
    )
    sink = SmtpSink(workdir=workdir)
    sink.start()
    gw_dir = workdir / "gw-a"
    gateway = GatewayProcess(linking_config(gw_dir, sink.port), gw_dir, workers=opts.workers)
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
        send_file(gw_name, gateway.port, sink, message_file, warm, opts.sessions)
        if postfix is not None:
            send_file("postfix", postfix.port, sink, message_file, warm, opts.sessions, postfix)
        for n in range(opts.rounds):
            links_before = link_records(gw_dir / "state.db")
            spy = None
            if opts.profile and n == 0:
                spy = PySpy(gateway.worker_pids()[0], workdir / "linking.prof")
                time.sleep(0.5)  # py-spy needs a moment to attach before the load starts
            r = send_file(gw_name, gateway.port, sink, message_file, opts.messages, opts.sessions)
            if spy is not None:
                spy.stop()
                print_profile(workdir / "linking.prof", "py-spy", opts.top)
            taken_out = link_records(gw_dir / "state.db") - links_before
            if taken_out != opts.messages:
                raise RuntimeError(
                    f"{taken_out} link records for {opts.messages} messages: "
                    "not every attachment was taken out"
                )
            rounds.append(r)
            print(
                f"round {n + 1}: {gw_name:<24} {r.messages / r.seconds:7.1f} messages/s "
                f"{r.messages * attachment / MIB / r.seconds:7.1f} MiB/s taken out",
                flush=True,
            )
            if postfix is not None:
                p = send_file(
                    "postfix",
                    postfix.port,
                    sink,
                    message_file,
                    opts.messages,
                    opts.sessions,
                    postfix,
                )
                rounds.append(p)
                print(
                    f"round {n + 1}: {'postfix (plain relay)':<24} "
                    f"{p.messages / p.seconds:7.1f} messages/s",
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
    print(f"attachments taken out:    {mib.show('{:.1f}')} MiB/s")
    pf_rates = [r.messages / r.seconds for r in rounds if r.target == "postfix"]
    if pf_rates:
        pf = figures(pf_rates)
        print(f"Postfix, plain relay:     {pf.show('{:.1f}')} messages/s")
        print(f"attachgate / Postfix:     {gw.median / pf.median:.2f}")


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
