"""Signed download-link tokens.

A token carries one link id, the time it was signed and an HMAC-SHA256
signature made with itsdangerous. The first key of the key list signs; every
key in the list verifies, so keys can be rotated without breaking links that
are already in people's mailboxes. Each purpose uses its own salt, so a token
made for one purpose (downloads) is worthless for another (unfreeze links).

Time comes from a ``clock`` callable, never from the system directly, so
tests freeze and advance time instead of sleeping.

Exception tree::

    LinkError
     ├── BadToken        (forged, malformed, other salt, retired key)
     └── ExpiredToken    (a genuine token older than ``max_age``)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

__all__ = ["BadToken", "ExpiredToken", "LinkError", "LinkSigner", "new_link_id"]

# Tokens are URL-safe base64 pieces joined by dots; anything else is rejected
# before any decoding is attempted, and so is anything absurdly long.
# itsdangerous marks a compressed payload with a leading ".".
_TOKEN_RE = re.compile(r"\.?[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+){2}")
MAX_TOKEN_LENGTH = 512


class LinkError(Exception):
    """Root of every error raised while checking a link token."""


class BadToken(LinkError):
    """The token is not one we signed (or not with a key we still accept)."""


class ExpiredToken(LinkError):
    """The token is genuine but older than the allowed age."""


class _ClockSigner(TimestampSigner):
    """A timestamp signer that asks an injected clock for the time."""

    def __init__(self, *args: Any, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class LinkSigner:
    """Signs link ids into URL-safe tokens and checks them again."""

    SALT = "attachgate.download-link.v1"
    # Tokens signed by another host whose clock runs a little ahead are
    # accepted; a timestamp further in the future than this is not ours.
    CLOCK_SKEW = 300.0

    def __init__(
        self,
        secret_keys: Sequence[str],
        max_age: float,
        *,
        clock: Callable[[], float] = time.time,
        salt: str = SALT,
    ) -> None:
        keys = list(secret_keys)
        if not keys or any(not key for key in keys):
            raise ValueError("secret_keys must hold at least one non-empty key")
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        if not salt:
            raise ValueError("salt must not be empty")
        self._max_age = max_age
        self._clock = clock
        # itsdangerous signs with the *last* key of its list and verifies with
        # all of them; our contract is "the first signs", hence the reversal.
        self._serializer = URLSafeTimedSerializer(
            list(reversed(keys)),
            salt=salt,
            signer=_ClockSigner,
            signer_kwargs={"clock": clock, "digest_method": hashlib.sha256},
        )

    @property
    def max_age(self) -> float:
        return self._max_age

    def sign(self, link_id: str) -> str:
        """A token for ``link_id``, stamped with the clock's current time."""
        if not link_id:
            raise ValueError("link_id must not be empty")
        token = self._serializer.dumps(link_id)
        assert isinstance(token, str)
        return token

    def verify(self, token: str) -> str:
        """The link id inside ``token``.

        Raises ExpiredToken when the token is genuine but older than
        ``max_age``; BadToken for anything else that is not a valid token.
        """
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
            raise BadToken("malformed token")
        try:
            payload, signed_at = self._serializer.loads(token, return_timestamp=True)
        except BadSignature as exc:
            raise BadToken("invalid token") from exc
        if not isinstance(payload, str) or not payload or not isinstance(signed_at, datetime):
            raise BadToken("invalid token payload")
        # The age check is done here rather than inside itsdangerous so that
        # a small clock skew between hosts is tolerated instead of being
        # reported as expiry.
        age = self._clock() - signed_at.timestamp()
        if age > self._max_age:
            raise ExpiredToken(f"token is {age:.0f} s old, the limit is {self._max_age:.0f} s")
        if age < -self.CLOCK_SKEW:
            raise BadToken("token signed in the future")
        return payload


def new_link_id() -> str:
    """A fresh, unguessable link id (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)
