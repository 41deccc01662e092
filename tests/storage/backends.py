"""The backends the contract suites run against, opened from a spec string.

A spec names a backend and where its data lives (``sqlite:/path/state.db``,
``redis:redis://127.0.0.1:6379/0#prefix:``);
the same string reaches worker processes, so a multi-process test runs
against every backend the suite knows. A new backend is one more branch here
and one more parameter in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

from storage.interfaces import StateStore
from storage.redis import RedisStateStore
from storage.sqlite import SqliteStateStore


async def open_state_store(spec: str) -> StateStore:
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        return await SqliteStateStore.open(Path(where))
    if kind == "redis":
        url, _, prefix = where.partition("#")
        return await RedisStateStore.open(url, prefix=prefix)
    raise ValueError(f"unknown state backend in spec {spec!r}")
