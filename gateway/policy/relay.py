"""Who may relay, and which sender addresses a client may use.

Pure decisions: no I/O, no aiosmtpd. Run-time state (frozen accounts, quota
use) is looked up by the caller and handed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.addresses import Address
from gateway.config import Network, PolicySettings
from gateway.policy.accounts import Account, Directory, IPAddress, in_networks
from gateway.replies import Reply, policy_reply


@dataclass(frozen=True, slots=True)
class Client:
    ip: IPAddress
    login: str | None  # the authenticated account key, if any
    tls: bool


@dataclass(frozen=True, slots=True)
class SenderOK:
    """The sender may be used. ``account`` carries the per-account features
    (linking, hijack limits); None for relayed foreign or null senders."""

    account: Account | None


@dataclass(frozen=True, slots=True)
class Refused:
    reply: Reply
    case: str  # a short event name for the log


def is_trusted(ip: IPAddress, trusted_networks: list[Network]) -> bool:
    return in_networks(ip, trusted_networks)


def may_relay(client: Client, trusted_networks: list[Network]) -> bool:
    """No open relay, ever: authenticated, or from a trusted network."""
    return client.login is not None or is_trusted(client.ip, trusted_networks)


def _policy(policy: PolicySettings, case: str) -> Refused:
    override: str | None = getattr(policy, case)
    return Refused(policy_reply(case, policy.mode, override), case)


def check_sender(
    client: Client,
    sender: Address | None,
    directory: Directory,
    policy: PolicySettings,
    trusted_networks: list[Network],
) -> SenderOK | Refused:
    """Decide on MAIL FROM, before any run-time state is consulted.

    - authenticated: the sender must be the login's own address or in its
      ``send_as`` list; the login's account carries the features;
    - trusted network: a sender in a local domain must be a known, enabled
      account; a foreign sender (forwards, list expansions) and the null
      sender are relayed without per-account features;
    - the domain's IP shield applies to every sender in a local domain.
    """
    if client.login is not None:
        account = directory.account(client.login)
        if account is None:
            # The login was verified against the directory; it vanished only
            # if the configuration changed under a live session.
            return _policy(policy, "unknown_account")
        if sender is None or sender.key not in account.send_as:
            return _policy(policy, "sender_not_allowed")
        return _usable(account, sender, client, directory, policy)

    if not is_trusted(client.ip, trusted_networks):
        # Strangers may start a transaction; RCPT decides (control address only).
        return SenderOK(None)
    if sender is None or not directory.is_local_domain(sender.domain):
        return SenderOK(None)
    account = directory.account_for_sender(sender.key)
    if account is None and not directory.is_admin(sender.key):
        return _policy(policy, "unknown_account")
    return _usable(account, sender, client, directory, policy)


def _usable(
    account: Account | None,
    sender: Address,
    client: Client,
    directory: Directory,
    policy: PolicySettings,
) -> SenderOK | Refused:
    """The checks every sender in a local domain passes: the account is
    enabled (an administrator's address may have none) and the domain's IP
    shield lets the client in."""
    if account is not None and account.disabled:
        return _policy(policy, "disabled_account")
    if not directory.shield_allows(sender.domain, client.ip):
        return _policy(policy, "ip_shield")
    return SenderOK(account)
