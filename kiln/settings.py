"""One frozen `Settings` object, built once per process from `KILN_*` environment variables.

Only entry points (the CLI, a service's `main`) call `Settings.from_env(os.environ)`; everything
below them receives the object. Every problem found is reported at once, each line naming the
variable, showing its value (never a secret's) and saying what is allowed.

Precedence: an explicit `KILN_*` variable, then the default documented in `SETTINGS` below.
`docs/operations.md` lists the same table for operators.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kiln.errors import ConfigError

__all__ = ["SETTINGS", "Environment", "LogLevel", "Settings"]

_PREFIX = "KILN_"
# Variables under these prefixes belong to the test suite and tools, not to a running process.
_FOREIGN_PREFIXES = ("KILN_TEST_",)
_MIN_SECRET_CHARS = 32
_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_E = TypeVar("_E", bound=enum.StrEnum)


class Environment(enum.StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Process-wide configuration. Build it with `Settings.from_env`; never mutate it."""

    env: Environment = Environment.DEV
    home: Path
    nats_url: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    namespace: str = "kiln"
    host: str = "127.0.0.1"
    port: int = 8000
    url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_pepper: str | None = dataclasses.field(default=None, repr=False)
    snapshot_signing_key: str | None = dataclasses.field(default=None, repr=False)
    log_level: LogLevel = LogLevel.INFO
    max_request_bytes: int = 32 * 1024 * 1024
    connect_timeout_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    db_pool_size: int = 10
    metrics_port: int = 9464

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Parse and validate every `KILN_*` variable in `environ`; raise `ConfigError` listing
        all problems when any value is wrong."""
        problems: list[str] = []
        known = {spec.var for spec in SETTINGS}
        for name in sorted(environ):
            if not name.startswith(_PREFIX) or name in known:
                continue
            if name.startswith(_FOREIGN_PREFIXES):
                continue
            problems.append(_unknown_variable(name, known))

        values: dict[str, Any] = {}
        for spec in SETTINGS:
            raw = environ.get(spec.var)
            if raw is None or raw == "":
                if spec.attr == "home":
                    values["home"] = _default_home(environ)
                continue
            try:
                values[spec.attr] = spec.parse(raw)
            except ValueError as exc:
                shown = f" (value hidden, {len(raw)} characters)" if spec.secret else f"={raw!r}"
                problems.append(f"{spec.var}{shown} is not valid: {exc}.")

        if not problems:
            problems.extend(_cross_checks(values))
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def require(self, attr: str) -> str:
        """Return a setting that this code path cannot run without, or fail naming its variable."""
        value = getattr(self, attr)
        if value is None:
            spec = next(s for s in SETTINGS if s.attr == attr)
            raise ConfigError([f"{spec.var} is required here: {spec.help}."])
        return str(value)

    @property
    def dev_dir(self) -> Path:
        """Where `kiln dev` keeps the embedded services' data, pids and lock."""
        return self.home / "dev"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def nats_servers(self) -> list[str]:
        """The NATS seed URLs (a cluster is given as a comma-separated list)."""
        return [u.strip() for u in (self.nats_url or "").split(",") if u.strip()]

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the asyncpg driver that SQLAlchemy needs."""
        return asyncpg_sqlalchemy_url(self.require("database_url"))

    @property
    def redis_prefix(self) -> str:
        """Prefix of every Redis key this deployment writes, so deployments can share a server."""
        return f"{self.namespace}:"


def asyncpg_sqlalchemy_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return f"postgresql+asyncpg{sep}{rest}"
    raise ValueError(f"not a PostgreSQL URL: {scheme}://")


# Parsers: each returns the typed value or raises ValueError saying what is allowed. -------------


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds from {low:g} to {high:g}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number of seconds from {low:g} to {high:g}")
        return value

    return parse


def _choice(kind: type[_E]) -> Callable[[str], _E]:
    def parse(raw: str) -> _E:
        try:
            return kind(raw.strip().lower())
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise ValueError(f"expected one of: {allowed}") from None

    return parse


def _url(schemes: tuple[str, ...], example: str, *, many: bool = False) -> Callable[[str], str]:
    shown = " or ".join(f"{s}://" for s in schemes)
    what = f"a comma-separated list of {shown} URLs" if many else f"a {shown} URL"

    def parse(raw: str) -> str:
        parts = [p.strip() for p in raw.split(",")] if many else [raw.strip()]
        for part in parts:
            split = urlsplit(part)
            if split.scheme not in schemes or not (split.hostname or split.path):
                raise ValueError(f"expected {what} such as {example}")
            try:
                split.port  # noqa: B018 - a bad port raises ValueError here
            except ValueError:
                raise ValueError(f"expected {what} with a port from 1 to 65535") from None
        return ",".join(parts)

    return parse


def _http_url(raw: str) -> str:
    split = urlsplit(raw.strip())
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8000")
    return raw.strip().rstrip("/")


def _path(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ValueError("expected an absolute path (or one starting with ~)")
    if path.exists() and not path.is_dir():
        raise ValueError("expected a directory, but a file is there")
    return path


def _namespace(raw: str) -> str:
    if not _NAMESPACE_RE.match(raw):
        raise ValueError(
            "expected 1 to 31 characters of lowercase letters, digits and underscores, "
            "starting with a letter"
        )
    return raw


def _host(raw: str) -> str:
    if not raw.strip() or any(c.isspace() for c in raw.strip()):
        raise ValueError("expected a host name or IP address such as 127.0.0.1 or 0.0.0.0")
    return raw.strip()


def _secret(raw: str) -> str:
    if len(raw) < _MIN_SECRET_CHARS:
        raise ValueError(
            f"expected at least {_MIN_SECRET_CHARS} characters; generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return raw


def _api_key(raw: str) -> str:
    if not raw.startswith("kiln_"):
        raise ValueError("expected a Kiln API key, which starts with kiln_")
    return raw


@dataclass(frozen=True)
class SettingSpec:
    var: str
    attr: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("KILN_ENV", "env", _choice(Environment), "dev, test or production"),
    SettingSpec("KILN_HOME", "home", _path, "directory for local state (default ~/.kiln)"),
    SettingSpec(
        "KILN_NATS_URL",
        "nats_url",
        _url(("nats", "tls"), "nats://127.0.0.1:4222", many=True),
        "NATS server(s); unset under `kiln dev` starts an embedded one",
    ),
    SettingSpec(
        "KILN_DATABASE_URL",
        "database_url",
        _url(("postgresql", "postgres", "postgresql+asyncpg"), "postgresql://127.0.0.1:5432/kiln"),
        "PostgreSQL URL; unset under `kiln dev` starts an embedded one",
    ),
    SettingSpec(
        "KILN_REDIS_URL",
        "redis_url",
        _url(("redis", "rediss", "unix"), "redis://127.0.0.1:6379/0"),
        "Redis URL; unset under `kiln dev` starts an embedded one",
    ),
    SettingSpec(
        "KILN_NAMESPACE",
        "namespace",
        _namespace,
        "prefix of NATS subjects and streams and of Redis keys (default kiln)",
    ),
    SettingSpec("KILN_HOST", "host", _host, "address the router binds (default 127.0.0.1)"),
    SettingSpec("KILN_PORT", "port", _int_range(1, 65535), "router port (default 8000)"),
    SettingSpec("KILN_URL", "url", _http_url, "router URL the CLI talks to"),
    SettingSpec("KILN_API_KEY", "api_key", _api_key, "API key the CLI sends", secret=True),
    SettingSpec(
        "KILN_API_KEY_PEPPER",
        "api_key_pepper",
        _secret,
        "secret mixed into API-key hashes; at least 32 random characters",
        secret=True,
    ),
    SettingSpec(
        "KILN_SNAPSHOT_SIGNING_KEY",
        "snapshot_signing_key",
        _secret,
        "HMAC key that signs snapshots; at least 32 random characters",
        secret=True,
    ),
    SettingSpec("KILN_LOG_LEVEL", "log_level", _choice(LogLevel), "debug, info, warning, error"),
    SettingSpec(
        "KILN_MAX_REQUEST_BYTES",
        "max_request_bytes",
        _int_range(1024, 2**40),
        "largest request body the router accepts (default 32 MiB)",
    ),
    SettingSpec(
        "KILN_CONNECT_TIMEOUT",
        "connect_timeout_s",
        _seconds(0.1, 300),
        "seconds to wait when connecting to NATS, PostgreSQL or Redis (default 5)",
    ),
    SettingSpec(
        "KILN_SHUTDOWN_TIMEOUT",
        "shutdown_timeout_s",
        _seconds(0, 3600),
        "seconds a process drains before cancelling what is left (default 30)",
    ),
    SettingSpec(
        "KILN_DB_POOL_SIZE",
        "db_pool_size",
        _int_range(1, 1000),
        "PostgreSQL connections per process (default 10)",
    ),
    SettingSpec(
        "KILN_METRICS_PORT",
        "metrics_port",
        _int_range(1, 65535),
        "Prometheus port of processes other than the router (default 9464)",
    ),
)


def _default_home(environ: Mapping[str, str]) -> Path:
    base = environ.get("HOME")
    return (Path(base) if base else Path("~").expanduser()) / ".kiln"


def _unknown_variable(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}?" if close else "see docs/operations.md for the list"
    return f"{name} is not a Kiln setting; {hint}"


def _cross_checks(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if values.get("env") is Environment.PRODUCTION:
        for spec in SETTINGS:
            if spec.attr in _REQUIRED_IN_PRODUCTION and values.get(spec.attr) is None:
                problems.append(f"{spec.var} is required when KILN_ENV=production: {spec.help}.")
    return problems


_REQUIRED_IN_PRODUCTION = (
    "nats_url",
    "database_url",
    "redis_url",
    "api_key_pepper",
    "snapshot_signing_key",
)
