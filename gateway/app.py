"""Composition root: builds the stores, signers, handler and listeners from the
settings, runs SMTP and the download service in one event loop, and shuts
them down in order (stop accepting, drain, close)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.abuse import AbuseControl
from gateway.config import ConfigError, Settings, split_listen
from gateway.delivery import NextHop
from gateway.dkim import DkimError, DkimKey, Signer, SignOptions, load_key
from gateway.handler import Handler, Services
from gateway.mime.rewrite import MimeError, MimeLimits, Templates
from gateway.notify import Notifier
from gateway.passwords import PasswordChecker
from gateway.policy.accounts import Directory
from gateway.process import LinkingContext, MessageProcessor
from gateway.server import ConnectionTable, bind_listeners, start_smtp
from storage.interfaces import BlobStore, StateStore
from storage.local import LocalBlobStore
from storage.redis import RedisStateStore
from storage.sqlite import SqliteStateStore
from web.admin import add_admin_routes
from web.app import WebOptions, build_app
from web.links import LinkSigner
from web.metrics import FLUSH_INTERVAL, Metrics, build_metrics_app

log = logging.getLogger("attachgate")

DRAIN_TIMEOUT = 30.0
try:
    VERSION = importlib.metadata.version("attachgate")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "unknown"
# A notification the next hop could not take is tried again after these.
NOTIFY_RETRY_DELAYS = (60.0, 300.0, 1800.0)


def load_dkim_keys(settings: Settings) -> tuple[list[DkimKey], list[str]]:
    """Every active key of every domain, loaded and checked once."""
    keys: list[DkimKey] = []
    warnings: list[str] = []
    problems: list[str] = []
    for domain, dom in settings.domains.items():
        entries: list[tuple[str, Path, str]] = []
        if dom.dkim_selector and dom.dkim_key_file:
            entries.append((dom.dkim_selector, dom.dkim_key_file, "dkim_key_file"))
        entries += [
            (k.selector, k.key_file, f"dkim_keys.{i}.key_file")
            for i, k in enumerate(dom.dkim_keys)
            if k.active
        ]
        for selector, path, key_name in entries:
            try:
                key, warns = load_key(domain, selector, path)
            except DkimError as exc:
                problems.append(f"domains.{domain}.{key_name}: {exc}")
                continue
            keys.append(key)
            warnings += warns
    if problems:
        raise ConfigError(problems)
    return keys, warnings


@dataclass
class Stores:
    state: StateStore
    blobs: BlobStore


async def open_stores(settings: Settings) -> Stores:
    st = settings.state
    state: StateStore
    if st.backend == "redis":
        assert st.redis_url is not None
        state = await RedisStateStore.open(
            st.redis_url, prefix=st.redis_prefix, socket_timeout=st.busy_timeout
        )
    else:
        st.path.parent.mkdir(parents=True, exist_ok=True)
        state = await SqliteStateStore.open(st.path, busy_timeout=st.busy_timeout)
    blobs = LocalBlobStore(settings.storage.path)
    return Stores(state=state, blobs=blobs)


class Gateway:
    """One process's worth of attachgate: SMTP listeners plus the web service."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
        sockets: dict[str, list[socket.socket]] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._reuse_port = reuse_port
        self._sockets = sockets
        self._servers: list[asyncio.Server] = []
        self._table: ConnectionTable | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.stores: Stores | None = None
        self.next_hop: NextHop | None = None
        self.handler: Handler | None = None
        self.processor: MessageProcessor | None = None
        self.abuse: AbuseControl | None = None
        self.notifier: Notifier | None = None
        self.link_signer: LinkSigner | None = None
        self.web_port: int | None = None

    @property
    def smtp_ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self._servers if s.sockets]

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close(drain=0)
            raise

    async def _start(self) -> None:
        s = self.settings
        directory = Directory(s)
        keys, warnings = load_dkim_keys(s)
        for w in warnings:
            log.warning("%s", w)
        self.stores = stores = await open_stores(s)
        self.next_hop = NextHop(s.next_hop, helo_name=s.smtp.hostname)
        secret_keys = [k.get_secret_value() for k in s.links.secret_keys]
        linking: LinkingContext | None = None
        if secret_keys:
            self.link_signer = LinkSigner(secret_keys, s.links.expire_after, clock=self.clock)
            templates = Templates.default()
            if s.linking.templates_dir:
                try:
                    templates = Templates.from_dir(s.linking.templates_dir)
                except MimeError as exc:
                    raise ConfigError([f"linking.templates_dir: {exc}"]) from exc
            linking = LinkingContext(
                blobs=stores.blobs,
                state=stores.state,
                signer=self.link_signer,
                public_url=s.web.public_url,
                expire_after=s.links.expire_after,
                limits=MimeLimits(
                    max_depth=s.mime.max_depth,
                    max_parts=s.mime.max_parts,
                    max_header_size=s.mime.max_header_size,
                ),
                templates=templates,
            )
        signer = (
            Signer(
                keys,
                SignOptions(
                    refuse_duplicates=s.dkim.refuse_duplicate_headers,
                    expire_after=s.dkim.expire_after,
                ),
                clock=self.clock,
            )
            if keys
            else None
        )
        self.processor = MessageProcessor(
            policy=s.policy, linking=linking, dkim=signer, clock=self.clock, metrics=self.metrics
        )
        notifier = Notifier(
            next_hop=self.next_hop,
            hostname=s.smtp.hostname,
            sender=f"postmaster@{s.smtp.hostname}",
            state=stores.state,
            clock=self.clock,
            retry_delays=NOTIFY_RETRY_DELAYS,
            metrics=self.metrics,
            sign=signer.sign if signer is not None else None,
        )
        self.notifier = notifier
        self.abuse = AbuseControl(
            settings=s,
            directory=directory,
            state=stores.state,
            notifier=notifier,
            clock=self.clock,
            metrics=self.metrics,
        )
        self.handler = Handler(
            Services(
                settings=s,
                directory=directory,
                next_hop=self.next_hop,
                passwords=PasswordChecker(),
                processor=self.processor,
                abuse=self.abuse,
                clock=self.clock,
                metrics=self.metrics,
            )
        )
        sockets = self._sockets or bind_listeners(s, reuse_port=self._reuse_port)
        self._table = ConnectionTable(s.smtp.max_connections_per_ip, s.smtp.max_connections)
        self._servers = await start_smtp(s, self.handler, sockets, self._table)
        if s.web.enabled:
            await self._start_web(stores, self.abuse.unfreeze_signer)
        if s.metrics.listen is not None:
            await self._start_metrics(stores.state, s.metrics.listen)

    async def _start_web(self, stores: Stores, unfreeze_signer: LinkSigner | None) -> None:
        s = self.settings
        signer = self.link_signer or LinkSigner(
            ["attachgate-no-links-configured"], s.links.expire_after, clock=self.clock
        )
        app = build_app(
            stores.state,
            stores.blobs,
            signer,
            WebOptions(public_url=s.web.public_url, clock=self.clock, metrics=self.metrics),
        )
        if unfreeze_signer is not None:
            add_admin_routes(
                app,
                state=stores.state,
                unfreeze_signer=unfreeze_signer,
                admin_password_hash=s.web.admin_password_hash.get_secret_value()
                if s.web.admin_enabled and s.web.admin_password_hash
                else None,
                admin_username=s.web.admin_username,
                clock=self.clock,
            )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = split_listen(s.web.listen)
        site = web.TCPSite(runner, host, port, reuse_port=self._reuse_port or None)
        await site.start()
        self._runner = runner
        if runner.addresses:
            self.web_port = runner.addresses[0][1]

    async def _start_metrics(self, state: StateStore, listen: str) -> None:
        # Counting always happens; adding the counts to the store only when
        # someone can read them.
        self._flusher = asyncio.create_task(self.metrics.run(state, FLUSH_INTERVAL))
        app = build_metrics_app(state, self.metrics, version=VERSION, clock=self.clock)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._metrics_runner = runner
        host, port = split_listen(listen)
        site = web.TCPSite(runner, host, port, reuse_port=self._reuse_port or None)
        await site.start()
        if runner.addresses:
            self.metrics_port = runner.addresses[0][1]

    async def close(self, drain: float = DRAIN_TIMEOUT) -> None:
        for srv in self._servers:
            srv.close()
        if self._table is not None:
            await self._table.drain(drain)
        for srv in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(srv.wait_closed(), 5)
        self._servers = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self.abuse is not None:
            await self.abuse.drain()
        if self.notifier is not None:
            await self.notifier.close()
        if self.next_hop is not None:
            await self.next_hop.close()
        if self._flusher is not None:
            # The last counts go to the store before it closes.
            self._flusher.cancel()
            # gather: the flusher's own cancellation is its result, while a
            # cancellation of close() itself still goes through.
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self.stores is not None:
            await self.stores.state.close()
            await self.stores.blobs.close()
            self.stores = None
