"""plan()+render() of a message with one 1 MiB base64 attachment against the
``email`` package doing parse + decode + flatten. Medians over 20 runs.

Run: ``python -m bench.mime`` (or ``python bench/mime.py``) from the checkout.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.mime import Extraction, LinkingRules, LinkNotice, Templates, plan

RUNS = 20
SIZE = 1024 * 1024


def build_message(size: int = SIZE) -> bytes:
    encoded = base64.b64encode(os.urandom(size))
    lines = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: report\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"Here is the report.\r\n"
        b'--b1\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n'
        + lines
        + b"\r\n--b1--\r\n"
    )


def ours(raw: bytes, templates: Templates) -> bytes:
    result = plan(raw, LinkingRules(min_size=1024))
    assert isinstance(result, Extraction)
    expires = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    notices = [
        LinkNotice(a.safe_filename, len(a.data), f"https://files.example.com/d/{a.index}", expires)
        for a in result.attachments
    ]
    return result.render(notices, templates)


def with_email_package(raw: bytes) -> bytes:
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    for part in msg.walk():
        if part.get_content_disposition() == "attachment":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes) and len(payload) == SIZE
    return msg.as_bytes()


def median_seconds(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    raw = build_message()
    templates = Templates.default()
    ours(raw, templates)
    with_email_package(raw)
    ours_s = median_seconds(lambda: ours(raw, templates))
    email_s = median_seconds(lambda: with_email_package(raw))
    mib = SIZE / (1024 * 1024)
    print(f"message: {len(raw)} bytes, attachment {SIZE} bytes, {RUNS} runs, medians")
    print(f"attachgate plan+render : {ours_s * 1000:7.2f} ms  {mib / ours_s:7.1f} MiB/s")
    print(f"email parse+decode+flat: {email_s * 1000:7.2f} ms  {mib / email_s:7.1f} MiB/s")
    print(f"ratio                  : {email_s / ours_s:7.1f}x")


if __name__ == "__main__":
    main()
