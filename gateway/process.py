"""What happens to a message between DATA and the next hop: attachments out
(for accounts with linking on), links in, then the DKIM signature.

Order matters: blobs and link records are durable before the rewritten
message exists; the signature covers exactly the bytes that leave. Heavy work
(MIME scanning, rendering, signing) runs in an executor.

Refusals chosen by policy are raised as ``gateway.handler.MessageRefused``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway import logs
from gateway.config import PolicySettings
from gateway.dkim import DuplicateHeaderError, Signer
from gateway.handler import MessageRefused, Processed, TxInfo
from gateway.mime.downgrade import DowngradeError, to_7bit
from gateway.mime.rewrite import (
    Extraction,
    LinkingRules,
    LinkNotice,
    MimeError,
    MimeLimits,
    Passthrough,
    Templates,
    plan,
)
from gateway.protocol import normalize_line_endings
from gateway.replies import R550_UNPARSABLE, R554_NEEDS_8BITMIME, policy_reply
from storage.interfaces import BlobStore, LinkRecord, StateStore
from web.links import LinkSigner, new_link_id
from web.metrics import Metrics

log = logging.getLogger("attachgate.process")
T = TypeVar("T")
# MIME work on a message up to this size runs on the event loop (a few
# milliseconds): handing it to a thread costs more than it saves, since the
# base64 decoder holds the interpreter lock anyway. Larger messages go to the
# executor so that other sessions are not held up.
INLINE_MIME_LIMIT = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LinkingContext:
    blobs: BlobStore
    state: StateStore
    signer: LinkSigner
    public_url: str
    expire_after: float
    limits: MimeLimits
    templates: Templates


class MessageProcessor:
    """Implements ``gateway.handler.Processor``."""

    def __init__(
        self,
        *,
        policy: PolicySettings,
        linking: LinkingContext | None,
        dkim: Signer | None,
        executor: Executor | None = None,
        clock: Callable[[], float],
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._policy = policy
        self._linking = linking
        self._dkim = dkim
        self._executor = executor
        self._clock = clock

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _mime(self, fn: Callable[..., T], *args: Any, size: int | None = None) -> T:
        """MIME work: inline for small messages, in the executor for large ones."""
        if size is None:
            size = len(args[0])
        if size <= INLINE_MIME_LIMIT:
            return fn(*args)
        return await self._run(fn, *args)

    async def process(self, tx: TxInfo, content: bytes) -> Processed:
        link_ids: list[str] = []
        linked_bytes = 0
        account = tx.account
        if self._linking is not None and account is not None and account.linking.enabled:
            try:
                content, link_ids, linked_bytes = await self._link(tx, content)
            except MimeError as exc:
                self._metrics.inc("attachgate_rewrite_failures_total")
                logs.event(
                    log, "rewrite-failed", logging.WARNING, session=tx.session_id, error=str(exc)
                )
                if self._policy.on_rewrite_error == "refuse":
                    raise MessageRefused(R550_UNPARSABLE, str(exc)) from exc
        if tx.seven_bit and not content.isascii():
            try:
                content = normalize_line_endings(await self._mime(to_7bit, content))
            except DowngradeError as exc:
                await self.discard(Processed(content, link_ids))
                raise MessageRefused(
                    R554_NEEDS_8BITMIME, f"cannot convert to 7 bit: {exc}"
                ) from exc
        signed = False
        if self._dkim is not None:
            try:
                unsigned = content
                content = await self._run(self._dkim.sign, content)
                # The signer hands back the same object when the author's domain has no key.
                signed = content is not unsigned
            except DuplicateHeaderError as exc:
                self._metrics.inc("attachgate_refusals_total", case="duplicate_headers")
                await self.discard(Processed(content, link_ids))
                reply = policy_reply(
                    "duplicate_headers", self._policy.mode, self._policy.duplicate_headers
                )
                raise MessageRefused(reply, str(exc)) from exc
            except BaseException:
                await self.discard(Processed(content, link_ids))
                raise
        return Processed(
            content=content,
            link_ids=link_ids,
            linked_bytes=linked_bytes,
            signed=signed,
        )

    async def _link(self, tx: TxInfo, content: bytes) -> tuple[bytes, list[str], int]:
        """The rewritten message, its link ids and the bytes taken out."""
        ctx = self._linking
        account = tx.account
        assert ctx is not None and account is not None
        rules = LinkingRules(
            min_size=account.linking.min_size,
            allow_types=account.linking.allow_types,
            deny_types=account.linking.deny_types,
            nested=account.linking.nested,
        )
        found = await self._mime(plan, content, rules, ctx.limits)
        if isinstance(found, Passthrough):
            reason = found.reason.split(":", 1)[0]
            self._metrics.inc("attachgate_linking_passed_total", reason=reason)
            if found.reason.startswith(("unparsable", "limits")):
                logs.event(log, "rewrite-skipped", session=tx.session_id, reason=found.reason)
            return content, [], 0
        assert isinstance(found, Extraction)
        now = self._clock()
        expires = now + ctx.expire_after
        message_id = tx.session_id
        records: list[LinkRecord] = []
        notices: list[LinkNotice] = []
        for att in found.attachments:
            info = await ctx.blobs.put(att.data)
            link_id = new_link_id()
            records.append(
                LinkRecord(
                    link_id=link_id,
                    blob_digest=info.digest,
                    filename=att.filename or att.safe_filename,
                    content_type=att.content_type,
                    size=info.size,
                    sender=account.address,
                    message_id=message_id,
                    created=now,
                    expires=expires,
                )
            )
            notices.append(
                LinkNotice(
                    filename=att.safe_filename,
                    size=info.size,
                    url=f"{ctx.public_url}/d/{ctx.signer.sign(link_id)}",
                    expires=dt.datetime.fromtimestamp(expires, dt.UTC),
                )
            )
        await ctx.state.add_links(records)
        ids = [r.link_id for r in records]
        try:
            rendered = await self._mime(found.render, notices, ctx.templates, size=len(content))
            # Notice templates are the administrator's text: whatever line ends
            # they carry, what leaves has CRLF only.
            rendered = normalize_line_endings(rendered)
        except BaseException:
            await ctx.state.delete_links(ids)
            raise
        logs.event(
            log,
            "linked",
            session=tx.session_id,
            account=account.address,
            files=len(records),
            bytes=sum(r.size for r in records),
        )
        return rendered, ids, sum(r.size for r in records)

    async def discard(self, processed: Processed) -> None:
        if processed.link_ids and self._linking is not None:
            await self._linking.state.delete_links(processed.link_ids)
