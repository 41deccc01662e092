"""DKIM signatures per second per core for a 10 KiB message (relaxed/relaxed).

Compares dkimpy's own ``dkim.sign`` (RSA-2048, pure-Python RSA) with the gateway's
``Signer`` (RSA-2048 and Ed25519 through ``cryptography``). Each figure is the median
of ``--rounds`` rounds; a round signs repeatedly for ``--seconds`` on one thread.

Run from the repository root: ``python -m bench.dkim`` (or ``python bench/dkim.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:
    # Run as a file, this folder would come first on sys.path and its dkim.py would
    # shadow dkimpy's "dkim" package; put the repository root there instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

MESSAGE_SIZE = 10 * 1024


def make_message(size: int = MESSAGE_SIZE) -> bytes:
    """A plain-text message of about ``size`` bytes with the usual header fields."""
    head = (
        b'From: "Alice Example" <alice@example.com>\r\n'
        b"To: bob@example.org, carol@example.net\r\n"
        b"Subject: Quarterly figures\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <1234@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog;  figures follow.\t \r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[: size - len(head)]


def rate(action: Callable[[], object], seconds: float) -> float:
    """Calls of ``action`` per second of this process's CPU time, over at least ``seconds``.

    CPU time rather than wall time: on a shared machine the figure stays "per core".
    """
    count = 0
    start = time.process_time()
    deadline = start + seconds
    while True:
        action()
        count += 1
        now = time.process_time()
        if now >= deadline:
            return count / (now - start)


def main(argv: list[str] | None = None) -> int:
    import dkim
    from cryptography.hazmat.primitives import serialization

    from gateway.dkim import DkimKey, Signer, SignOptions, generate_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    args = parser.parse_args(argv)

    message = make_message()
    rsa_pem, _ = generate_key("rsa", 2048)
    ed_pem, _ = generate_key("ed25519")
    rsa_key = DkimKey("example.com", "rsa", "rsa-sha256", rsa_pem)
    ed_key = DkimKey("example.com", "ed", "ed25519-sha256", ed_pem)
    options = SignOptions()
    rsa_signer = Signer([rsa_key], options)
    ed_signer = Signer([ed_key], options)

    # dkimpy gets the same header list our signer chooses, and PKCS#1 PEM (all it reads).
    signed = rsa_signer.sign(message)
    headers, _ = dkim.rfc822_parse(signed)
    sig = dkim.util.parse_tag_value(headers[0][1])
    include = [h.strip() for h in sig[b"h"].split(b":")]
    pkcs1 = serialization.load_pem_private_key(rsa_pem, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )

    def dkimpy_rsa() -> object:
        return dkim.sign(
            message,
            b"rsa",
            b"example.com",
            pkcs1,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )

    cases: list[tuple[str, Callable[[], object]]] = [
        ("dkimpy dkim.sign, RSA-2048", dkimpy_rsa),
        ("Signer, RSA-2048 (cryptography)", lambda: rsa_signer.sign(message)),
        ("Signer, Ed25519 (cryptography)", lambda: ed_signer.sign(message)),
    ]
    print(f"message: {len(message)} bytes; {args.rounds} rounds of {args.seconds:g} s; one thread")
    medians: dict[str, float] = {}
    for label, action in cases:
        action()  # warm up
        rates = [rate(action, args.seconds) for _ in range(args.rounds)]
        medians[label] = statistics.median(rates)
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(
            f"{label:34} {medians[label]:10,.0f} signatures/s  "
            f"({1000 / medians[label]:.3f} ms each; rounds {spread})"
        )
    base = medians[cases[0][0]]
    print(f"speed-up, RSA-2048: {medians[cases[1][0]] / base:.1f}x over dkimpy")
    print(f"speed-up, Ed25519:  {medians[cases[2][0]] / base:.1f}x over dkimpy RSA-2048")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
