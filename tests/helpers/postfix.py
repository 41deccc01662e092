"""Debian's Postfix as an outside judge: a private instance in a temp directory,
plus Postfix's own load tools (``smtp-sink`` and ``smtp-source``) as subprocesses.

The system's default Postfix instance is never touched: every instance here has
its own ``config_directory`` (main.cf and master.cf written from scratch), its own
queue and data directories, listens on a free loopback port, logs to a file in its
directory (``maillog_file``, so no syslog is needed) and runs no daemon in a chroot.

Running an instance needs root (Postfix's master starts as root and its daemons
drop to ``mail_owner``). Nothing here imports pytest, so the benchmarks use it too.

Exception tree::

    PostfixError            a Postfix command failed or a condition was not met in time
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
POSTQUEUE = Path("/usr/sbin/postqueue")
SENDMAIL = Path("/usr/sbin/sendmail")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
DAEMON_DIRECTORY = Path("/usr/lib/postfix/sbin")
# Debian keeps postfix-files and dynamicmaps.cf here; read, never written.
META_DIRECTORY = Path("/etc/postfix")

MAIL_OWNER = "postfix"
HOSTNAME = "postfix.example.test"


class PostfixError(Exception):
    """A Postfix command failed, or what we waited for did not happen in time."""


def missing_postfix() -> str | None:
    """Why a private Postfix instance cannot run here, or None when it can."""
    for tool in (POSTFIX, POSTCONF, POSTQUEUE, SENDMAIL, DAEMON_DIRECTORY / "master"):
        if not tool.exists():
            return f"Debian's postfix is not installed ({tool} is missing)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master starts as root)"
    try:
        import pwd

        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"the user {MAIL_OWNER!r} (Postfix's mail_owner) does not exist"
    return None


def missing_load_tools() -> str | None:
    """Why ``smtp-source``/``smtp-sink`` cannot run here, or None when they can."""
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not tool.exists():
            return f"Postfix's load tools are not installed ({tool} is missing)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for programs that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts a TCP connection; PostfixError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise PostfixError(f"nothing accepts on {host}:{port} after {timeout}s") from exc
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


# --------------------------------------------------------------------------
# A private Postfix instance
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Smarthost:
    """Where the instance relays everything, and how it logs in there."""

    host: str
    port: int
    login: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # set: STARTTLS is required and the certificate verified


@dataclass(frozen=True)
class QueuedMessage:
    """One entry of ``postqueue -j``."""

    queue_id: str
    queue_name: str  # incoming, active, deferred, hold, maildrop
    sender: str
    recipients: list[str]
    delay_reasons: list[str]


def _master_cf(port: int) -> str:
    # service type private unpriv chroot wakeup maxproc command
    rows = [
        f"127.0.0.1:{port} inet n - n - - smtpd",
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "tlsmgr unix - - n 1000? 1 tlsmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "smtp unix - - n - - smtp",
        "relay unix - - n - - smtp",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "local unix - n n - - local",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ]
    return "\n".join(rows) + "\n"


@dataclass
class PostfixInstance:
    """A private Postfix: ``start()``, use ``port``, read ``log_text()``, ``stop()``.

    Also a context manager (start on enter, stop and remove the directory on exit).
    ``main_cf`` adds or overrides main.cf parameters.
    """

    smarthost: Smarthost | None = None
    main_cf: Mapping[str, str] = field(default_factory=dict)
    hostname: str = HOSTNAME
    root: Path = field(init=False)
    port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # Our own directory under the system temp dir, traversable by mail_owner
        # (pytest's tmp_path sits below a 0700 directory the daemons cannot enter).
        self.root = Path(tempfile.mkdtemp(prefix="attachgate-postfix-"))
        self.root.chmod(0o755)
        for sub in (self.config_directory, self.queue_directory):
            sub.mkdir(mode=0o755)
        self.data_directory.mkdir(mode=0o700)
        shutil.chown(self.data_directory, MAIL_OWNER, MAIL_OWNER)

    # --- paths ---------------------------------------------------------------

    @property
    def config_directory(self) -> Path:
        return self.root / "config"

    @property
    def queue_directory(self) -> Path:
        return self.root / "queue"

    @property
    def data_directory(self) -> Path:
        return self.root / "data"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def pid_file(self) -> Path:
        return self.queue_directory / "pid" / "master.pid"

    # --- configuration -------------------------------------------------------

    def parameters(self) -> dict[str, str]:
        """Every main.cf parameter this instance is started with."""
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "meta_directory": str(META_DIRECTORY),
            "daemon_directory": str(DAEMON_DIRECTORY),
            "command_directory": str(POSTFIX.parent),
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2],
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "biff": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            # Send at once and retry soon: a deferred message is visible within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "smtp_data_done_timeout": "30s",
            "daemon_timeout": "60s",
        }
        hop = self.smarthost
        if hop is not None:
            params["relayhost"] = f"[{hop.host}]:{hop.port}"
            if hop.ca_file is not None:
                params["smtp_tls_security_level"] = "encrypt"
                params["smtp_tls_CAfile"] = str(self.config_directory / "smarthost-ca.pem")
                params["smtp_tls_loglevel"] = "1"
            if hop.login is not None:
                params["smtp_sasl_auth_enable"] = "yes"
                params["smtp_sasl_password_maps"] = (
                    f"texthash:{self.config_directory / 'sasl_passwd'}"
                )
                params["smtp_sasl_security_options"] = "noanonymous"
                params["smtp_sasl_tls_security_options"] = "noanonymous"
        params.update(self.main_cf)
        return params

    def write_config(self) -> None:
        """Write main.cf, master.cf and the smarthost files for the current ``port``."""
        cfg = self.config_directory
        lines = [f"{k} = {v}" for k, v in self.parameters().items()]
        (cfg / "main.cf").write_text("\n".join(lines) + "\n")
        (cfg / "master.cf").write_text(_master_cf(self.port))
        hop = self.smarthost
        if hop is not None and hop.ca_file is not None:
            shutil.copyfile(hop.ca_file, cfg / "smarthost-ca.pem")
        if hop is not None and hop.login is not None:
            secret = cfg / "sasl_passwd"
            secret.write_text(f"[{hop.host}]:{hop.port} {hop.login}:{hop.password or ''}\n")
            secret.chmod(0o600)
        # Postfix waits while main.cf looks freshly edited (mtime within the last
        # second or so); date the files back so start-up does not stall on it.
        past = time.time() - 60
        for path in cfg.iterdir():
            os.utime(path, (past, past))

    # --- commands ------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.config_directory)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run a Postfix command against this instance; its stdout (stderr folded in)."""
        proc = subprocess.run(
            args,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise PostfixError(f"{' '.join(args)} exited {proc.returncode}: {out.strip()}")
        return out

    def postfix(self, command: str, *, check: bool = True) -> str:
        return self.run(str(POSTFIX), "-c", str(self.config_directory), command, check=check)

    def master_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def running(self) -> bool:
        pid = self.master_pid()
        return pid is not None and _pid_alive(pid)

    def start(self, timeout: float = 20.0) -> None:
        """Write the configuration, start the master and wait until smtpd accepts."""
        last: PostfixError | None = None
        for _attempt in range(3):
            self.port = free_port()
            self.write_config()
            try:
                self.postfix("start")
                wait_for_port(self.port, timeout=timeout)
                return
            except PostfixError as exc:
                # The free port may have been taken between choosing and binding.
                last = exc
                self.abort()
        raise PostfixError(f"postfix did not start: {last}\n{self.log_text()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        """``postfix stop``, then wait until the master is gone; ``abort`` if it lingers."""
        pid = self.master_pid()
        if pid is None or not _pid_alive(pid):
            return
        self.postfix("stop", check=False)
        if self._wait_gone(pid, timeout):
            return
        self.abort()
        if not self._wait_gone(pid, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def abort(self) -> None:
        """``postfix abort`` (stop at once, no waiting for deliveries)."""
        pid = self.master_pid()
        if pid is None or not _pid_alive(pid):
            return
        self.postfix("abort", check=False)
        self._wait_gone(pid, 5.0)

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def remove(self) -> None:
        """Delete the instance's directory (stop it first)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.remove()

    # --- mail in, state out ------------------------------------------------

    def sendmail(self, message: bytes, sender: str, recipients: Sequence[str]) -> None:
        """Submit through Postfix's ``sendmail -C`` (postdrop → pickup)."""
        proc = subprocess.run(
            [
                str(SENDMAIL),
                "-C",
                str(self.config_directory),
                "-i",
                "-f",
                sender,
                "--",
                *recipients,
            ],
            input=message,
            env=self._env(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise PostfixError(f"sendmail exited {proc.returncode}: {proc.stderr.decode()}")

    def queue(self) -> list[QueuedMessage]:
        """The queue as ``postqueue -j`` reports it."""
        out = self.run(str(POSTQUEUE), "-c", str(self.config_directory), "-j")
        return [_queued(json.loads(line)) for line in out.splitlines() if line.startswith("{")]

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        self.run(str(POSTQUEUE), "-c", str(self.config_directory), "-f")

    def wait_queue_empty(self, timeout: float = 60.0, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() >= deadline:
                raise PostfixError(f"the queue is not empty after {timeout}s: {self.queue()}")
            time.sleep(interval)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` (a regex) in the maillog, waiting for it to appear."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text())
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"no {pattern!r} in the maillog after {timeout}s:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)


def _queued(entry: dict[str, Any]) -> QueuedMessage:
    recipients = entry.get("recipients", [])
    return QueuedMessage(
        queue_id=str(entry.get("queue_id", "")),
        queue_name=str(entry.get("queue_name", "")),
        sender=str(entry.get("sender", "")),
        recipients=[str(r.get("address", "")) for r in recipients],
        delay_reasons=[str(r["delay_reason"]) for r in recipients if "delay_reason" in r],
    )


# --------------------------------------------------------------------------
# smtp-sink and smtp-source
# --------------------------------------------------------------------------

_MESG_RE = re.compile(rb"mesg=(\d+)")


class SmtpSink:
    """Postfix's ``smtp-sink`` on a loopback port, counting messages (``-c``).

    ``smtp-sink`` cannot listen on port 0, so a free port is chosen first. Its
    counters go to a file; ``messages()`` reads the latest ``mesg=N``.
    """

    def __init__(
        self, *, extra: Sequence[str] = (), backlog: int = 256, workdir: Path | None = None
    ) -> None:
        self.port = 0
        self._extra = list(extra)
        self._backlog = backlog
        self._dir = Path(tempfile.mkdtemp(prefix="attachgate-sink-", dir=workdir))
        self._out = self._dir / "counters"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.port = free_port()
        args = [str(SMTP_SINK), "-c", *self._extra]
        if os.geteuid() == 0:
            args += ["-u", MAIL_OWNER]
        args += [f"127.0.0.1:{self.port}", str(self._backlog)]
        with self._out.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout=timeout)
        except PostfixError:
            self.stop()
            raise

    def messages(self) -> int:
        """How many messages the sink has received (``.`` answered) so far."""
        # The counters are rewritten after every event: the last few hold the latest.
        with self._out.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 512))
            counts = _MESG_RE.findall(fh.read())
        return int(counts[-1]) if counts else 0

    def wait_messages(self, count: int, timeout: float = 60.0, interval: float = 0.02) -> int:
        deadline = time.monotonic() + timeout
        while (got := self.messages()) < count:
            if time.monotonic() >= deadline:
                raise PostfixError(f"smtp-sink has {got} of {count} messages after {timeout}s")
            time.sleep(interval)
        return got

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SourceRun:
    """One finished ``smtp-source`` run."""

    seconds: float  # wall clock from start to exit
    returncode: int
    output: str


def smtp_source_args(
    port: int,
    *,
    messages: int,
    sessions: int,
    length: int | None = None,
    message_file: Path | None = None,
    sender: str = "bench@source.example",
    recipient: str = "rcpt@remote.example",
    hostname: str = "source.example",
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``smtp-source`` command line: ``-l length`` or ``-F file``, never both."""
    args = [
        str(SMTP_SOURCE),
        "-4",
        "-m",
        str(messages),
        "-s",
        str(sessions),
        "-M",
        hostname,
        "-f",
        sender,
        "-t",
        recipient,
    ]
    if message_file is not None:
        args += ["-F", str(message_file)]
    elif length is not None:
        args += ["-l", str(length)]
    return [*args, *extra, f"127.0.0.1:{port}"]


def run_smtp_source(args: Sequence[str], timeout: float = 600.0) -> SourceRun:
    """Run ``smtp-source`` to the end; its wall time, exit status and output."""
    start = time.perf_counter()
    proc = subprocess.run(list(args), capture_output=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return SourceRun(seconds=seconds, returncode=proc.returncode, output=output)


@contextlib.contextmanager
def smtp_sink(extra: Sequence[str] = ()) -> Iterator[SmtpSink]:
    """``with smtp_sink() as sink:`` — started, stopped and cleaned up."""
    sink = SmtpSink(extra=extra)
    sink.start()
    try:
        yield sink
    finally:
        sink.close()
