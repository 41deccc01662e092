"""The account directory: accounts and local domains from the configuration,
with effective per-account settings (account over domain over defaults)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.config import (
    AccountSettings,
    DomainSettings,
    HijackOverride,
    LinkingOverride,
    Network,
    Settings,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Linking:
    enabled: bool
    min_size: int
    allow_types: tuple[str, ...]
    deny_types: tuple[str, ...]
    quota: int
    nested: bool


@dataclass(frozen=True, slots=True)
class WindowLimit:
    window: float
    max_messages: int | None
    max_recipients: int | None


@dataclass(frozen=True, slots=True)
class HijackLimits:
    enabled: bool
    windows: tuple[WindowLimit, ...]
    freeze: bool


@dataclass(frozen=True, slots=True)
class Account:
    address: str  # the lookup key: lower-case local@domain
    domain: str
    password_hash: str | None
    send_as: frozenset[str]
    disabled: bool
    linking: Linking
    hijack: HijackLimits


def _merge_linking(base: Linking, over: LinkingOverride | None) -> Linking:
    if over is None:
        return base
    return Linking(
        enabled=base.enabled if over.enabled is None else over.enabled,
        min_size=base.min_size if over.min_size is None else over.min_size,
        allow_types=base.allow_types if over.allow_types is None else tuple(over.allow_types),
        deny_types=base.deny_types if over.deny_types is None else tuple(over.deny_types),
        quota=base.quota if over.quota is None else over.quota,
        nested=base.nested if over.nested is None else over.nested,
    )


def _merge_hijack(base: HijackLimits, over: HijackOverride | None) -> HijackLimits:
    if over is None:
        return base
    first = base.windows[0] if base.windows else WindowLimit(3600.0, None, None)
    merged_first = WindowLimit(
        window=first.window if over.window is None else over.window,
        max_messages=first.max_messages if over.max_messages is None else over.max_messages,
        max_recipients=first.max_recipients if over.max_recipients is None else over.max_recipients,
    )
    return HijackLimits(
        enabled=base.enabled,
        windows=(merged_first, *base.windows[1:]),
        freeze=base.freeze if over.freeze is None else over.freeze,
    )


def in_networks(ip: IPAddress, networks: list[Network] | tuple[Network, ...]) -> bool:
    return any(ip in net for net in networks)


class Directory:
    """Read-only view of accounts and local domains, built once at start-up."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        lk = settings.linking
        self._default_linking = Linking(
            enabled=lk.enabled,
            min_size=lk.min_size,
            allow_types=tuple(lk.allow_types),
            deny_types=tuple(lk.deny_types),
            quota=lk.quota,
            nested=lk.nested,
        )
        hj = settings.hijack
        windows = [WindowLimit(hj.window, hj.max_messages, hj.max_recipients)]
        windows += [
            WindowLimit(w.window, w.max_messages, w.max_recipients) for w in hj.extra_windows
        ]
        self._default_hijack = HijackLimits(hj.enabled, tuple(windows), hj.freeze)
        self._domains: dict[str, DomainSettings] = dict(settings.domains)
        self._accounts: dict[str, Account] = {
            key: self._build(key, acc) for key, acc in settings.accounts.items()
        }
        owners: dict[str, list[Account]] = {}
        for acc in self._accounts.values():
            for alias in acc.send_as:
                owners.setdefault(alias, []).append(acc)
        # An alias several accounts may use has no single owner to charge.
        self._alias_owner = {alias: accs[0] for alias, accs in owners.items() if len(accs) == 1}
        # The administrators' addresses: they reply to notifications from the
        # existing server even when they have no account here.
        self._admins = frozenset(
            a.lower() for a in (*settings.hijack.notify, *settings.screening.notify)
        )

    def is_admin(self, key: str) -> bool:
        return key.lower() in self._admins

    def _build(self, key: str, acc: AccountSettings) -> Account:
        domain = key.rpartition("@")[2]
        dom = self._domains.get(domain)
        linking = _merge_linking(self._default_linking, dom.linking if dom else None)
        linking = _merge_linking(linking, acc.linking)
        hijack = _merge_hijack(self._default_hijack, dom.hijack if dom else None)
        hijack = _merge_hijack(hijack, acc.hijack)
        return Account(
            address=key,
            domain=domain,
            password_hash=acc.password_hash.get_secret_value() if acc.password_hash else None,
            send_as=frozenset(a.lower() for a in (key, *acc.send_as)),
            disabled=acc.disabled,
            linking=linking,
            hijack=hijack,
        )

    def account(self, key: str) -> Account | None:
        return self._accounts.get(key.lower())

    def account_for_sender(self, key: str) -> Account | None:
        """The account itself, else the one account whose ``send_as`` has it."""
        key = key.lower()
        return self._accounts.get(key) or self._alias_owner.get(key)

    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self._domains

    def domain(self, domain: str) -> DomainSettings | None:
        return self._domains.get(domain.lower())

    def shield_allows(self, domain: str, ip: IPAddress) -> bool:
        dom = self._domains.get(domain.lower())
        if dom is None or not dom.allowed_networks:
            return True
        return in_networks(ip, dom.allowed_networks)
