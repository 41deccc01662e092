"""A worker process for the multi-process counter test.

Usage: ``python -m tests.storage.counter_worker SPEC KEY N``. It opens the
state store, prints ``ready``, waits for one line on stdin (the start signal,
so that every worker begins at once), calls ``add_and_count(KEY, 1, …)`` N
times and prints the totals it saw as one JSON list.
"""

from __future__ import annotations

import asyncio
import json
import sys

from tests.storage.backends import open_state_store

NOW = 1_000_000.0
WINDOWS = (3600.0,)


async def run(spec: str, key: str, n: int) -> list[int]:
    store = await open_state_store(spec)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        totals = []
        for _ in range(n):
            (total,) = await store.add_and_count(key, 1, NOW, WINDOWS)
            totals.append(total)
        return totals
    finally:
        await store.close()


def main() -> None:
    spec, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    totals = asyncio.run(run(spec, key, n))
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
