"""The ``attachgate`` command as an administrator runs it: a real process,
real files, exit codes and what it prints."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from gateway.dkim import dns_txt_chunks

EXE = shutil.which("attachgate", path=str(Path(sys.executable).parent)) or "attachgate"
SECRET = "a-very-secret-link-key-0123456789"


def run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ATTACHGATE_")}
    full_env.update(env or {})
    return subprocess.run(
        [EXE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "attachgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = f"""
[smtp]
hostname = "gw.example.test"
listen = ["127.0.0.1:2525"]
trusted_networks = ["10.0.0.0/8"]

[next_hop]
host = "smtp.example.test"
port = 587
starttls = "required"
username = "relay"
password = "next-hop-password-xyz"

[links]
secret_keys = ["{SECRET}"]

[domains."example.test"]

[accounts."alice@example.test"]
password_hash = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
linking = {{ enabled = true }}
"""


def test_config_check_summarises_without_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "configuration OK" in res.stdout
    assert "smtp.example.test:587 (STARTTLS required, AUTH as relay)" in res.stdout
    assert "1 with linking switched on" in res.stdout
    for secret in (SECRET, "next-hop-password-xyz", "argon2id"):
        assert secret not in res.stdout + res.stderr


def test_config_errors_name_each_key(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        '[smtp]\nlisten = ["nowhere"]\nmax_recipients = "lots"\nbogus = 1\n'
        '[linking]\nmin_size = "12 parsecs"\n[policy]\nmode = "maybe"\n',
    )
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for key in (
        "smtp.listen.0",
        "smtp.max_recipients",
        "smtp.bogus: unknown key",
        "linking.min_size",
        "policy.mode",
    ):
        assert key in res.stderr, key


@pytest.mark.parametrize(
    "value",
    [
        "correct horse battery staple",  # the password itself, pasted by mistake
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
        "$argon2id$v=19$m=65536,t=3,p=4$broken",
    ],
)
def test_a_password_hash_that_is_not_argon2_is_a_config_error(tmp_path: Path, value: str) -> None:
    cfg = write(
        tmp_path, GOOD.replace("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", value)
    )
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "accounts.alice@example.test.password_hash: not an argon2 hash" in res.stderr
    assert value not in res.stderr + res.stdout
    admin = write(tmp_path, GOOD + f'\n[web]\nadmin_password_hash = "{value}"\n')
    res = run("config", "check", "--config", str(admin))
    assert res.returncode == 2
    assert "web.admin_password_hash: not an argon2 hash" in res.stderr


def test_environment_overrides_and_is_checked(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    res = run(
        "config", "check", env={"ATTACHGATE_CONFIG": str(cfg), "ATTACHGATE_NEXT_HOP__PORT": "2525"}
    )
    assert res.returncode == 0, res.stderr
    assert "smtp.example.test:2525" in res.stdout
    res = run(
        "config",
        "check",
        env={"ATTACHGATE_CONFIG": str(cfg), "ATTACHGATE_SMTP__MAX_RECIPIENTS": "many"},
    )
    assert res.returncode == 2
    assert "smtp.max_recipients" in res.stderr


def test_unreadable_file_and_missing_tls(tmp_path: Path) -> None:
    res = run("config", "check", "--config", str(tmp_path / "absent.toml"))
    assert res.returncode == 2
    assert "cannot read the configuration file" in res.stderr
    cfg = write(
        tmp_path,
        GOOD.replace(
            "[next_hop]",
            f'[tls]\ncert_file = "{tmp_path}/no.crt"\nkey_file = "{tmp_path}/no.key"\n[next_hop]',
        ),
    )
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "tls.cert_file" in res.stderr and "tls.key_file" in res.stderr
    bad = write(tmp_path, "[smtp\n")
    res = run("config", "check", "--config", str(bad))
    assert res.returncode == 2 and "not valid TOML" in res.stderr


def test_small_dkim_key_is_a_config_error(tmp_path: Path) -> None:
    from tests.gateway.test_dkim import _small_rsa_pem

    path = tmp_path / "small.key"
    path.write_bytes(_small_rsa_pem(512))
    path.chmod(0o600)
    cfg = write(
        tmp_path,
        GOOD.replace(
            '[domains."example.test"]',
            f'[domains."example.test"]\ndkim_selector = "s1"\ndkim_key_file = "{path}"',
        ),
    )
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "domains.example.test.dkim_key_file" in res.stderr
    assert "Traceback" not in res.stderr


def test_password_hash_from_stdin() -> None:
    res = run("password", "hash", stdin="s3cret pass\n")
    assert res.returncode == 0, res.stderr
    hashed = res.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "s3cret pass")
    assert run("password", "hash", stdin="\n").returncode == 1


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkim_keygen(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "k.key"
    res = run(
        "dkim", "keygen", "example.test", "--selector", "s1", "--algorithm", algorithm,
        "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    line = next(x for x in res.stdout.splitlines() if x.startswith("s1._domainkey.example.test."))
    chunks = [c.strip('"') for c in line.split("( ", 1)[1].rsplit(" )", 1)[0].split('" "')]
    record = "".join(chunks)
    assert record.startswith("v=DKIM1;") and all(len(c) <= 255 for c in chunks)
    assert chunks == dns_txt_chunks(record)
    # Never overwrites an existing key.
    again = run("dkim", "keygen", "example.test", "--selector", "s1", "--out", str(out))
    assert again.returncode == 1


def test_demo_once() -> None:
    res = run("demo", "--once", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "identical to the attachment: yes" in res.stdout
    assert "verifies: yes" in res.stdout


def test_doctor_against_a_loopback_zone(tmp_path: Path) -> None:
    from gateway.dkim import generate_key, write_private_key
    from tests.helpers.dnsserver import ZoneServer

    pem, record = generate_key("ed25519")
    key = tmp_path / "s1.key"
    write_private_key(key, pem)
    good = [
        ("example.test", "TXT", '"v=spf1 ip4:127.0.0.1 -all"'),
        ("s1._domainkey.example.test", "TXT", record),
        ("_dmarc.example.test", "TXT", '"v=DMARC1; p=reject"'),
        ("1.0.0.127.in-addr.arpa", "PTR", "gw.example.test."),
        ("gw.example.test", "A", "127.0.0.1"),
    ]
    with ZoneServer(good) as zone:
        assert zone.address is not None
        cfg = write(
            tmp_path,
            f"""
[smtp]
hostname = "gw.example.test"
public_addresses = ["127.0.0.1"]
[dns]
nameservers = ["127.0.0.1"]
port = {zone.address[1]}
timeout = "2s"
[domains."example.test"]
dkim_selector = "s1"
dkim_key_file = "{key}"
""",
        )
        res = run("doctor", "--config", str(cfg))
        assert res.returncode == 0, res.stdout + res.stderr
        res = run("doctor", "--json", "--config", str(cfg))
        assert res.returncode == 0 and '"ok": true' in res.stdout
        zone.set_records([r for r in good if not r[2].startswith('"v=spf1')])
        res = run("doctor", "--config", str(cfg))
        assert res.returncode == 1
        assert "v=spf1" in res.stdout  # the record to publish


def test_hostname_must_be_fully_qualified(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD.replace('hostname = "gw.example.test"', 'hostname = "vm"'))
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "smtp.hostname: 'vm' is not a fully qualified host name" in res.stderr


def test_network_with_host_bits_is_refused(tmp_path: Path) -> None:
    # "10.0.0.1/8" would otherwise trust all of 10/8: an open relay by typo.
    cfg = write(tmp_path, GOOD.replace('["10.0.0.0/8"]', '["10.0.0.1/8"]'))
    res = run("config", "check", "--config", str(cfg))
    assert res.returncode == 2
    assert "smtp.trusted_networks.0: '10.0.0.1/8' has host bits set" in res.stderr


def test_serve_with_workers_reports_config_errors_by_key(tmp_path: Path) -> None:
    key = tmp_path / "missing.key"
    cfg = write(
        tmp_path,
        GOOD.replace(
            '[domains."example.test"]',
            f'[domains."example.test"]\ndkim_selector = "s1"\ndkim_key_file = "{key}"',
        ).replace('listen = ["127.0.0.1:2525"]', 'listen = ["127.0.0.1:0"]')
        + f'[state]\npath = "{tmp_path}/state.db"\n[storage]\npath = "{tmp_path}/blobs"\n'
        + "[web]\nenabled = false\n",
    )
    res = run("serve", "--workers", "2", "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert "domains.example.test.dkim_key_file" in res.stderr
    assert "Traceback" not in res.stderr
