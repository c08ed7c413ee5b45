"""One frozen `Settings` object, built once per process from `KILN_*` environment variables.

Only entry points (the CLI, a service's `main`) call `Settings.from_env(os.environ)`; everything
below them receives the object. Every problem found is reported at once, each line naming the
variable, showing its value (never a secret's) and saying what is allowed.

Precedence: an explicit `KILN_*` variable, then the default. Each default is written once, as
the value of its `Settings` field (or, where unset means something computed, in its spec's
`unset`); `default_text` shows it, and `docs/operations.md` lists the same table for operators,
defaults included, which tests/unit/test_docs.py keeps equal to this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kiln._setting_parsers import (
    _account_seed,
    _api_key,
    _choice,
    _currency,
    _file,
    _gpu_prices,
    _host,
    _http_url,
    _int_range,
    _mail_from,
    _meter_event,
    _modules,
    _namespace,
    _node_gpus,
    _node_id,
    _one_line,
    _operator_seed,
    _path,
    _paths,
    _seconds,
    _secret,
    _store_url,
    _stripe_key,
    _stripe_webhook_secret,
    _tier_limits,
    _url,
)
from kiln.billing.prices import DEFAULT_PRICES
from kiln.errors import ConfigError
from kiln.tiers import DEFAULT_TIERS, TierLimits

__all__ = [
    "SETTINGS",
    "EgressMode",
    "Environment",
    "LogLevel",
    "SandboxMode",
    "Settings",
    "Switch",
    "default_text",
    "mask_url",
]

_PREFIX = "KILN_"
# Variables under these prefixes belong to the test suite and tools, not to a running process.
_FOREIGN_PREFIXES = ("KILN_TEST_",)


class Environment(enum.StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class Switch(enum.StrEnum):
    ON = "on"
    OFF = "off"


class SandboxMode(enum.StrEnum):
    AUTO = "auto"  # bubblewrap where the node agent can use it (root, bwrap installed)
    BWRAP = "bwrap"  # always; a node agent that cannot refuses to start
    OFF = "off"


class EgressMode(enum.StrEnum):
    ALLOW = "allow"  # NATS and what the host reaches, except the platform's own ports
    DENY = "deny"  # NATS only


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings:
    """Process-wide configuration. Build it with `Settings.from_env`; never mutate it."""

    env: Environment = Environment.DEV
    home: Path
    nats_url: str | None = None
    nats_creds: Path | None = None
    nats_signing_key: str | None = dataclasses.field(default=None, repr=False)
    nats_operator_signing_key: str | None = dataclasses.field(default=None, repr=False)
    nats_system_creds: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    namespace: str = "kiln"
    host: str = "127.0.0.1"
    port: int = 8000
    url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_pepper: str | None = dataclasses.field(default=None, repr=False)
    snapshot_signing_key: str | None = dataclasses.field(default=None, repr=False)
    webhook_secret: str | None = dataclasses.field(default=None, repr=False)
    log_level: LogLevel = LogLevel.INFO
    max_request_bytes: int = 32 * 1024 * 1024
    connect_timeout_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    health_nats_down_s: float = 60.0
    health_loop_stall_s: float = 10.0
    stream_replicas: int = 1
    db_pool_size: int = 10
    metrics_port: int = 9464
    gpu_sample_interval_s: float = 5.0
    node_id: str | None = None
    node_gpus: dict[str, int] | None = None
    snapshots: Switch = Switch.ON
    store_url: str = "nats://"
    s3_endpoint_url: str | None = None
    standby_processes: int = 1
    standby_imports: tuple[str, ...] = ("torch",)
    standby_flavours: int = 8
    standby_memory_mb: int = 0
    sandbox: SandboxMode = SandboxMode.AUTO
    sandbox_uid_base: int = 200_000
    sandbox_cpus: float = 0.0
    sandbox_share: tuple[Path, ...] = ()
    sandbox_egress: EgressMode = EgressMode.ALLOW
    scheduler_lease_s: float = 5.0
    max_replicas: int = 1000
    ws_idle_timeout_s: float = 300.0
    ws_max_session_s: float = 3600.0
    pod_idle_reminder_s: float = 3 * 3600.0
    job_result_ttl_s: float = 7 * 24 * 3600.0
    invocation_log: Switch = Switch.ON
    invocation_retention_s: float = 30 * 24 * 3600.0
    function_logs_max_bytes: int = 1024 * 1024 * 1024
    function_logs_max_age_s: float = 7 * 24 * 3600.0
    tier_limits: Mapping[str, TierLimits] = dataclasses.field(default_factory=lambda: DEFAULT_TIERS)
    gpu_prices: Mapping[str, int] = dataclasses.field(default_factory=lambda: DEFAULT_PRICES)
    stripe_api_key: str | None = dataclasses.field(default=None, repr=False)
    stripe_api_base: str | None = None
    stripe_webhook_secret: str | None = dataclasses.field(default=None, repr=False)
    stripe_meter_event: str = "kiln_replica_ms"
    currency: str = "usd"
    refill_max_failures: int = 3
    min_charge_s: int = 0
    volume_price_gb_hour: int = 140  # micro-units: about $0.10 a GB a month
    invoice_grace_days: int = 14
    invoice_close_delay_s: float = 3600.0
    invoice_issuer: str = "Kiln"
    smtp_url: str | None = dataclasses.field(default=None, repr=False)
    mail_from: str = "Kiln <kiln@localhost>"

    @property
    def stripe_enabled(self) -> bool:
        return self.stripe_api_key is not None

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
                if spec.attr == "home":
                    raw = _expand_user(raw, environ)
                values[spec.attr] = spec.parse(raw)
            except ValueError as exc:
                problems.append(f"{spec.var}{_shown(spec, raw)} is not valid: {exc}.")

        if not problems:
            problems.extend(_cross_checks(values))
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def __repr__(self) -> str:
        shown = []
        for spec in SETTINGS:
            value = getattr(self, spec.attr)
            if spec.secret and value is not None:
                value = "***"
            elif isinstance(value, str) and "://" in value:
                value = mask_url(value)
            shown.append(f"{spec.attr}={value!r}")
        return f"Settings({', '.join(shown)})"

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
    """`url` for SQLAlchemy's asyncpg dialect, which passes query parameters to
    `asyncpg.connect` as keywords: libpq's `sslmode` is spelled `ssl` there."""
    split = urlsplit(url)
    query = [
        ("ssl" if key == "sslmode" else key, value)
        for key, value in parse_qsl(split.query, keep_blank_values=True)
    ]
    return urlunsplit(split._replace(scheme="postgresql+asyncpg", query=urlencode(query)))


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    masked = []
    for part in url.split(","):
        split = urlsplit(part.strip())
        if split.password:
            netloc = split.netloc.replace(f":{split.password}@", ":***@", 1)
            part = urlunsplit(split._replace(netloc=netloc))
        masked.append(part)
    return ",".join(masked)


def _shown(spec: SettingSpec, raw: str) -> str:
    if spec.secret:
        return f" (value hidden, {len(raw)} characters)"
    return f"={mask_url(raw)!r}"


def _expand_user(raw: str, environ: Mapping[str, str]) -> str:
    """Expand a leading ~ with the HOME of `environ`, not of this process."""
    if raw == "~" or raw.startswith("~/"):
        home = environ.get("HOME")
        if not home:
            raise ValueError("starts with ~ but HOME is not set; use an absolute path")
        return home + raw[1:]
    if raw.startswith("~"):
        raise ValueError("expected an absolute path or one starting with ~/")
    return raw


@dataclass(frozen=True)
class SettingSpec:
    var: str
    attr: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    # What an unset variable means, where that is not a value of the field: a computed default
    # (the host name) or another party's (Stripe's address). The default itself lives only in
    # the Settings field; `default_text` shows it.
    unset: str | None = None


def default_text(spec: SettingSpec) -> str:
    """The default of `spec` as docs/operations.md shows it, read from the Settings field."""
    if spec.unset is not None:
        return spec.unset
    field = next(f for f in dataclasses.fields(Settings) if f.name == spec.attr)
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, Mapping):
        return "; ".join(
            f"{key} {item.describe() if isinstance(item, TierLimits) else f'{item:,}'}"
            for key, item in value.items()
        )
    if value is None or value == ():
        return "unset"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, tuple):
        return "`" + ",".join(str(item) for item in value) + "`"
    if isinstance(value, float):
        value = int(value) if value.is_integer() else value
    if isinstance(value, int) and spec.attr.endswith("_bytes") and value >= 1 << 20:
        return f"{value} ({_binary(value)})"
    if isinstance(value, int) and spec.attr.endswith("_s") and value >= 86400:
        return f"{value} ({value // 86400} days)"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _binary(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("KILN_ENV", "env", _choice(Environment), "dev, test or production"),
    SettingSpec("KILN_HOME", "home", _path, "directory for local state", unset="`~/.kiln`"),
    SettingSpec(
        "KILN_NATS_URL",
        "nats_url",
        _url(("nats", "tls"), "nats://127.0.0.1:4222", many=True),
        "NATS server(s); unset under `kiln dev` starts an embedded one",
    ),
    SettingSpec(
        "KILN_NATS_CREDS",
        "nats_creds",
        _file,
        "NATS credentials file (user JWT and seed) this process connects with; `kiln dev` "
        "makes one",
    ),
    SettingSpec(
        "KILN_NATS_SIGNING_KEY",
        "nats_signing_key",
        _account_seed,
        "NATS account signing key seed (SA...) with which a node agent issues each replica "
        "its own credentials; needed by agents when NATS requires credentials",
        secret=True,
    ),
    SettingSpec(
        "KILN_NATS_OPERATOR_SIGNING_KEY",
        "nats_operator_signing_key",
        _operator_seed,
        "NATS operator signing key seed (SO...) with which a node agent makes each function's "
        "NATS account; needed by agents when NATS requires credentials",
        secret=True,
    ),
    SettingSpec(
        "KILN_NATS_SYSTEM_CREDS",
        "nats_system_creds",
        _file,
        "credentials file of a NATS system account user, with which a node agent pushes the "
        "function accounts it makes to the servers; needed by agents when NATS requires "
        "credentials",
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
        "prefix of NATS subjects and streams and of Redis keys",
    ),
    SettingSpec("KILN_HOST", "host", _host, "address the router binds"),
    SettingSpec("KILN_PORT", "port", _int_range(1, 65535), "router port"),
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
        "HMAC key that signs snapshots and usage reports and seals what platform processes "
        "send each other over NATS (routers, schedulers, node agents and billing workers need "
        "the same one); at least 32 random characters",
        secret=True,
    ),
    SettingSpec(
        "KILN_WEBHOOK_SECRET",
        "webhook_secret",
        _secret,
        "HMAC key that signs job completion webhooks (Kiln-Signature); at least 32 characters",
        secret=True,
    ),
    SettingSpec("KILN_LOG_LEVEL", "log_level", _choice(LogLevel), "debug, info, warning, error"),
    SettingSpec(
        "KILN_MAX_REQUEST_BYTES",
        "max_request_bytes",
        _int_range(1024, 2**40),
        "largest request body the router accepts, in bytes",
    ),
    SettingSpec(
        "KILN_CONNECT_TIMEOUT",
        "connect_timeout_s",
        _seconds(0.1, 300),
        "seconds to wait when connecting to NATS, PostgreSQL or Redis",
    ),
    SettingSpec(
        "KILN_SHUTDOWN_TIMEOUT",
        "shutdown_timeout_s",
        _seconds(0, 3600),
        "seconds a process drains before cancelling what is left",
    ),
    SettingSpec(
        "KILN_HEALTH_NATS_DOWN_S",
        "health_nats_down_s",
        _seconds(1, 86400),
        "/healthz fails once the process's NATS link has been down this many seconds, so an "
        "orchestrator restarts it",
    ),
    SettingSpec(
        "KILN_HEALTH_LOOP_STALL_S",
        "health_loop_stall_s",
        _seconds(0.5, 3600),
        "/healthz fails once the process's event loop has not run for this many seconds",
    ),
    SettingSpec(
        "KILN_STREAM_REPLICAS",
        "stream_replicas",
        _int_range(1, 5),
        "copies JetStream keeps of the streams that must not lose data (calls, jobs, job "
        "events, usage): 3 on a 3-node NATS cluster",
    ),
    SettingSpec(
        "KILN_DB_POOL_SIZE",
        "db_pool_size",
        _int_range(1, 1000),
        "PostgreSQL connections per process",
    ),
    SettingSpec(
        "KILN_NODE_ID",
        "node_id",
        _node_id,
        "this node agent's name",
        unset="the host name",
    ),
    SettingSpec(
        "KILN_NODE_GPUS",
        "node_gpus",
        _node_gpus,
        "slots this node agent offers, e.g. A10G:2,none:8",
        unset="its GPUs (through NVML) and four CPU slots per core",
    ),
    SettingSpec(
        "KILN_SNAPSHOTS",
        "snapshots",
        _choice(Switch),
        "on: classes restore their setup state from snapshots; off: hooks every time",
    ),
    SettingSpec(
        "KILN_STORE_URL",
        "store_url",
        _store_url,
        "where code artifacts and snapshots live: nats:// (JetStream's object store), "
        "file:///path (a directory every process reaches) or s3://bucket/prefix (S3; "
        "credentials the standard AWS ways: environment, profile or the instance's role)",
    ),
    SettingSpec(
        "KILN_S3_ENDPOINT_URL",
        "s3_endpoint_url",
        _http_url,
        "an S3-compatible service to use instead of AWS's S3 (MinIO, Ceph, R2, ...)",
        unset="AWS's S3 in the region the standard AWS settings give",
    ),
    SettingSpec(
        "KILN_STANDBY_PROCESSES",
        "standby_processes",
        _int_range(0, 64),
        "generic standbys (pre-started replica processes that imported only "
        "KILN_STANDBY_IMPORTS) a node agent keeps per slot kind for functions it has not seen "
        "start yet; those it has get standbys of their own flavour (0: no standbys at all)",
    ),
    SettingSpec(
        "KILN_STANDBY_IMPORTS",
        "standby_imports",
        _modules,
        "modules every standby imports ahead of time, beside those each function's snapshot "
        "says it needs",
    ),
    SettingSpec(
        "KILN_STANDBY_FLAVOURS",
        "standby_flavours",
        _int_range(0, 64),
        "the most distinct import sets (flavours) a node agent keeps standbys of, the most "
        "recently used first",
    ),
    SettingSpec(
        "KILN_STANDBY_MEMORY_MB",
        "standby_memory_mb",
        _int_range(0, 16 * 1024 * 1024),
        "the most memory a node's standbys may hold together, in MiB (0: a quarter of the "
        "node's memory); a standby also never starts when it would leave less than a tenth "
        "of the node's memory free",
    ),
    SettingSpec(
        "KILN_SANDBOX",
        "sandbox",
        _choice(SandboxMode),
        "how replicas and standbys are isolated: bwrap (each in a bubblewrap sandbox under a uid "
        "of its own, with a seccomp filter and a cgroup; the node agent must run as root), off "
        "(plain processes: a trusted single-tenant node only), or auto (bwrap where the agent "
        "can use it, else off with a warning)",
    ),
    SettingSpec(
        "KILN_SANDBOX_UID_BASE",
        "sandbox_uid_base",
        _int_range(1000, 2**31 - 65_536),
        "the first of the 65536 host uids the node agent gives its sandboxes, one each; no "
        "user of the host may own files in that range",
    ),
    SettingSpec(
        "KILN_SANDBOX_EGRESS",
        "sandbox_egress",
        _choice(EgressMode),
        "what sandboxed replicas may connect to: allow (NATS and what the host reaches, but "
        "never the platform's PostgreSQL, Redis or metrics ports) or deny (NATS only)",
    ),
    SettingSpec(
        "KILN_SANDBOX_CPUS",
        "sandbox_cpus",
        _seconds(0, 4096),
        "the most CPU cores each sandbox may use, fractions allowed (0: no cap; they share the "
        "node's CPUs equally under load)",
    ),
    SettingSpec(
        "KILN_SANDBOX_SHARE",
        "sandbox_share",
        _paths,
        "host directories every sandbox may read, comma-separated, shown read-only at the same "
        "paths (a node's model store, for example)",
    ),
    SettingSpec(
        "KILN_SCHEDULER_LEASE_S",
        "scheduler_lease_s",
        _seconds(1, 60),
        "how long the leading scheduler's lease lasts unrenewed: a standby scheduler takes over "
        "within about this long after the leader dies",
    ),
    SettingSpec(
        "KILN_MAX_REPLICAS",
        "max_replicas",
        _int_range(1, 1000),
        "the most replicas any one function may have: higher max_replicas in a deploy or a "
        "live change is refused",
    ),
    SettingSpec(
        "KILN_WS_IDLE_TIMEOUT_S",
        "ws_idle_timeout_s",
        _seconds(1, 86_400),
        "a WebSocket session with no frame either way for this long is closed with 1001",
    ),
    SettingSpec(
        "KILN_WS_MAX_SESSION_S",
        "ws_max_session_s",
        _seconds(1, 86_400),
        "the longest a WebSocket session lasts; then it is closed with 1001",
    ),
    SettingSpec(
        "KILN_POD_IDLE_REMINDER_S",
        "pod_idle_reminder_s",
        _seconds(0, 30 * 86_400),
        "a running pod with no terminal or port traffic for this long has its owners mailed "
        "once (what it costs an hour, how to stop it), again only after traffic and a new "
        "idle spell (0: never)",
    ),
    SettingSpec(
        "KILN_JOB_RESULT_TTL_S",
        "job_result_ttl_s",
        _seconds(60, 90 * 86_400),
        "how long a finished job's status and result are kept",
    ),
    SettingSpec(
        "KILN_INVOCATION_LOG",
        "invocation_log",
        _choice(Switch),
        "on: every call gets a row in the invocation log; off: none are written",
    ),
    SettingSpec(
        "KILN_INVOCATION_RETENTION_S",
        "invocation_retention_s",
        _seconds(3600, 10 * 365 * 86_400),
        "how long invocation log rows are kept; older ones are deleted in the background",
    ),
    SettingSpec(
        "KILN_FUNCTION_LOGS_MAX_BYTES",
        "function_logs_max_bytes",
        _int_range(1024 * 1024, 1024**4),
        "the most bytes of function output (prints and logging) the log stream keeps; the "
        "oldest go first",
    ),
    SettingSpec(
        "KILN_FUNCTION_LOGS_MAX_AGE_S",
        "function_logs_max_age_s",
        _seconds(60, 365 * 86_400),
        "how long function output is kept in the log stream",
    ),
    SettingSpec(
        "KILN_TIER_LIMITS",
        "tier_limits",
        _tier_limits,
        'changes to the tiers\' limits as JSON, e.g. {"free": {"per_minute": 20}} (per_minute, '
        "burst, per_day, per_month, concurrent, max_replicas)",
    ),
    SettingSpec(
        "KILN_GPU_PRICES",
        "gpu_prices",
        _gpu_prices,
        'prices per hour of replica time by GPU type ("none": a CPU slot) in micro-units, as '
        'JSON changes to the built-in prices, e.g. {"A10G": 1100000}',
    ),
    SettingSpec(
        "KILN_STRIPE_API_KEY",
        "stripe_api_key",
        _stripe_key,
        "Stripe secret key (sk_live_… or sk_test_…); unset: no payments and no meter events",
        secret=True,
    ),
    SettingSpec(
        "KILN_STRIPE_API_BASE",
        "stripe_api_base",
        _http_url,
        "Stripe's API address (tests point it at a fake)",
        unset="Stripe's own, `https://api.stripe.com`",
    ),
    SettingSpec(
        "KILN_STRIPE_WEBHOOK_SECRET",
        "stripe_webhook_secret",
        _stripe_webhook_secret,
        "the signing secret (whsec_…) of the Stripe webhook endpoint /v1/billing/stripe/webhook",
        secret=True,
    ),
    SettingSpec(
        "KILN_STRIPE_METER_EVENT",
        "stripe_meter_event",
        _meter_event,
        "event name of the Stripe Billing meter that receives replica milliseconds",
    ),
    SettingSpec(
        "KILN_CURRENCY",
        "currency",
        _currency,
        "ISO currency of balances and payments, lower case; money is counted in micro-units of it",
    ),
    SettingSpec(
        "KILN_REFILL_MAX_FAILURES",
        "refill_max_failures",
        _int_range(1, 100),
        "auto-refill charges that may fail in a row before auto-refill turns itself off",
    ),
    SettingSpec(
        "KILN_MIN_CHARGE_S",
        "min_charge_s",
        _int_range(0, 86_400),
        "a replica is billed for at least this many seconds, however briefly it ran (0: no "
        "minimum)",
    ),
    SettingSpec(
        "KILN_VOLUME_PRICE_GB_HOUR",
        "volume_price_gb_hour",
        _int_range(0, 100_000_000),
        "what a pod's volume costs per GB-hour of its size, in micro-units, charged from its "
        "creation until it is deleted, stopped or not (0: free)",
    ),
    SettingSpec(
        "KILN_INVOICE_GRACE_DAYS",
        "invoice_grace_days",
        _int_range(0, 365),
        "days an issued invoice may stay unpaid (its payment retried meanwhile) before the "
        "customer is blocked as an empty balance blocks; paying lifts the block",
    ),
    SettingSpec(
        "KILN_INVOICE_CLOSE_DELAY_S",
        "invoice_close_delay_s",
        _seconds(0, 7 * 86_400),
        "how long after a billing period ends the billing service closes it into invoices "
        "(usage reported late still lands in it)",
    ),
    SettingSpec(
        "KILN_INVOICE_ISSUER",
        "invoice_issuer",
        _one_line,
        "who invoices are from, as printed on them (your company's name and address)",
    ),
    SettingSpec(
        "KILN_SMTP_URL",
        "smtp_url",
        _url(("smtp", "smtps"), "smtp://user:password@mail.example.com:587"),
        "the SMTP server the console's mail goes through (smtp:// upgrades with STARTTLS when "
        "offered; smtps:// is TLS from the start)",
        secret=True,
        unset="each message is written to a file under `$KILN_HOME/mail/` and its link logged",
    ),
    SettingSpec(
        "KILN_MAIL_FROM",
        "mail_from",
        _mail_from,
        "the sender of the console's mail",
    ),
    SettingSpec(
        "KILN_METRICS_PORT",
        "metrics_port",
        _int_range(1, 65535),
        "Prometheus port of processes other than the router",
    ),
    SettingSpec(
        "KILN_GPU_SAMPLE_INTERVAL_S",
        "gpu_sample_interval_s",
        _seconds(1, 3600),
        "how often a node agent reads its GPUs' utilisation, memory, temperature, power and "
        "ECC errors through NVML for its metrics",
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
    "webhook_secret",
)
