"""Structured log lines: ``event key=value ...`` (logfmt), one per event.

Values with spaces, quotes, ``=`` or control characters are quoted and
escaped, so a hostile login name cannot forge a second log line.
"""

from __future__ import annotations

import logging
import sys
import time

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:@/[]+,")


def fmt_value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [name] + [f"{k}={fmt_value(v)}" for k, v in fields.items()]
    logger.log(level, " ".join(parts))


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


LINE_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _UTCFormatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; ours says what matters.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    mail_log.addFilter(_drop_login_data_notice)


def _drop_login_data_notice(record: logging.LogRecord) -> bool:
    # aiosmtpd warns about its own deprecated attribute on every AUTH.
    return "login_data is deprecated" not in record.getMessage()
