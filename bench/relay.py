"""Relay rate: attachgate next to a stock Postfix, judged by Postfix's own tools.

Postfix's ``smtp-source`` sends the same load (5 KiB messages, 20 parallel
sessions, 2,000 messages by default; a new connection per message, as
smtp-source does without ``-d``) to

* attachgate (``attachgate serve --workers 2``: trusted loopback, hijack and
  screening on with limits out of reach, linking and DKIM off, warnings only),
* a private, untuned Postfix relaying everything to the same place,
* ``smtp-sink`` itself (the harness ceiling),

all passing mail on to one ``smtp-sink`` that counts what arrives. Targets take
turns within each round. A round is timed from the start of ``smtp-source`` to
its exit ("accepted") and on until the sink holds every message and, for
Postfix, its queue is empty ("delivered"); a round where the sink is short of
messages or ``smtp-source`` failed is an error, not a figure.

    python bench/relay.py [--rounds 3] [--messages 2000] [--sessions 20] [--length 5120]
    python bench/relay.py --profile        # one worker under py-spy (or cProfile)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:
    # Run as a file, this folder would come first on sys.path; put the
    # repository root there instead so that gateway/, tests/ and bench/ import.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from bench.common import (
    Figures,
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
    py_spy,
    run_smtp_source,
    smtp_source_args,
)


@dataclass(frozen=True)
class Round:
    target: str
    accepted: float  # seconds until smtp-source exited
    delivered: float  # seconds until the sink had every message (and Postfix's queue was empty)
    messages: int


def one_round(
    name: str,
    port: int,
    sink: SmtpSink,
    opts: argparse.Namespace,
    postfix: PostfixInstance | None = None,
    messages: int | None = None,
) -> Round:
    count = messages or opts.messages
    before = sink.messages()
    args = smtp_source_args(port, messages=count, sessions=opts.sessions, length=opts.length)
    start = time.perf_counter()
    run = run_smtp_source(args)
    if run.returncode != 0:
        raise RuntimeError(f"smtp-source against {name} exited {run.returncode}: {run.output}")
    sink.wait_messages(before + count, timeout=120)
    if postfix is not None:
        postfix.wait_queue_empty(timeout=120, interval=0.02)
    delivered = time.perf_counter() - start
    got = sink.messages() - before
    if got != count:
        raise RuntimeError(f"{name}: the sink got {got} messages, {count} were sent")
    return Round(name, run.seconds, delivered, count)


def rate(rounds: list[Round], target: str, key: str) -> Figures:
    return figures([r.messages / getattr(r, key) for r in rounds if r.target == target])


def report(rounds: list[Round], opts: argparse.Namespace) -> None:
    targets = list(dict.fromkeys(r.target for r in rounds))
    print()
    print(
        f"{opts.messages} messages of {opts.length} B body, {opts.sessions} sessions, "
        f"{opts.rounds} rounds; messages/s, median (range)"
    )
    print(f"{'target':<28} {'accepted':>22} {'delivered':>22}")
    for target in targets:
        acc = rate(rounds, target, "accepted").show()
        dlv = rate(rounds, target, "delivered").show()
        print(f"{target:<28} {acc:>22} {dlv:>22}")
    gw = [r for r in rounds if r.target.startswith("attachgate")]
    pf = [r for r in rounds if r.target == "postfix"]
    if gw and pf:
        ratios = [
            (g.messages / g.delivered) / (p.messages / p.delivered)
            for g, p in zip(gw, pf, strict=True)
        ]
        med = (
            rate(rounds, gw[0].target, "delivered").median
            / rate(rounds, "postfix", "delivered").median
        )
        fig = figures(ratios)
        print(
            f"\nattachgate / Postfix (delivered): {med:.2f} "
            f"(per round {fig.low:.2f}–{fig.high:.2f})"
        )


def run_bench(opts: argparse.Namespace, workdir: Path) -> int:
    sink = SmtpSink(workdir=workdir)
    sink.start()
    gw_name = f"attachgate ({opts.workers} workers)"
    gateway = GatewayProcess(
        gateway_config(workdir / "gw", free_port(), sink.port), workdir / "gw", workers=opts.workers
    )
    postfix = PostfixInstance(smarthost=Smarthost("127.0.0.1", sink.port))
    try:
        gateway.start()
        postfix.start()
        # Warm up each target once (connections, caches, Postfix's daemons).
        one_round(gw_name, gateway.port, sink, opts, messages=min(200, opts.messages))
        one_round("postfix", postfix.port, sink, opts, postfix, messages=min(200, opts.messages))
        rounds: list[Round] = []
        for n in range(opts.rounds):
            for r in (
                one_round(gw_name, gateway.port, sink, opts),
                one_round("postfix", postfix.port, sink, opts, postfix),
                one_round("smtp-sink alone (ceiling)", sink.port, sink, opts),
            ):
                rounds.append(r)
                print(
                    f"round {n + 1}: {r.target:<28} {r.messages / r.accepted:8.0f}/s accepted "
                    f"{r.messages / r.delivered:8.0f}/s delivered",
                    flush=True,
                )
        report(rounds, opts)
        return 0
    finally:
        gateway.stop()
        postfix.stop()
        postfix.remove()
        sink.close()


def run_profile(opts: argparse.Namespace, workdir: Path) -> int:
    kind = opts.profiler
    if kind == "auto":
        kind = "py-spy" if py_spy() else "cprofile"
    sink = SmtpSink(workdir=workdir)
    sink.start()
    gateway = GatewayProcess(
        gateway_config(workdir / "gw", free_port(), sink.port),
        workdir / "gw",
        workers=1,
        profiler="cprofile" if kind == "cprofile" else None,
    )
    spy: PySpy | None = None
    try:
        gateway.start()
        one_round("warm-up", gateway.port, sink, opts, messages=min(200, opts.messages))
        if kind == "py-spy":
            spy = PySpy(gateway.worker_pids()[0], workdir / "py-spy.txt")
            time.sleep(0.5)  # py-spy needs a moment to attach before the load starts
        r = one_round("attachgate (1 worker)", gateway.port, sink, opts)
        print(
            f"profiled round: {r.messages / r.delivered:.0f} messages/s "
            "(profiler overhead included)"
        )
    finally:
        if spy is not None:
            spy.stop()
        gateway.stop()
        sink.close()
    if kind == "py-spy":
        print_profile(workdir / "py-spy.txt", "py-spy", opts.top)
    else:
        print_profile(gateway.profile_path, "cprofile", opts.top)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--length", type=int, default=5120, help="body bytes (smtp-source -l)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="profile one worker instead")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    parser.add_argument("--top", type=int, default=25, help="functions to list when profiling")
    opts = parser.parse_args(argv)
    problem = missing_load_tools() or (None if opts.profile else missing_postfix())
    if problem:
        print(f"relay bench: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="attachgate-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        return run_profile(opts, workdir) if opts.profile else run_bench(opts, workdir)


if __name__ == "__main__":
    sys.exit(main())
