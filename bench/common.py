"""Shared pieces of the SMTP benchmarks: the gateway as a subprocess
(``attachgate serve`` with a temp configuration), Postfix's load tools, figures
(median and range) and profiling with py-spy or cProfile.

The scripts that use this put the repository root on ``sys.path`` first, so
``gateway`` and the private-Postfix helper of the test suite import.
"""

from __future__ import annotations

import io
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.postfix import (
    PostfixError,
    PostfixInstance,
    Smarthost,
    SmtpSink,
    SourceRun,
    free_port,
    missing_load_tools,
    missing_postfix,
    run_smtp_source,
    smtp_source_args,
)

__all__ = [
    "REPO",
    "Figures",
    "GatewayProcess",
    "PostfixError",
    "PostfixInstance",
    "Smarthost",
    "SmtpSink",
    "SourceRun",
    "figures",
    "free_port",
    "gateway_config",
    "missing_load_tools",
    "missing_postfix",
    "print_profile",
    "py_spy",
    "run_smtp_source",
    "smtp_greets",
    "smtp_source_args",
    "toml_dumps",
    "vm_kib",
]

REPO = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """Median and range of one measured quantity."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    def show(self, fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"


def figures(values: Sequence[float]) -> Figures:
    if not values:
        raise ValueError("no values to summarise")
    return Figures(statistics.median(values), min(values), max(values), tuple(values))


# --------------------------------------------------------------------------
# The gateway as a subprocess
# --------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: object) -> str:
    text = str(key)
    if text and all(c.isalnum() or c in "-_" for c in text):
        return text
    return _toml_value(text)


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Enough TOML for a configuration: tables of tables, scalars, lists, inline tables."""
    lines: list[str] = []

    def table(path: list[str], body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            table([*path, key], value)

    table([], data)
    return "\n".join(lines) + "\n"


def gateway_config(
    workdir: Path, port: int, sink_port: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The bench configuration: trusted loopback, hijack and screening on with limits
    out of reach, linking and DKIM off, no web service, warnings only."""
    cfg: dict[str, Any] = {
        "smtp": {
            "hostname": "gw.bench.example",
            "listen": [f"127.0.0.1:{port}"],
            "trusted_networks": ["127.0.0.0/8"],
            "max_connections_per_ip": 1000,
            "max_connections": 10000,
        },
        "next_hop": {"host": "127.0.0.1", "port": sink_port, "starttls": "off"},
        "web": {"enabled": False},
        "storage": {"path": str(workdir / "blobs")},
        "state": {"path": str(workdir / "state.db")},
        "policy": {"mode": "production"},
        "hijack": {
            "enabled": True,
            "max_messages": 100_000_000,
            "max_recipients": 100_000_000,
            "window": "1h",
        },
        "screening": {"enabled": True},
        "linking": {"enabled": False},
        "log": {"level": "warning"},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, Mapping) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


def smtp_greets(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait for a 220 greeting on ``host:port``, then QUIT politely.

    A full (tiny) SMTP session rather than a bare connect-and-close probe: a
    server may keep a session that never spoke for its whole command timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                reader = sock.makefile("rb")
                greeting = reader.readline()
                if not greeting.startswith(b"220"):
                    raise RuntimeError(f"{host}:{port} greeted with {greeting!r}")
                sock.sendall(b"QUIT\r\n")
                reader.readline()
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def _listening_inodes(port: int) -> list[str]:
    """Socket inodes of every TCP listener on ``port`` (from /proc/net)."""
    inodes: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(fields[9])
    return inodes


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (one per worker under SO_REUSEPORT)."""
    return len(_listening_inodes(port))


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class GatewayProcess:
    """``attachgate serve --config F --workers N`` in a subprocess.

    ``profiler="cprofile"`` runs the (single) worker under cProfile and keeps the
    stats in ``profile_path``; py-spy attaches from outside (see ``py_spy``).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        workers: int = 2,
        profiler: str | None = None,
    ) -> None:
        if profiler == "cprofile" and workers != 1:
            raise ValueError("cProfile follows one process: use workers=1")
        self.config = config
        self.workdir = workdir
        self.workers = workers
        self.profiler = profiler
        self.port = int(str(config["smtp"]["listen"][0]).rsplit(":", 1)[1])
        self.config_path = workdir / "attachgate.toml"
        self.log_path = workdir / "gateway.log"
        self.profile_path = workdir / "gateway.prof"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_dumps(self.config))
        serve = ["serve", "--config", str(self.config_path), "--workers", str(self.workers)]
        if self.profiler == "cprofile":
            cmd = [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(self.profile_path),
                "-m",
                "gateway.cli",
                *serve,
            ]
        else:
            cmd = [sys.executable, "-m", "gateway.cli", *serve]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while _listeners(self.port) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the gateway did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        smtp_greets(self.port, timeout=timeout)

    def worker_pids(self) -> list[int]:
        """The processes that serve SMTP (the main process itself when workers=1)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        # multiprocessing's resource tracker is a child too; workers listen on the port.
        kids = _children(self.proc.pid)
        return [k for k in kids if _listens(k, self.port)] or kids

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _listens(pid: int, port: int) -> bool:
    """True when ``pid`` holds a listening socket on ``port``."""
    inodes = set(_listening_inodes(port))
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


# --------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class PySpy:
    """``py-spy record`` attached to a running process until ``stop()``."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed")
        self.out = out
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        # py-spy writes its samples when interrupted, as after Ctrl-C.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _frame_name(frame: str) -> str:
    """``handle_DATA (gateway/handler.py:431)`` → ``handle_DATA (gateway/handler.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for prefix in (str(REPO) + "/", sys.prefix + "/"):
        path = path.removeprefix(prefix)
    return f"{name} ({path})" if path else name


def top_from_raw(text: str, limit: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Samples, top functions by own samples and by samples anywhere on the stack."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    return samples, own.most_common(limit), total.most_common(limit)


def print_profile(path: Path, kind: str, limit: int = 25) -> None:
    """Print the top functions of a py-spy raw file or a cProfile stats file."""
    if kind == "py-spy":
        samples, own, total = top_from_raw(path.read_text(errors="replace"), limit)
        print(f"py-spy: {samples} samples (all threads, idle excluded)")
        print("top functions by own samples:")
        for name, count in own:
            print(f"  {100 * count / max(samples, 1):5.1f}%  {name}")
        print("top functions by samples anywhere on the stack:")
        for name, count in total:
            print(f"  {100 * count / max(samples, 1):5.1f}%  {name}")
        return
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    print("cProfile (event-loop thread only):")
    print(out.getvalue())
