"""The parsers of `kiln.settings`: each turns a `KILN_*` variable's text into its typed value
or raises ValueError saying what is allowed (the settings module adds the variable's name)."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from kiln.apikeys import parse_key
from kiln.billing.prices import parse_prices
from kiln.tiers import TierLimits, parse_tier_limits

_MIN_SECRET_CHARS = 32
_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_E = TypeVar("_E", bound=enum.StrEnum)


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
            located = split.path if split.scheme == "unix" else split.hostname
            if split.scheme not in schemes or not located:
                raise ValueError(f"expected {what} such as {example}")
            if not _port_ok(split):
                raise ValueError(f"expected {what} with a port from 1 to 65535")
        return ",".join(parts)

    return parse


def _port_ok(split: SplitResult) -> bool:
    try:
        port = split.port
    except ValueError:
        return False
    return port is None or 1 <= port <= 65535


def _http_url(raw: str) -> str:
    split = urlsplit(raw.strip())
    if split.scheme not in ("http", "https") or not split.hostname or not _port_ok(split):
        raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8000")
    return raw.strip().rstrip("/")


def _path(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError("expected an absolute path or one starting with ~/")
    if path.exists() and not path.is_dir():
        raise ValueError("expected a directory, but a file is there")
    return path


def _file(raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ValueError("expected an absolute path or one starting with ~/")
    if not path.is_file():
        raise ValueError("expected an existing file, but there is none")
    return path


def _nkey_seed(prefix: str, role: str) -> Callable[[str], str]:
    """A parser of the nkey seed of a NATS `role` signing key (what `nsc` and `kiln dev` make):
    58 characters starting with `prefix`."""

    def parse(raw: str) -> str:
        if not re.fullmatch(prefix + r"[A-Z2-7]{56}", raw.strip()):
            raise ValueError(
                f"expected a NATS {role} signing key seed: 58 characters starting with {prefix} "
                "(see docs/security.md for how to make one)"
            )
        return raw.strip()

    return parse


_account_seed = _nkey_seed("SA", "account")
_operator_seed = _nkey_seed("SO", "operator")


def _paths(raw: str) -> tuple[Path, ...]:
    """Comma-separated absolute directories."""
    found = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        path = Path(part)
        if not path.is_absolute():
            raise ValueError(f"expected absolute paths, got {part!r}")
        if path.exists() and not path.is_dir():
            raise ValueError(f"expected directories, but {part!r} is a file")
        found.append(path)
    return tuple(found)


def _namespace(raw: str) -> str:
    if not _NAMESPACE_RE.match(raw):
        raise ValueError(
            "expected 1 to 31 characters of lowercase letters, digits and underscores, "
            "starting with a letter"
        )
    return raw


def _host(raw: str) -> str:
    host = raw.strip()
    # A bare IPv6 address has several colons; one colon means someone appended a port.
    if not host or "/" in host or host.count(":") == 1 or any(c.isspace() for c in host):
        raise ValueError(
            "expected a host name or IP address such as 127.0.0.1 or 0.0.0.0, without a "
            "scheme or port (the port is KILN_PORT)"
        )
    return host


def _secret(raw: str) -> str:
    if len(raw) < _MIN_SECRET_CHARS or any(c.isspace() for c in raw):
        raise ValueError(
            f"expected at least {_MIN_SECRET_CHARS} characters and no whitespace; generate one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return raw


def _node_gpus(raw: str) -> dict[str, int]:
    slots: dict[str, int] = {}
    for part in raw.split(","):
        kind, _, count = part.strip().partition(":")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$", kind) or not count.isdigit():
            raise ValueError(
                "expected comma-separated TYPE:COUNT pairs such as A10G:2,none:8 (none means "
                "CPU slots)"
            )
        if int(count) < 1:
            raise ValueError("expected counts of at least 1, such as A10G:2,none:8")
        slots[kind if kind == "none" else kind.upper()] = int(count)
    return slots


def _gpu_prices(raw: str) -> dict[str, int]:
    try:
        return parse_prices(raw)
    except ValueError as exc:
        raise ValueError(f'{exc}; expected JSON such as {{"A10G": 1100000}}') from None


def _tier_limits(raw: str) -> dict[str, TierLimits]:
    try:
        return parse_tier_limits(raw)
    except ValueError as exc:  # json.JSONDecodeError is one too
        raise ValueError(f'{exc}; expected JSON such as {{"free": {{"per_minute": 20}}}}') from None


def _stripe_key(raw: str) -> str:
    if not re.match(r"^(sk|rk)_(live|test)_[A-Za-z0-9]{8,}$", raw.strip()):
        raise ValueError("expected a Stripe secret or restricted key: sk_test_…, sk_live_…, rk_…")
    return raw.strip()


def _stripe_webhook_secret(raw: str) -> str:
    if not raw.strip().startswith("whsec_"):
        raise ValueError("expected the endpoint's signing secret, which starts with whsec_")
    return raw.strip()


def _meter_event(raw: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]{1,100}$", raw):
        raise ValueError("expected a Stripe meter event name: letters, digits, _ . -")
    return raw


def _currency(raw: str) -> str:
    if not re.match(r"^[a-z]{3}$", raw):
        raise ValueError("expected a three-letter ISO currency code in lower case, such as usd")
    return raw


def _modules(raw: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name; expected e.g. torch,transformers")
    return names


def _node_id(raw: str) -> str:
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", raw):
        raise ValueError("expected 1 to 64 letters, digits, hyphens and underscores")
    return raw


def _api_key(raw: str) -> str:
    if parse_key(raw.strip()) is None:
        raise ValueError(
            "expected a Kiln API key (kiln_<kind>_<secret>_<checksum>); this one is malformed "
            "or mistyped, copy it again"
        )
    return raw.strip()


def _mail_from(raw: str) -> str:
    from email.utils import parseaddr

    _, address = parseaddr(raw)
    if "@" not in address or "\n" in raw or "\r" in raw:
        raise ValueError("expected a sender address such as Kiln <kiln@example.com>")
    return raw.strip()


def _one_line(raw: str) -> str:
    text = raw.strip()
    if not text or len(text) > 300 or any(c in text for c in "\r\n"):
        raise ValueError("expected one line of text, at most 300 characters")
    return text


def _store_url(raw: str) -> str:
    from kiln._store_urls import parse_store_url

    parse_store_url(raw)
    return raw.strip()
