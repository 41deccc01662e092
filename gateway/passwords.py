"""Password hashing and checking (argon2id), always off the event loop.

An unknown login is checked against a fixed dummy hash, so that unknown user
and wrong password cost the same time and get the same answer.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()
_DUMMY = _HASHER.hash("attachgate-dummy-password-for-timing")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def _verify(stored: str | None, password: bytes) -> bool:
    try:
        _HASHER.verify(stored or _DUMMY, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return stored is not None


class PasswordChecker:
    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor

    async def verify(self, stored: str | None, password: bytes) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _verify, stored, password)
