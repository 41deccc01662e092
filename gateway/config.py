"""The configuration contract: one TOML file, every key overridable by
``ATTACHGATE_<SECTION>__<KEY>``; sizes in ``KiB/MiB/GiB``, durations in ``s/m/h/d``.

Exception tree::

    ConfigError            (str() lists every problem as "dotted.key: what was expected")
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "ATTACHGATE_"
CONFIG_ENV = "ATTACHGATE_CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists each one by key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- human units ----------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "K": 1024,
    "KiB": 1024,
    "KB": 1000,
    "M": 1024**2,
    "MiB": 1024**2,
    "MB": 1000**2,
    "G": 1024**3,
    "GiB": 1024**3,
    "GB": 1000**3,
    "TiB": 1024**4,
    "TB": 1000**4,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_UNITS["w"] = 7 * 86400.0


def parse_size(value: object) -> int:
    """``"50MiB"`` → 52428800; plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB, 50MiB or 5GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError("expected a size such as 512KiB, 50MiB or 5GiB")


def parse_duration(value: object) -> float:
    """``"15m"`` → 900.0; plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 1h or 30d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError("expected a duration such as 30s, 15m, 1h or 30d")


def _parse_listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:587 or [::]:587")
    split_listen(value)
    return value


def split_listen(value: str) -> tuple[str, int]:
    """``"0.0.0.0:587"`` → (``"0.0.0.0"``, 587); ``"[::1]:25"`` → (``"::1"``, 25)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:587 or [::]:587")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:587 or [::]:587")
    return host, port


def _str_list(value: object) -> object:
    if isinstance(value, str):
        return [value] if value else []
    return value


def _parse_network(value: object) -> object:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if isinstance(value, str):
        try:
            # Strict: "10.0.0.1/8" is a typo that would trust all of 10/8.
            return ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                raise ValueError(
                    f"{value.strip()!r} has host bits set; write the network address "
                    "(e.g. 10.0.0.0/8) or a single address"
                ) from exc
    raise ValueError("expected an IP network such as 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32")


def _network_list(value: object) -> object:
    if isinstance(value, str):
        return [n for n in value.split(",") if n.strip()]
    return value


def _mailbox(value: object) -> object:
    from gateway.addresses import AddressError, parse_mailbox

    if not isinstance(value, str):
        raise ValueError("expected an email address")
    try:
        address = parse_mailbox(value, smtputf8=True)
    except AddressError as exc:
        raise ValueError(f"{value!r} is not a usable address: {exc}") from exc
    if address.had_route:
        raise ValueError(f"{value!r} is not a usable address: source route")
    return str(address)


def _ip_address(value: object) -> object:
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            pass
    raise ValueError("expected an IP address such as 192.0.2.7 or 2001:db8::7")


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Listen = Annotated[str, BeforeValidator(_parse_listen)]


def _argon2_hash(value: SecretStr) -> SecretStr:
    # A plain password or another scheme's hash would make every login fail
    # quietly; the message never repeats the value.
    try:
        extract_parameters(value.get_secret_value())
    except InvalidHashError:
        raise ValueError("not an argon2 hash (make one with `attachgate password hash`)") from None
    return value


PasswordHash = Annotated[SecretStr, AfterValidator(_argon2_hash)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NetworkItem = Annotated[Network, BeforeValidator(_parse_network)]
Networks = Annotated[list[NetworkItem], BeforeValidator(_network_list)]
Mailbox = Annotated[str, BeforeValidator(_mailbox)]
IPText = Annotated[str, BeforeValidator(_ip_address)]
Positive = Annotated[Duration, Field(gt=0)]
AddrList = Annotated[list[Mailbox], BeforeValidator(_str_list)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ---------------------------------------------------------------


class SmtpSettings(_Section):
    hostname: str = Field(default_factory=socket.getfqdn, validate_default=True)
    listen: list[Listen] = ["127.0.0.1:2525"]
    tls_listen: list[Listen] = []
    trusted_networks: Networks = []
    public_addresses: list[IPText] = []
    max_message_size: Size = 50 * 1024**2
    max_recipients: int = Field(default=100, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    max_unknown_commands: int = Field(default=10, ge=1)
    command_timeout: Positive = 300.0
    auth_require_tls: bool = True
    # asyncio's own loop serves downloads with the kernel's sendfile; uvloop
    # has none, so downloads run several times slower under it.
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"

    @field_validator("hostname")
    @classmethod
    def _fqdn(cls, v: str) -> str:
        labels = v.rstrip(".").split(".")
        if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
            raise ValueError(
                f"{v!r} is not a fully qualified host name (the EHLO name and the "
                "Received header need one, e.g. gw.example.com)"
            )
        return v.rstrip(".").lower()


class TlsSettings(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None


class NextHopSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    starttls: Literal["off", "opportunistic", "required"] = "opportunistic"
    implicit_tls: bool = False
    verify_certificate: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    timeout: Positive = 60.0
    pool_size: int = Field(default=8, ge=0, le=1000)
    helo_name: str | None = None


class WebSettings(_Section):
    enabled: bool = True
    listen: Listen = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    admin_enabled: bool = False
    admin_username: str = "admin"
    admin_password_hash: PasswordHash | None = None

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", v):
            raise ValueError("expected an http:// or https:// base URL without query")
        return v.rstrip("/")


class LinksSettings(_Section):
    secret_keys: list[SecretStr] = []
    expire_after: Annotated[Duration, Field(gt=0)] = 30 * 86400.0

    @field_validator("secret_keys")
    @classmethod
    def _keys(cls, v: list[SecretStr]) -> list[SecretStr]:
        for key in v:
            if len(key.get_secret_value()) < 16:
                raise ValueError("each secret key must be at least 16 characters long")
        return v


class StorageSettings(_Section):
    backend: Literal["local"] = "local"
    path: Path = Path("/var/lib/attachgate/blobs")
    gc_grace: Duration = 3600.0


class StateSettings(_Section):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path = Path("/var/lib/attachgate/state.db")
    redis_url: str | None = None
    redis_prefix: str = "attachgate:"
    busy_timeout: Duration = 5.0

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when backend is redis")
        return self


CaseMode = Literal["temporary", "permanent"]


class PolicySettings(_Section):
    mode: Literal["trial", "production"] = "trial"
    unknown_account: CaseMode | None = None
    disabled_account: CaseMode | None = None
    frozen_account: CaseMode | None = None
    over_quota: CaseMode | None = None
    ip_shield: CaseMode | None = None
    sender_not_allowed: CaseMode | None = None
    duplicate_headers: CaseMode | None = None
    on_rewrite_error: Literal["pass", "refuse"] = "pass"


class HijackLimit(_Section):
    max_messages: int | None = Field(default=None, ge=1)
    max_recipients: int | None = Field(default=None, ge=1)
    window: Positive


class HijackSettings(_Section):
    enabled: bool = True
    max_messages: int | None = Field(default=200, ge=1)
    max_recipients: int | None = Field(default=1000, ge=1)
    window: Positive = 3600.0
    extra_windows: list[HijackLimit] = []
    freeze: bool = True
    thaw_after: Positive | None = None
    notify: AddrList = []
    control_address: Mailbox | None = None


class HijackOverride(_Section):
    max_messages: int | None = Field(default=None, ge=1)
    max_recipients: int | None = Field(default=None, ge=1)
    window: Positive | None = None
    freeze: bool | None = None


class ScreeningSettings(_Section):
    enabled: bool = True
    max_auth_failures: int = Field(default=10, ge=1)
    window: Positive = 900.0
    ban_for: Positive = 3600.0
    notify: AddrList = []
    notify_every: Positive = 3600.0
    allow_networks: Networks = []
    failure_delay: Duration = 1.0
    max_failure_delay: Duration = 8.0


class LinkingSettings(_Section):
    enabled: bool = False
    min_size: Size = 1024**2
    allow_types: list[str] = []
    deny_types: list[str] = ["application/ms-tnef", "application/vnd.ms-tnef", ".dat"]
    quota: Size = 5 * 1024**3
    nested: bool = False
    templates_dir: Path | None = None


class LinkingOverride(_Section):
    enabled: bool | None = None
    min_size: Size | None = None
    allow_types: list[str] | None = None
    deny_types: list[str] | None = None
    quota: Size | None = None
    nested: bool | None = None


class MimeSettings(_Section):
    max_depth: int = Field(default=20, ge=1)
    max_parts: int = Field(default=1000, ge=1)
    max_header_size: Size = 256 * 1024


class DkimKeySettings(_Section):
    selector: str
    key_file: Path
    active: bool = True


class DkimSettings(_Section):
    refuse_duplicate_headers: bool = True
    expire_after: Annotated[Duration, Field(gt=0)] | None = None


class DomainSettings(_Section):
    dkim_selector: str | None = None
    dkim_key_file: Path | None = None
    dkim_keys: list[DkimKeySettings] = []
    allowed_networks: Networks = []
    hijack: HijackOverride | None = None
    linking: LinkingOverride | None = None


class AccountSettings(_Section):
    password_hash: PasswordHash | None = None
    send_as: list[Mailbox] = []
    disabled: bool = False
    linking: LinkingOverride | None = None
    hijack: HijackOverride | None = None


class DnsSettings(_Section):
    nameservers: list[IPText] = []
    port: int = Field(default=53, ge=1, le=65535)
    timeout: Positive = 5.0


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsSettings(_Section):
    listen: Listen | None = None


def _lower_keys(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k).lower(): v for k, v in value.items()}
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    next_hop: NextHopSettings = Field(default_factory=NextHopSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    links: LinksSettings = Field(default_factory=LinksSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    hijack: HijackSettings = Field(default_factory=HijackSettings)
    screening: ScreeningSettings = Field(default_factory=ScreeningSettings)
    linking: LinkingSettings = Field(default_factory=LinkingSettings)
    mime: MimeSettings = Field(default_factory=MimeSettings)
    dkim: DkimSettings = Field(default_factory=DkimSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    domains: Annotated[dict[str, DomainSettings], BeforeValidator(_lower_keys)] = {}
    accounts: Annotated[dict[str, AccountSettings], BeforeValidator(_lower_keys)] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file; the file is handed in as init data.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[str] = []
        needs_tls = bool(self.smtp.tls_listen)
        if needs_tls and (self.tls.cert_file is None or self.tls.key_file is None):
            problems.append(
                "tls.cert_file and tls.key_file are required when smtp.tls_listen is set"
            )
        for key in ("cert_file", "key_file"):
            path = getattr(self.tls, key)
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"tls.{key}: cannot read {path}")
        templates = self.linking.templates_dir
        if templates is not None and not templates.is_dir():
            problems.append(f"linking.templates_dir: {templates} is not a directory")
        if self.linking_possible() and not self.links.secret_keys:
            problems.append("links.secret_keys: at least one key is needed when linking is enabled")
        for name, dom in self.domains.items():
            if (dom.dkim_selector is None) != (dom.dkim_key_file is None):
                problems.append(f"domains.{name}: dkim_selector and dkim_key_file go together")
        for name in self.accounts:
            if "@" not in name:
                problems.append(f"accounts.{name}: an account is named by its address")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def linking_possible(self) -> bool:
        if self.linking.enabled:
            return True
        return any(
            a.linking is not None and a.linking.enabled for a in self.accounts.values()
        ) or any(d.linking is not None and d.linking.enabled for d in self.domains.values())


def _format_error(err: ValidationError) -> list[str]:
    problems = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith(("lax-", "function-")))
        msg = item["msg"]
        if not loc:
            # Cross-field checks name their keys themselves.
            problems += msg.removeprefix("Value error, ").split("; ")
            continue
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{loc}: {msg}")
    return problems


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file (if any) and the environment; raise ConfigError naming each key."""
    data: dict[str, Any] = {}
    if path is None:
        env_path = os.environ.get(CONFIG_ENV)
        path = Path(env_path) if env_path else None
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(
                [f"{path}: cannot read the configuration file ({exc.strerror})"]
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None and name not in ("domains", "accounts"):
            # Absent sections are validated as sections, so their errors carry
            # the section's name.
            data.setdefault(name, {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc
    except SettingsError as exc:
        # An environment value that is not valid JSON for a list or table.
        raise ConfigError([f"environment: {exc}"]) from exc
