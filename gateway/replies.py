"""Named SMTP replies, each with its basic code and RFC 3463 enhanced code.

Policy refusals come in pairs (temporary and permanent); the reject policy
(``[policy]``) picks one per case, see :func:`policy_reply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def is_well_formed(reply: Reply) -> bool:
    """Code class and enhanced class agree; the text is one printable line."""
    if not 200 <= reply.code < 600 or not _ENHANCED.match(reply.enhanced):
        return False
    if str(reply.code)[0] != reply.enhanced[0]:
        return False
    return bool(reply.text) and all(0x20 <= ord(c) < 0x7F for c in reply.text)


R221_BYE = Reply(221, "2.0.0", "Bye")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_QUEUED = Reply(250, "2.0.0", "Message accepted for delivery")
R250_CONTROL = Reply(250, "2.0.0", "Control message processed")
R421_BANNED = Reply(421, "4.7.0", "Too many failed logins from your address; try again later")
R421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address")
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
R421_LOCAL_PROBLEM = Reply(421, "4.3.0", "Temporary local problem, try again later")
R451_INTERNAL = Reply(451, "4.3.0", "Temporary local problem, try again later")
R451_NEXT_HOP_UNAVAILABLE = Reply(451, "4.4.1", "Next hop unreachable, try again later")
R451_NEXT_HOP_TIMEOUT = Reply(451, "4.4.2", "Next hop timed out, try again later")
R452_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
R503_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R550_NUL = Reply(550, "5.6.0", "Message contains NUL characters")
R552_TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
R553_BAD_ADDRESS = Reply(553, "5.1.3", "Invalid address")
R553_SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not allowed for this login")
R554_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
R554_NEEDS_8BITMIME = Reply(
    554, "5.6.3", "8-bit message, but the next hop does not accept 8BITMIME"
)
R554_NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
R550_ROUTED_ADDRESS = Reply(553, "5.1.3", "Source routes are not accepted")
R550_DUPLICATE_HEADERS = Reply(
    550, "5.7.1", "Message has duplicate From, Subject, Date or Message-ID"
)
R451_DUPLICATE_HEADERS = Reply(
    451, "4.7.1", "Message has duplicate From, Subject, Date or Message-ID"
)
R550_UNPARSABLE = Reply(550, "5.6.0", "Message could not be processed")

# Policy cases: (temporary, permanent).
PolicyCase = Literal[
    "unknown_account",
    "disabled_account",
    "frozen_account",
    "over_quota",
    "ip_shield",
    "sender_not_allowed",
    "duplicate_headers",
]

POLICY_REPLIES: dict[str, tuple[Reply, Reply]] = {
    "unknown_account": (
        Reply(450, "4.1.0", "Sender account unknown"),
        Reply(550, "5.1.0", "Sender account unknown"),
    ),
    "disabled_account": (
        Reply(450, "4.7.1", "Sender account disabled"),
        Reply(550, "5.7.1", "Sender account disabled"),
    ),
    "frozen_account": (
        Reply(450, "4.7.1", "Sender account frozen: sending limit exceeded"),
        Reply(550, "5.7.1", "Sender account frozen: sending limit exceeded"),
    ),
    "over_quota": (
        Reply(452, "4.2.2", "Sender account over its storage quota"),
        Reply(552, "5.2.2", "Sender account over its storage quota"),
    ),
    "ip_shield": (
        Reply(450, "4.7.1", "Sender domain not allowed from your address"),
        Reply(550, "5.7.1", "Sender domain not allowed from your address"),
    ),
    "sender_not_allowed": (
        Reply(450, "4.7.1", "Sender address not allowed for this login"),
        R553_SENDER_NOT_OWNED,
    ),
    "duplicate_headers": (R451_DUPLICATE_HEADERS, R550_DUPLICATE_HEADERS),
}


def policy_reply(case: str, mode: str, override: str | None) -> Reply:
    """The reply for a policy case under ``mode`` ("trial" | "production") and
    an optional per-case override ("temporary" | "permanent")."""
    temporary, permanent = POLICY_REPLIES[case]
    if override == "temporary":
        return temporary
    if override == "permanent":
        return permanent
    return temporary if mode == "trial" else permanent
