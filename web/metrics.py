"""Counters for Prometheus, added up over every worker process and host.

Each process counts in memory (:meth:`Metrics.inc` is a dictionary update)
and adds what it counted to the state store every few seconds
(:meth:`Metrics.flush`), so a scrape of any worker shows the sum over all
workers that share the store, and counters keep counting across restarts.
A scrape flushes its own process first; other workers' last few seconds
arrive with their next flush.

Every counter is declared in :data:`COUNTERS` with its help text; a sample
is stored under its exposition key, ``name{label="value",...}`` with the
labels sorted. Label values come from short fixed lists (outcomes, policy
cases, reasons), never from addresses or file names, so the number of
samples stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from storage.interfaces import StateStore, StateUnavailable

log = logging.getLogger("attachgate.metrics")

FLUSH_INTERVAL = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS: Mapping[str, str] = {
    "attachgate_smtp_connections_total": "SMTP connections let in.",
    "attachgate_smtp_connections_refused_total": (
        "SMTP connections turned away at connect (reason: limit, banned, error)."
    ),
    "attachgate_auth_total": "SMTP AUTH attempts by result (ok, failed).",
    "attachgate_messages_total": (
        "Transactions that reached the end of DATA, by outcome (delivered, deferred, "
        "refused-by-next-hop, control, failed)."
    ),
    "attachgate_delivered_bytes_total": "Bytes of delivered messages, as received.",
    "attachgate_delivered_recipients_total": "Recipients of delivered messages.",
    "attachgate_refusals_total": (
        "Policy refusals by case (the [policy] case names, and relay_denied)."
    ),
    "attachgate_next_hop_failures_total": "Next hop unreachable, timed out or dropped.",
    "attachgate_attachments_linked_total": (
        "Attachments taken out and replaced by a link, in delivered messages."
    ),
    "attachgate_attachment_bytes_linked_total": (
        "Bytes of the attachments taken out, in delivered messages."
    ),
    "attachgate_linking_passed_total": (
        "Messages of linking accounts passed on with their attachments, by reason "
        "(no-attachments, signed, encrypted, limits, unparsable)."
    ),
    "attachgate_rewrite_failures_total": "Messages the rewriter could not handle.",
    "attachgate_dkim_signed_total": "Delivered messages that were DKIM-signed.",
    "attachgate_hijack_limits_total": "Hijack limits crossed (whether or not that froze).",
    "attachgate_accounts_frozen_total": "Accounts frozen by the hijack limits.",
    "attachgate_ip_bans_total": "Addresses banned by failed-AUTH screening.",
    "attachgate_notifications_total": (
        "Administrator notifications by result (sent; deduplicated; failed: refused for "
        "good, or still not taken after the last retry)."
    ),
    "attachgate_landing_views_total": "Download landing pages shown.",
    "attachgate_downloads_total": "Downloads counted (GET of the whole file or its first byte).",
    "attachgate_download_refusals_total": (
        "Link requests answered 404 (unknown, forged) or 410 (expired, revoked, file gone)."
    ),
}

GAUGES: Mapping[str, str] = {
    "attachgate_frozen_accounts": "Accounts frozen now.",
    "attachgate_banned_addresses": "IP addresses banned now.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_key(name: str, labels: Mapping[str, str]) -> str:
    """The exposition form of one sample: ``name`` or ``name{a="x",b="y"}``."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


class Metrics:
    """One process's counts since its last flush."""

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        if name not in COUNTERS:
            raise ValueError(f"undeclared counter {name!r}")
        key = sample_key(name, labels)
        self._pending[key] = self._pending.get(key, 0) + amount

    @property
    def pending(self) -> Mapping[str, int]:
        return self._pending

    async def flush(self, state: StateStore) -> None:
        """Add what was counted to the store; kept for the next try when it fails."""
        async with self._lock:
            deltas, self._pending = self._pending, {}
            if not deltas:
                return
            try:
                await state.add_counters(deltas)
            except BaseException:
                for key, amount in deltas.items():
                    self._pending[key] = self._pending.get(key, 0) + amount
                raise

    async def run(self, state: StateStore, interval: float = FLUSH_INTERVAL) -> None:
        """Flush every ``interval`` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    # Shielded: a flush cut short could be committed and put back.
                    await asyncio.shield(self.flush(state))
                except StateUnavailable as exc:
                    log.warning("metrics flush failed: %s", exc)
        finally:
            with contextlib.suppress(StateUnavailable):
                await asyncio.shield(self.flush(state))


def render(counters: Mapping[str, int], gauges: Mapping[str, int], info: Mapping[str, str]) -> str:
    """Prometheus text exposition format 0.0.4."""
    by_name: dict[str, list[tuple[str, int]]] = {name: [] for name in COUNTERS}
    for key, value in counters.items():
        name = key.split("{", 1)[0]
        if name in by_name:
            by_name[name].append((key, value))
    lines: list[str] = []
    for name, help_text in COUNTERS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        samples = sorted(by_name[name]) or [(name, 0)]
        lines += [f"{key} {value}" for key, value in samples]
    for name, help_text in GAUGES.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines.append(f"{name} {gauges.get(name, 0)}")
    lines += [
        "# HELP attachgate_info The running version.",
        "# TYPE attachgate_info gauge",
        f"{sample_key('attachgate_info', info)} 1",
    ]
    return "\n".join(lines) + "\n"


def build_metrics_app(
    state: StateStore,
    metrics: Metrics,
    *,
    version: str,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """``GET /metrics`` only; meant for a listener that only the scraper reaches."""

    async def scrape(request: web.Request) -> web.Response:
        try:
            await asyncio.shield(metrics.flush(state))
            totals = await state.counters()
            accounts = await state.list_account_states()
            bans = await state.list_bans(clock())
        except StateUnavailable as exc:
            log.warning("metrics scrape failed: %s", exc)
            return web.Response(status=503, text="state store unavailable\n")
        gauges = {
            "attachgate_frozen_accounts": sum(1 for a in accounts if a.frozen),
            "attachgate_banned_addresses": len(bans),
        }
        body = render(totals, gauges, {"version": version})
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app
