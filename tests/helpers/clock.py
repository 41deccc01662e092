"""A controllable clock: tests move time instead of sleeping."""

from __future__ import annotations

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC, the fake clock's start


class FakeClock:
    """A clock that stands still until a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
