"""The ``attachgate`` command: one function per subcommand.

Exit codes: 0 success, 1 a check failed or an operation found nothing to do,
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.config import ConfigError, Settings, load_settings, split_listen

log = logging.getLogger("attachgate")


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config) if getattr(args, "config", None) else None
    return load_settings(path)


def _run(coro: Coroutine[Any, Any, int], *, loop: str = "asyncio") -> int:
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            log.warning("uvloop is not installed; using asyncio's own event loop")
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


# --- serve ---------------------------------------------------------------


async def _serve_one(settings: Settings, *, reuse_port: bool) -> int:
    from gateway.app import Gateway

    gateway = Gateway(settings, reuse_port=reuse_port)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "attachgate serving smtp=%s tls=%s web=%s next_hop=%s:%s pid=%d",
        ",".join(settings.smtp.listen),
        ",".join(settings.smtp.tls_listen) or "-",
        settings.web.listen if settings.web.enabled else "-",
        settings.next_hop.host,
        settings.next_hop.port,
        os.getpid(),
    )
    await stop.wait()
    log.info("attachgate stopping: draining sessions")
    await gateway.close()
    return 0


def _worker(config: str | None, env: dict[str, str]) -> None:
    os.environ.update(env)
    try:
        settings = load_settings(Path(config) if config else None)
        logs.setup(settings.log.level)
        code = _run(_serve_one(settings, reuse_port=True), loop=settings.smtp.event_loop)
    except ConfigError as exc:
        _print_config_error(exc)
        code = 2
    sys.exit(code)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.setup(settings.log.level)
    workers = args.workers or 1
    if workers == 1:
        return _run(_serve_one(settings, reuse_port=False), loop=settings.smtp.event_loop)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(args.config, {}), name=f"attachgate-worker-{i}")
        for i in range(workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)


# --- config -------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    s = _settings(args)
    from gateway.app import load_dkim_keys

    keys, warnings = load_dkim_keys(s)
    print("configuration OK")
    print(f"  smtp listen:     {', '.join(s.smtp.listen) or '-'}")
    print(f"  smtp tls_listen: {', '.join(s.smtp.tls_listen) or '-'}")
    print(f"  trusted:         {', '.join(str(n) for n in s.smtp.trusted_networks) or '-'}")
    tls = "implicit TLS" if s.next_hop.implicit_tls else f"STARTTLS {s.next_hop.starttls}"
    auth = f", AUTH as {s.next_hop.username}" if s.next_hop.username else ""
    print(f"  next hop:        {s.next_hop.host}:{s.next_hop.port} ({tls}{auth})")
    print(f"  web:             {s.web.listen} → {s.web.public_url}")
    print(f"  policy mode:     {s.policy.mode}")
    print(f"  domains:         {', '.join(sorted(s.domains)) or '-'}")
    records = ", ".join(f"{k.selector}._domainkey.{k.domain}" for k in keys)
    print(f"  DKIM keys:       {records or '-'}")
    linking = sum(1 for a in s.accounts.values() if a.linking and a.linking.enabled)
    print(f"  accounts:        {len(s.accounts)} ({linking} with linking switched on)")
    for w in warnings:
        print(f"warning: {w}")
    return 0


# --- passwords ------------------------------------------------------------


def cmd_password_hash(args: argparse.Namespace) -> int:
    from gateway.passwords import hash_password

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Again: ")
        if first != second:
            print("attachgate: the passwords differ", file=sys.stderr)
            return 1
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("attachgate: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


# --- DKIM and DNS --------------------------------------------------------


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from gateway.dkim import dns_txt_chunks, generate_key, write_private_key

    pem, record = generate_key(args.algorithm, args.bits)
    out = Path(args.out) if args.out else Path(f"{args.domain}.{args.selector}.key")
    try:
        write_private_key(out, pem)
    except FileExistsError:
        print(f"attachgate: {out} exists; not overwriting it", file=sys.stderr)
        return 1
    chunks = dns_txt_chunks(record)
    print(f"private key written to {out} (mode 0600)")
    print("publish this TXT record:")
    quoted = " ".join(json.dumps(c) for c in chunks)
    print(f"{args.selector}._domainkey.{args.domain}. IN TXT ( {quoted} )")
    print("and add to the configuration:")
    print(f'[domains."{args.domain}"]')
    print(f'dkim_selector = "{args.selector}"')
    print(f'dkim_key_file = "{out.resolve()}"')
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import DomainInput, run_doctor

    s = _settings(args)
    names = [d.lower() for d in args.domains] or sorted(s.domains)
    inputs = []
    for name in names:
        dom = s.domains.get(name)
        dkim: list[tuple[str, bytes]] = []
        if dom is not None:
            pairs = []
            if dom.dkim_selector and dom.dkim_key_file:
                pairs.append((dom.dkim_selector, dom.dkim_key_file))
            pairs += [(k.selector, k.key_file) for k in dom.dkim_keys]
            for selector, path in pairs:
                try:
                    dkim.append((selector, path.read_bytes()))
                except OSError as exc:
                    print(f"attachgate: cannot read {path}: {exc.strerror}", file=sys.stderr)
                    return 2
        inputs.append(DomainInput(domain=name, dkim=dkim))
    addresses = list(s.smtp.public_addresses)
    if not addresses:
        for listen in s.smtp.listen:
            host = split_listen(listen)[0]
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                continue  # a host name: say smtp.public_addresses instead
            if not ip.is_unspecified:
                addresses.append(str(ip))
    return _run(
        _doctor(
            run_doctor(
                inputs,
                public_addresses=addresses,
                hostname=s.smtp.hostname,
                nameservers=s.dns.nameservers or None,
                port=s.dns.port,
                timeout=s.dns.timeout,
            ),
            as_json=args.json,
        )
    )


async def _doctor(coro: Coroutine[Any, Any, Any], *, as_json: bool) -> int:
    report = await coro
    print(report.to_json() if as_json else report.to_text())
    return 0 if report.ok else 1


# --- state: accounts, bans, links, gc, quota ---------------------------------


async def _with_state(settings: Settings, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from gateway.app import open_stores

    stores = await open_stores(settings)
    try:
        return await fn(stores)
    finally:
        await stores.state.close()
        await stores.blobs.close()


_TIME_KEYS = frozenset({"since", "until", "frozen_at"})


def _cell(key: str, value: Any) -> str:
    if key in _TIME_KEYS and isinstance(value, int | float):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if key == "remaining" and isinstance(value, int | float):
        return f"{value:.0f}s"
    if key == "windows" and isinstance(value, list):
        return (
            ",".join(
                f"{w['messages']}/{w['max_messages'] or '-'}msg+"
                f"{w['recipients']}/{w['max_recipients'] or '-'}rcpt@{w['window']:.0f}s"
                for w in value
            )
            or "-"
        )
    if value is None or value == "":
        return "-"
    return str(value)


def _row(row: dict[str, Any]) -> str:
    """One report row for a terminal: times in UTC, windows spelled out."""
    return "  ".join(f"{key}={_cell(key, value)}" for key, value in row.items())


def cmd_accounts(args: argparse.Namespace) -> int:
    from gateway import abuse
    from gateway.policy.accounts import Directory

    s = _settings(args)

    async def go(stores: Any) -> int:
        if args.action == "list":
            rows = await abuse.accounts_report(stores.state, Directory(s), time.time())
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            else:
                for row in rows:
                    print(_row(row))
            return 0
        if not args.address:
            print("attachgate: an ADDRESS is needed", file=sys.stderr)
            return 2
        address = args.address.lower()
        if args.action == "unfreeze":
            done = await abuse.cli_unfreeze(stores.state, address)
            print(f"{address}: {'unfrozen' if done else 'was not frozen'}")
            return 0 if done else 1
        done = await stores.state.freeze(address, abuse.ADMIN_FREEZE_REASON, time.time())
        print(f"{address}: {'frozen' if done else 'was already frozen'}")
        return 0 if done else 1

    return _run(_with_state(s, go))


def cmd_bans(args: argparse.Namespace) -> int:
    from gateway import abuse

    s = _settings(args)

    async def go(stores: Any) -> int:
        if args.action == "list":
            for row in await abuse.bans_report(stores.state, time.time()):
                print(_row(row))
            return 0
        if not args.ip:
            print("attachgate: an IP is needed", file=sys.stderr)
            return 2
        try:
            done = await abuse.lift_ban(stores.state, args.ip)
        except ValueError:
            print(f"attachgate: {args.ip!r} is not an IP address", file=sys.stderr)
            return 2
        print(f"{args.ip}: {'ban lifted' if done else 'was not banned'}")
        return 0 if done else 1

    return _run(_with_state(s, go))


def _link_id_from(value: str, settings: Settings) -> str:
    from web.links import LinkError, LinkSigner

    token = value.rstrip("/").rsplit("/d/", 1)[-1].split("/", 1)[0]
    keys = [k.get_secret_value() for k in settings.links.secret_keys]
    if keys:
        signer = LinkSigner(keys, 10 * 365 * 86400.0)
        with contextlib.suppress(LinkError):
            return signer.verify(token)
    return value


def cmd_links_revoke(args: argparse.Namespace) -> int:
    s = _settings(args)

    async def go(stores: Any) -> int:
        failed = 0
        for value in args.links:
            link_id = _link_id_from(value, s)
            done = await stores.state.revoke_link(link_id)
            print(f"{link_id}: {'revoked' if done else 'no such link'}")
            failed += 0 if done else 1
        return 1 if failed else 0

    return _run(_with_state(s, go))


def cmd_gc(args: argparse.Namespace) -> int:
    from storage.local import LocalBlobStore

    s = _settings(args)

    async def go(stores: Any) -> int:
        now = time.time()
        result = await stores.state.gc(now)
        removed = 0
        grace = s.storage.gc_grace
        for digest in result.orphan_digests:
            if await stores.state.referenced(digest):
                continue
            path = stores.blobs.local_path(digest)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime < grace:
                        continue
            await stores.blobs.delete(digest)
            removed += 1
        # Blobs with no record at all (a crash between blob and record).
        async for digest, mtime in stores.blobs.iter_digests():
            if now - mtime >= grace and not await stores.state.referenced(digest):
                await stores.blobs.delete(digest)
                removed += 1
        swept = 0
        if isinstance(stores.blobs, LocalBlobStore):
            # Temp files a crash left behind mid-write.
            swept = await stores.blobs.sweep_temp(now, grace)
        print(
            f"expired records deleted: {result.expired_records}; blobs deleted: {removed}; "
            f"unfinished writes removed: {swept}"
        )
        return 0

    return _run(_with_state(s, go))


def cmd_quota_recalc(args: argparse.Namespace) -> int:
    s = _settings(args)

    async def go(stores: Any) -> int:
        usage = await stores.state.recalc_usage(time.time())
        for account, used in sorted(usage.items()):
            print(f"{account}  {used}")
        return 0

    return _run(_with_state(s, go))


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return _run(run_demo(once=args.once))


# --- parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attachgate",
        description="Outbound attachment-linking SMTP gateway",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def cfg(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help="TOML file (default: $ATTACHGATE_CONFIG)")
        return sp

    sp = cfg(sub.add_parser("serve", help="run the gateway and the download service"))
    sp.add_argument("--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="run a self-contained demonstration, no configuration needed")
    sp.add_argument("--once", action="store_true", help="send the sample, show it, exit 0")
    sp.set_defaults(func=cmd_demo)

    group = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    c = cfg(group.add_parser("check", help="validate and summarise the configuration"))
    c.set_defaults(func=cmd_config_check)

    group = sub.add_parser("password", help="passwords").add_subparsers(dest="sub", required=True)
    c = group.add_parser("hash", help="print an argon2 hash of a password (prompt or stdin)")
    c.set_defaults(func=cmd_password_hash)

    group = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="sub", required=True)
    c = group.add_parser("keygen", help="generate a key and print its DNS record")
    c.add_argument("domain")
    c.add_argument("--selector", required=True)
    c.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    c.add_argument("--bits", type=int, default=2048)
    c.add_argument("--out", help="key file (default DOMAIN.SELECTOR.key)")
    c.set_defaults(func=cmd_dkim_keygen)

    sp = cfg(sub.add_parser("doctor", help="check SPF, DKIM, DMARC, PTR of the sending domains"))
    sp.add_argument("domains", nargs="*")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_doctor)

    sp = cfg(sub.add_parser("accounts", help="account state"))
    sp.add_argument("action", choices=["list", "freeze", "unfreeze"])
    sp.add_argument("address", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_accounts)

    sp = cfg(sub.add_parser("bans", help="failed-login bans"))
    sp.add_argument("action", choices=["list", "lift"])
    sp.add_argument("ip", nargs="?")
    sp.set_defaults(func=cmd_bans)

    group = sub.add_parser("links", help="download links").add_subparsers(dest="sub", required=True)
    c = cfg(group.add_parser("revoke", help="revoke links by id, token or URL"))
    c.add_argument("links", nargs="+")
    c.set_defaults(func=cmd_links_revoke)

    sp = cfg(sub.add_parser("gc", help="delete expired links and unreferenced blobs"))
    sp.set_defaults(func=cmd_gc)

    group = sub.add_parser("quota", help="storage quotas").add_subparsers(dest="sub", required=True)
    c = cfg(group.add_parser("recalc", help="recompute each account's usage from the records"))
    c.set_defaults(func=cmd_quota_recalc)
    return p


def _print_config_error(exc: ConfigError) -> None:
    print("attachgate: configuration error:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
