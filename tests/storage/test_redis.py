"""What only the Redis state store promises: failures become StateUnavailable."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from storage.interfaces import LinkRecord, StateUnavailable
from storage.redis import RedisStateStore
from tests.helpers.gw import free_port
from tests.helpers.redis import start_redis, stop_redis

T0 = 1_000_000.0


def record(link_id: str, size: int = 10) -> LinkRecord:
    return LinkRecord(
        link_id=link_id,
        blob_digest="b" * 64,
        filename="f.pdf",
        content_type="application/pdf",
        size=size,
        sender="alice@example.com",
        message_id="<m@example.com>",
        created=T0,
        expires=T0 + 100,
    )


async def test_no_server_is_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(StateUnavailable) as caught:
        await RedisStateStore.open(url, socket_timeout=2)
    assert isinstance(caught.value.__cause__, RedisError | OSError)


async def test_a_server_that_goes_away_is_unavailable(tmp_path: Path) -> None:
    server, url = start_redis(tmp_path)
    try:
        store = await RedisStateStore.open(url, socket_timeout=2)
        assert await store.add_and_count("k", 1, T0, [60]) == [1]
    finally:
        stop_redis(server)
    try:
        with pytest.raises(StateUnavailable):
            await store.add_and_count("k", 1, T0, [60])
        with pytest.raises(StateUnavailable):
            await store.get_link("a")
    finally:
        await store.close()


async def test_a_failed_batch_adds_nothing(redis_url: str) -> None:
    store = await RedisStateStore.open(redis_url, prefix=f"t{uuid.uuid4().hex}:")
    try:
        await store.add_links([record("a")])
        with pytest.raises(StateUnavailable, match="duplicate link id a"):
            await store.add_links([record("b", 20), record("a", 30)])
        assert await store.get_link("b") is None
        assert await store.account_usage("alice@example.com") == 10
    finally:
        await store.close()


async def test_set_disabled(redis_url: str) -> None:
    store = await RedisStateStore.open(redis_url, prefix=f"t{uuid.uuid4().hex}:")
    try:
        assert not await store.set_disabled("alice@example.com", False)
        assert await store.set_disabled("alice@example.com", True)
        assert not await store.set_disabled("alice@example.com", True)
        state = await store.get_account_state("alice@example.com")
        assert state.disabled
        assert await store.list_account_states() == [state]
        assert await store.set_disabled("alice@example.com", False)
        assert await store.list_account_states() == []
    finally:
        await store.close()


async def test_prefixes_keep_installations_apart(redis_url: str) -> None:
    one = await RedisStateStore.open(redis_url, prefix=f"t{uuid.uuid4().hex}:")
    two = await RedisStateStore.open(redis_url, prefix=f"t{uuid.uuid4().hex}:")
    try:
        assert await one.freeze("alice@example.com", "x", T0)
        assert await two.freeze("alice@example.com", "x", T0)
        assert await one.add_and_count("k", 5, T0, [60]) == [5]
        assert await two.count("k", T0, 60) == 0
    finally:
        await one.close()
        await two.close()
