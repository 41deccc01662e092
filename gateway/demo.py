"""``attachgate demo``: the whole story on one machine with no configuration.

Starts a capture sink as the next hop, the gateway and the download service
on free loopback ports, with a demo account that has linking on and a DKIM
key; sends a sample message with a 2 MB attachment through (AUTH over
STARTTLS with a throwaway certificate), shows the message as delivered,
downloads the link and compares the bytes, and checks the DKIM signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email
import email.policy
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib
import dkim
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import logs
from gateway.config import load_settings
from gateway.dkim import generate_key, write_private_key
from gateway.passwords import hash_password
from gateway.sink import CaptureSink

DOMAIN = "example.test"
ACCOUNT = f"demo@{DOMAIN}"
PASSWORD = "demo-password"  # the demo's own throwaway account
SELECTOR = "demo"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert_path, key_path


def sample_message(size: int = 2 * 1000 * 1000) -> tuple[EmailMessage, bytes]:
    attachment = os.urandom(size)
    msg = EmailMessage()
    msg["From"] = f"Demo Sender <{ACCOUNT}>"
    msg["To"] = "Recipient <someone@elsewhere.test>"
    msg["Subject"] = "Quarterly figures"
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=DOMAIN)
    msg.set_content("Hello,\n\nthe figures are attached.\n\nRegards\n")
    msg.add_alternative(
        "<html><body><p>Hello,</p><p>the figures are attached.</p><p>Regards</p></body></html>",
        subtype="html",
    )
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="Q3 figures.pdf")
    return msg, attachment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(base: Path, sink_port: int, cert: Path, key: Path, dkim_key: Path) -> Path:
    config = base / "attachgate.toml"
    web_port = free_port()
    secret = os.urandom(24).hex()
    config.write_text(
        f"""
[smtp]
hostname = "gw.{DOMAIN}"
listen = ["127.0.0.1:0"]
trusted_networks = []

[tls]
cert_file = "{cert}"
key_file = "{key}"

[next_hop]
host = "127.0.0.1"
port = {sink_port}
starttls = "off"

[web]
listen = "127.0.0.1:{web_port}"
public_url = "http://127.0.0.1:{web_port}"

[links]
secret_keys = ["{secret}"]
expire_after = "30d"

[storage]
path = "{base / "blobs"}"

[state]
path = "{base / "state.db"}"

[hijack]
notify = ["postmaster@{DOMAIN}"]

[domains."{DOMAIN}"]
dkim_selector = "{SELECTOR}"
dkim_key_file = "{dkim_key}"

[accounts."{ACCOUNT}"]
password_hash = "{hash_password(PASSWORD)}"
linking = {{ enabled = true, min_size = "100KiB" }}
""",
        encoding="utf-8",
    )
    return config


def _show(raw: bytes, limit: int = 60) -> str:
    lines = raw.decode("utf-8", "replace").split("\r\n")
    shown = lines[:limit]
    if len(lines) > limit:
        shown.append(f"[... {len(lines) - limit} more lines]")
    return "\n".join("  | " + line for line in shown)


async def run_demo(*, once: bool) -> int:
    logs.setup("warning")
    with tempfile.TemporaryDirectory(prefix="attachgate-demo-") as tmp:
        base = Path(tmp)
        return await _demo(base, once=once)


async def _demo(base: Path, *, once: bool) -> int:
    from gateway.app import Gateway

    sink = CaptureSink()
    await sink.start()
    cert, key = self_signed(base, f"gw.{DOMAIN}")
    pem, record = generate_key("rsa", 2048)
    dkim_key = base / "dkim.key"
    write_private_key(dkim_key, pem)
    config = write_config(base, sink.port, cert, key, dkim_key)
    settings = load_settings(config)
    gateway = Gateway(settings)
    await gateway.start()
    public_url = settings.web.public_url
    smtp_port = gateway.smtp_ports[0]
    print("attachgate demo")
    print(f"  gateway SMTP  127.0.0.1:{smtp_port} (STARTTLS + AUTH, account {ACCOUNT})")
    print(f"  downloads     {public_url}")
    print(f"  next hop      capture sink on 127.0.0.1:{sink.port}")
    try:
        msg, attachment = sample_message()
        tls = ssl.create_default_context(cafile=str(cert))
        reply = await aiosmtplib.send(
            msg,
            hostname="127.0.0.1",
            port=smtp_port,
            start_tls=True,
            tls_context=tls,
            username=ACCOUNT,
            password=PASSWORD,
            local_hostname="client.demo",
            timeout=60,
        )
        print(f"\n1. sent a message with a {len(attachment):,}-byte attachment: {reply[1]}")
        delivered = (await sink.wait_for(1))[0]
        print(f"2. the next hop received {len(delivered.content):,} bytes:\n")
        print(_show(delivered.content))
        parsed = email.message_from_bytes(delivered.content, policy=email.policy.default)
        text = parsed.get_body(("plain",))
        body = text.get_content() if text is not None else ""
        urls = re.findall(r"https?://\S+/d/[A-Za-z0-9_.\-]+", body)
        if not urls:
            print("demo: no download link in the delivered message", file=sys.stderr)
            return 1
        async with aiohttp.ClientSession() as http, http.get(urls[0] + "/file") as resp:
            got = await resp.read()
            disposition = resp.headers.get("Content-Disposition", "")
        same = hashlib.sha256(got).digest() == hashlib.sha256(attachment).digest()
        print(f"\n3. downloaded {urls[0]}/file: HTTP {resp.status}, {len(got):,} bytes,")
        print(f"   {disposition}")
        print(f"   identical to the attachment: {'yes' if same else 'NO'}")
        txt = record.encode()

        def dns(name: bytes, timeout: int = 5) -> bytes:
            return txt if name.rstrip(b".") == f"{SELECTOR}._domainkey.{DOMAIN}".encode() else b""

        verified = dkim.verify(delivered.content, dnsfunc=dns)
        print(
            f"4. DKIM signature (d={DOMAIN}, s={SELECTOR}) verifies: {'yes' if verified else 'NO'}"
        )
        if not (same and verified and resp.status == 200):
            return 1
        if once:
            return 0
        print(f"\nServing until Ctrl-C. Open {urls[0]} in a browser.")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return 0
    finally:
        await gateway.close(drain=1)
        await sink.close()
