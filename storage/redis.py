"""State store on a Redis server, shared by gateways on several hosts.

Every operation that reads and then writes runs as one Lua script, which
Redis executes atomically, so sliding windows, first-freezer-wins and
claim-once hold across any number of processes and hosts. All keys start
with a prefix (``attachgate:`` by default) so that several installations can
share a server.

Data layout (``P`` is the prefix)::

    P link:<id>        hash: one link record
    P msg:<message id> set of link ids of a message
    P blob:<digest>    set of unrevoked link ids that use the blob
    P expiry           sorted set: link id scored by its expiry
    P revoked          set of revoked link ids still stored
    P usage            hash: account -> bytes of its unrevoked records
    P win:<key>        sorted set: "<seq>:<amount>" scored by event time
    P wsum:<key>       hash: window span -> "<total> <edge>", the running sum of
                       the events scored after the edge (see add_and_count)
    P windows          sorted set: window key -> when all its events are out of
                       every window (gc removes such keys)
    P counters         hash: metrics sample -> value
    P seq              counter that keeps window members unique
    P acct:<account>   hash: account flags; P accounts is the set of them
    P ban:<ip>         hash: one ban; P bans is a sorted set ip -> until
    P claims           sorted set: claim key -> until
    P notes            list of notifications as JSON, newest first

The semantics match the SQLite backend: ``account_usage`` sums ``size`` over
the account's unrevoked records until ``gc`` removes them (a file sent twice
counts twice); ``gc(now)`` removes records with ``expires <= now`` plus
expired bans and claims, keeps revoked records until they expire and returns
the digests of deleted and revoked records that no unrevoked record uses; an
event leaves a window ``w`` at exactly ``t + w``, and a window's total is kept
running (``wsum``), so that a call reads only the events that left since the
last one; ``recent_notifications`` lists the newest first (the log keeps the
latest 10,000).

Times are those of the caller's clock (scores and fields), never Redis key
expiry, which runs on the server's clock. Durability is the server's: link
records survive a crash of the server only with ``appendonly yes`` and
``appendfsync always``.

Errors (the root is :class:`storage.interfaces.StorageError`): any Redis or
connection error is raised as :class:`storage.interfaces.StateUnavailable`
with the original as ``__cause__``::

    StorageError
     └── StateUnavailable
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from storage.interfaces import (
    WINDOW_SLACK,
    AccountState,
    Ban,
    GcResult,
    LinkRecord,
    Notification,
    StateUnavailable,
)

T = TypeVar("T")

NOTES_KEPT = 10_000

_ADD_LINKS = """
local p = ARGV[1]
local records = cjson.decode(ARGV[2])
for _, r in ipairs(records) do
  if redis.call('EXISTS', p .. 'link:' .. r.link_id) == 1 then
    return redis.error_reply('duplicate link id ' .. r.link_id)
  end
end
for _, r in ipairs(records) do
  local key = p .. 'link:' .. r.link_id
  redis.call('HSET', key, 'blob_digest', r.blob_digest, 'filename', r.filename,
    'content_type', r.content_type, 'size', r.size, 'sender', r.sender,
    'message_id', r.message_id, 'created', r.created, 'expires', r.expires,
    'revoked', r.revoked, 'download_count', r.download_count,
    'last_download', r.last_download)
  redis.call('SADD', p .. 'msg:' .. r.message_id, r.link_id)
  redis.call('ZADD', p .. 'expiry', r.expires, r.link_id)
  if r.revoked == '1' then
    redis.call('SADD', p .. 'revoked', r.link_id)
  else
    redis.call('SADD', p .. 'blob:' .. r.blob_digest, r.link_id)
    redis.call('HINCRBY', p .. 'usage', r.sender, r.size)
  end
end
return #records
"""

# Shared by delete and gc: remove one link record and everything pointing at it.
_REMOVE_FN = """
local function remove(p, id)
  local key = p .. 'link:' .. id
  local f = redis.call('HMGET', key, 'blob_digest', 'size', 'sender', 'message_id', 'revoked')
  if not f[1] then return nil end
  if f[5] == '0' then
    redis.call('HINCRBY', p .. 'usage', f[3], -tonumber(f[2]))
    redis.call('SREM', p .. 'blob:' .. f[1], id)
  end
  redis.call('SREM', p .. 'revoked', id)
  redis.call('SREM', p .. 'msg:' .. f[4], id)
  redis.call('ZREM', p .. 'expiry', id)
  redis.call('DEL', key)
  return f[1]
end
"""

_DELETE_LINKS = (
    _REMOVE_FN
    + """
local p = ARGV[1]
for i = 2, #ARGV do remove(p, ARGV[i]) end
return 0
"""
)

_GC = (
    _REMOVE_FN
    + """
local p, now = ARGV[1], ARGV[2]
local candidates = {}
local expired = redis.call('ZRANGEBYSCORE', p .. 'expiry', '-inf', now)
for _, id in ipairs(expired) do
  local digest = remove(p, id)
  if digest then candidates[digest] = true end
end
for _, id in ipairs(redis.call('SMEMBERS', p .. 'revoked')) do
  local digest = redis.call('HGET', p .. 'link:' .. id, 'blob_digest')
  if digest then candidates[digest] = true end
end
for _, ip in ipairs(redis.call('ZRANGEBYSCORE', p .. 'bans', '-inf', now)) do
  redis.call('DEL', p .. 'ban:' .. ip)
end
redis.call('ZREMRANGEBYSCORE', p .. 'bans', '-inf', now)
redis.call('ZREMRANGEBYSCORE', p .. 'claims', '-inf', now)
for _, key in ipairs(redis.call('ZRANGEBYSCORE', p .. 'windows', '-inf', now)) do
  redis.call('DEL', p .. 'win:' .. key, p .. 'wsum:' .. key)
end
redis.call('ZREMRANGEBYSCORE', p .. 'windows', '-inf', now)
local orphans = {}
for digest, _ in pairs(candidates) do
  if redis.call('SCARD', p .. 'blob:' .. digest) == 0 then
    table.insert(orphans, digest)
  end
end
return {#expired, orphans}
"""
)

_REVOKE = """
local p, id = ARGV[1], ARGV[2]
local key = p .. 'link:' .. id
local f = redis.call('HMGET', key, 'blob_digest', 'size', 'sender', 'revoked')
if not f[1] then return 0 end
if f[4] == '0' then
  redis.call('HSET', key, 'revoked', '1')
  redis.call('SREM', p .. 'blob:' .. f[1], id)
  redis.call('SADD', p .. 'revoked', id)
  redis.call('HINCRBY', p .. 'usage', f[3], -tonumber(f[2]))
end
return 1
"""

_RECORD_DOWNLOAD = """
local key = ARGV[1] .. 'link:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HINCRBY', key, 'download_count', 1)
redis.call('HSET', key, 'last_download', ARGV[3])
return 1
"""

_RECALC = """
local p, now = ARGV[1], ARGV[2]
local totals = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'expiry', '(' .. now, '+inf')) do
  local f = redis.call('HMGET', p .. 'link:' .. id, 'size', 'sender', 'revoked')
  if f[1] and f[3] == '0' then
    totals[f[2]] = (totals[f[2]] or 0) + tonumber(f[1])
  end
end
redis.call('DEL', p .. 'usage')
local flat = {}
for account, bytes in pairs(totals) do
  redis.call('HSET', p .. 'usage', account, bytes)
  table.insert(flat, account)
  table.insert(flat, tostring(bytes))
end
return flat
"""

_ADD_AND_COUNT = """
local p, key, amount, now, oldest = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local zkey = p .. 'win:' .. key
local skey = p .. 'wsum:' .. key
-- when every event of the key will be out of every window, unless more come
redis.call('ZADD', p .. 'windows', ARGV[6], key)
local seq = redis.call('INCR', p .. 'seq')
redis.call('ZADD', zkey, now, seq .. ':' .. ARGV[3])
-- the sum of the amounts scored in (low, high]
local function between(low, high)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', zkey, '(' .. low, high)) do
    total = total + tonumber(string.match(m, ':(-?%d+)$'))
  end
  return total
end
local t = tonumber(now)
local asked, totals = {}, {}
for i = 7, #ARGV, 2 do
  local span, edge = ARGV[i], ARGV[i + 1]
  local saved = redis.call('HGET', skey, span)
  local total
  if saved then
    local kept, old = string.match(saved, '^(-?%d+) (.+)$')
    total = tonumber(kept)
    if t > tonumber(old) then total = total + amount end
    if tonumber(edge) > tonumber(old) then
      total = total - between(old, edge)
    elseif tonumber(edge) < tonumber(old) then
      total = total + between(edge, old)
    end
  else
    total = between(edge, '+inf')
  end
  redis.call('HSET', skey, span, string.format('%d', total) .. ' ' .. edge)
  asked[span] = true
  table.insert(totals, total)
end
for _, span in ipairs(redis.call('HKEYS', skey)) do
  if not asked[span] then redis.call('HDEL', skey, span) end
end
redis.call('ZREMRANGEBYSCORE', zkey, '-inf', oldest)
return totals
"""

_ADD_COUNTERS = """
local key = ARGV[1] .. 'counters'
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
end
"""

_FREEZE = """
local key = ARGV[1] .. 'acct:' .. ARGV[2]
if redis.call('HGET', key, 'frozen') == '1' then return 0 end
redis.call('HSET', key, 'frozen', '1', 'frozen_reason', ARGV[3], 'frozen_at', ARGV[4])
redis.call('SADD', ARGV[1] .. 'accounts', ARGV[2])
return 1
"""

_UNFREEZE = """
local key = ARGV[1] .. 'acct:' .. ARGV[2]
if redis.call('HGET', key, 'frozen') ~= '1' then return 0 end
redis.call('HSET', key, 'frozen', '0', 'frozen_reason', '')
redis.call('HDEL', key, 'frozen_at')
return 1
"""

_SET_DISABLED = """
local key = ARGV[1] .. 'acct:' .. ARGV[2]
local now = redis.call('HGET', key, 'disabled') or '0'
if now == ARGV[3] then return 0 end
redis.call('HSET', key, 'disabled', ARGV[3])
redis.call('SADD', ARGV[1] .. 'accounts', ARGV[2])
return 1
"""

_BAN = """
local p, ip = ARGV[1], ARGV[2]
redis.call('HSET', p .. 'ban:' .. ip, 'until', ARGV[3], 'reason', ARGV[4], 'created', ARGV[5])
redis.call('ZADD', p .. 'bans', ARGV[3], ip)
return 1
"""

_LIFT_BAN = """
local p, ip = ARGV[1], ARGV[2]
redis.call('DEL', p .. 'ban:' .. ip)
return redis.call('ZREM', p .. 'bans', ip)
"""

_CLAIM_ONCE = """
local zkey, key, expires, now = ARGV[1] .. 'claims', ARGV[2], ARGV[3], tonumber(ARGV[4])
local held = redis.call('ZSCORE', zkey, key)
if held and tonumber(held) > now then return 0 end
redis.call('ZADD', zkey, expires, key)
return 1
"""

_LOG_NOTE = """
redis.call('LPUSH', ARGV[1] .. 'notes', ARGV[2])
redis.call('LTRIM', ARGV[1] .. 'notes', 0, tonumber(ARGV[3]) - 1)
return 1
"""


def _num(value: float) -> str:
    """A float as Redis and Lua read it back exactly."""
    return repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _link_from_hash(link_id: str, raw: dict[Any, Any]) -> LinkRecord:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return LinkRecord(
        link_id=link_id,
        blob_digest=f["blob_digest"],
        filename=f["filename"],
        content_type=f["content_type"],
        size=int(f["size"]),
        sender=f["sender"],
        message_id=f["message_id"],
        created=float(f["created"]),
        expires=float(f["expires"]),
        revoked=f["revoked"] == "1",
        download_count=int(f["download_count"]),
        last_download=float(f["last_download"]) if f["last_download"] else None,
    )


def _account_from_hash(account: str, raw: dict[Any, Any]) -> AccountState:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return AccountState(
        account=account,
        frozen=f.get("frozen") == "1",
        frozen_reason=f.get("frozen_reason", ""),
        frozen_at=float(f["frozen_at"]) if f.get("frozen_at") else None,
        disabled=f.get("disabled") == "1",
    )


class RedisStateStore:
    """A :class:`storage.interfaces.StateStore` on a Redis server."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        """Use :meth:`open`."""
        self._r = client
        self._p = prefix
        self._closed = False
        self._scripts: dict[str, Any] = {}

    @classmethod
    async def open(
        cls, url: str, *, prefix: str = "attachgate:", socket_timeout: float = 5.0
    ) -> RedisStateStore:
        client = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        store = cls(client, prefix)
        try:
            await store._run(client.ping)
        except BaseException:
            await client.aclose()
            raise
        return store

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StateUnavailable("state store is closed")
        try:
            return await call()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc

    async def _hgetall(self, key: str) -> dict[Any, Any]:
        raw: dict[Any, Any] = await self._run(lambda: self._r.hgetall(key))
        return raw

    async def _script(self, source: str, *args: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._r.register_script(source)
            self._scripts[source] = script
        return await self._run(lambda: script(args=[self._p, *args]))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._r.aclose()

    # --- link records ------------------------------------------------------
    async def add_links(self, records: Sequence[LinkRecord]) -> None:
        if not records:
            return
        payload = [
            {
                "link_id": r.link_id,
                "blob_digest": r.blob_digest,
                "filename": r.filename,
                "content_type": r.content_type,
                "size": str(r.size),
                "sender": r.sender,
                "message_id": r.message_id,
                "created": _num(r.created),
                "expires": _num(r.expires),
                "revoked": "1" if r.revoked else "0",
                "download_count": str(r.download_count),
                "last_download": "" if r.last_download is None else _num(r.last_download),
            }
            for r in records
        ]
        await self._script(_ADD_LINKS, json.dumps(payload))

    async def get_link(self, link_id: str) -> LinkRecord | None:
        raw = await self._hgetall(f"{self._p}link:{link_id}")
        return _link_from_hash(link_id, raw) if raw else None

    async def delete_links(self, link_ids: Sequence[str]) -> None:
        if link_ids:
            await self._script(_DELETE_LINKS, *link_ids)

    async def revoke_link(self, link_id: str) -> bool:
        return bool(await self._script(_REVOKE, link_id))

    async def record_download(self, link_id: str, now: float) -> None:
        await self._script(_RECORD_DOWNLOAD, link_id, _num(now))

    async def links_for_message(self, message_id: str) -> list[LinkRecord]:
        ids = await self._run(lambda: self._r.smembers(f"{self._p}msg:{message_id}"))
        found: list[LinkRecord] = []
        for raw_id in ids:
            record = await self.get_link(_text(raw_id))
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: (r.created, r.link_id))

    async def gc(self, now: float) -> GcResult:
        expired, orphans = await self._script(_GC, _num(now))
        return GcResult(
            expired_records=int(expired), orphan_digests=sorted(_text(d) for d in orphans)
        )

    async def referenced(self, digest: str) -> bool:
        count = await self._run(lambda: self._r.scard(f"{self._p}blob:{digest}"))
        return int(count) > 0

    async def account_usage(self, account: str) -> int:
        value = await self._run(lambda: self._r.hget(f"{self._p}usage", account))
        return 0 if value is None else max(0, int(value))

    async def recalc_usage(self, now: float) -> dict[str, int]:
        flat = await self._script(_RECALC, _num(now))
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return {_text(account): int(_text(total)) for account, total in sorted(pairs)}

    # --- sliding windows ---------------------------------------------------
    async def add_and_count(
        self, key: str, amount: int, now: float, windows: Sequence[float]
    ) -> list[int]:
        spans = [float(w) for w in windows]
        if not spans or min(spans) <= 0:
            raise ValueError("add_and_count needs at least one positive window")
        unique = sorted(set(spans))
        edges = [arg for span in unique for arg in (_num(span), _num(now - span))]
        oldest = _num(now - unique[-1] - WINDOW_SLACK)
        idle = _num(now + unique[-1] + WINDOW_SLACK)
        totals = await self._script(
            _ADD_AND_COUNT, key, str(int(amount)), _num(now), oldest, idle, *edges
        )
        by_span = dict(zip(unique, (int(t) for t in totals), strict=True))
        return [by_span[span] for span in spans]

    async def count(self, key: str, now: float, window: float) -> int:
        members = await self._run(
            lambda: self._r.zrangebyscore(f"{self._p}win:{key}", f"({_num(now - window)}", "+inf")
        )
        return sum(int(_text(m).rsplit(":", 1)[1]) for m in members)

    async def reset_counter(self, key: str) -> None:
        await self._run(lambda: self._r.delete(f"{self._p}win:{key}", f"{self._p}wsum:{key}"))

    # --- metrics ---------------------------------------------------------------
    async def add_counters(self, deltas: Mapping[str, int]) -> None:
        if deltas:
            args = [str(x) for item in deltas.items() for x in item]
            await self._script(_ADD_COUNTERS, *args)

    async def counters(self) -> dict[str, int]:
        raw = await self._hgetall(f"{self._p}counters")
        return {_text(k): int(_text(v)) for k, v in raw.items()}

    # --- account flags -------------------------------------------------------
    async def get_account_state(self, account: str) -> AccountState:
        raw = await self._hgetall(f"{self._p}acct:{account}")
        return _account_from_hash(account, raw)

    async def freeze(self, account: str, reason: str, now: float) -> bool:
        return bool(await self._script(_FREEZE, account, reason, _num(now)))

    async def unfreeze(self, account: str) -> bool:
        return bool(await self._script(_UNFREEZE, account))

    async def set_disabled(self, account: str, disabled: bool) -> bool:
        """Disable or enable an account at runtime; True when this changed it."""
        return bool(await self._script(_SET_DISABLED, account, "1" if disabled else "0"))

    async def list_account_states(self) -> list[AccountState]:
        accounts = await self._run(lambda: self._r.smembers(f"{self._p}accounts"))
        states = [await self.get_account_state(_text(a)) for a in accounts]
        return sorted((s for s in states if s.frozen or s.disabled), key=lambda s: s.account)

    # --- bans ----------------------------------------------------------------
    async def ban(self, ip: str, until: float, reason: str, now: float) -> None:
        await self._script(_BAN, ip, _num(until), reason, _num(now))

    async def lift_ban(self, ip: str) -> bool:
        return bool(await self._script(_LIFT_BAN, ip))

    async def is_banned(self, ip: str, now: float) -> bool:
        until = await self._run(lambda: self._r.zscore(f"{self._p}bans", ip))
        return until is not None and float(until) > now

    async def list_bans(self, now: float) -> list[Ban]:
        ips = await self._run(
            lambda: self._r.zrangebyscore(f"{self._p}bans", f"({_num(now)}", "+inf")
        )
        bans: list[Ban] = []
        for raw_ip in sorted(_text(i) for i in ips):
            raw = await self._hgetall(f"{self._p}ban:{raw_ip}")
            f = {_text(k): _text(v) for k, v in raw.items()}
            if f:
                bans.append(
                    Ban(
                        ip=raw_ip,
                        until=float(f["until"]),
                        reason=f["reason"],
                        created=float(f["created"]),
                    )
                )
        return bans

    # --- notifications and tokens ----------------------------------------------
    async def claim_once(self, key: str, until: float, now: float) -> bool:
        return bool(await self._script(_CLAIM_ONCE, key, _num(until), _num(now)))

    async def log_notification(self, note: Notification) -> None:
        payload = json.dumps(
            {
                "kind": note.kind,
                "subject": note.subject,
                "recipient": note.recipient,
                "sent_at": note.sent_at,
                "details": note.details,
            }
        )
        await self._script(_LOG_NOTE, payload, str(NOTES_KEPT))

    async def recent_notifications(self, limit: int) -> list[Notification]:
        if limit <= 0:
            return []
        raw = await self._run(lambda: self._r.lrange(f"{self._p}notes", 0, limit - 1))
        notes: list[Notification] = []
        for item in raw:
            d = json.loads(_text(item))
            notes.append(
                Notification(
                    kind=d["kind"],
                    subject=d["subject"],
                    recipient=d["recipient"],
                    sent_at=float(d["sent_at"]),
                    details={str(k): str(v) for k, v in d["details"].items()},
                )
            )
        return notes
