"""`$KILN_HOME/config.toml`: where `kiln dev` tells the other commands how to reach it.

    [kiln]
    url = "http://127.0.0.1:8000"
    api_key = "kiln_operator_..."

    [services]            # the embedded services of the last `kiln dev`
    nats_url = "nats://127.0.0.1:4222"
    database_url = "postgresql://postgres@127.0.0.1:5432/kiln"
    redis_url = "redis://127.0.0.1:6379/0"

`KILN_URL`, `KILN_API_KEY` and `KILN_*_URL` take precedence over this file. Both the CLI and
the SDK's remote calls read it (through `kiln.client`), so it lives beside them, not in the CLI.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln._files import write_private
from kiln.errors import ConfigError
from kiln.settings import SETTINGS, Settings, mask_url

__all__ = ["ClientConfig", "apply_client_config", "read_config", "write_config"]

_SERVICE_KEYS = ("nats_url", "nats_creds", "database_url", "redis_url")


@dataclass(frozen=True)
class ClientConfig:
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    services: dict[str, str] = field(default_factory=dict)


def read_config(path: Path) -> ClientConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return ClientConfig()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path} is not valid TOML ({exc}); fix or delete it"]) from None
    kiln = data.get("kiln", {})
    services = data.get("services", {})
    if not isinstance(kiln, dict) or not isinstance(services, dict):
        raise ConfigError([f"{path}: [kiln] and [services] must be tables; fix or delete it"])
    strings = {**{k: kiln.get(k) for k in ("url", "api_key")}, **services}
    wrong = sorted(k for k, v in strings.items() if v is not None and not isinstance(v, str))
    if wrong:
        raise ConfigError([f"{path}: {', '.join(wrong)} must be strings; fix or delete it"])
    return ClientConfig(
        url=kiln.get("url"),
        api_key=kiln.get("api_key"),
        services={k: v for k, v in services.items() if k in _SERVICE_KEYS},
    )


def write_config(path: Path, config: ClientConfig) -> None:
    """Write atomically and readable by the owner only: the file holds an admin key."""
    import tomli_w  # only `kiln dev` writes the file; readers (the SDK) need not load it

    data: dict[str, Any] = {"kiln": {}, "services": dict(config.services)}
    if config.url:
        data["kiln"]["url"] = config.url
    if config.api_key:
        data["kiln"]["api_key"] = config.api_key
    write_private(path, tomli_w.dumps(data).encode())


def apply_client_config(settings: Settings) -> Settings:
    """Fill what the environment left unset from config.toml (the environment wins)."""
    config = read_config(settings.config_file)
    changes: dict[str, Any] = {}
    if settings.url is None and config.url:
        changes["url"] = config.url
    if settings.api_key is None and config.api_key:
        changes["api_key"] = config.api_key
    for key in _SERVICE_KEYS:
        if getattr(settings, key) is None and key in config.services:
            changes[key] = config.services[key]
    problems = []
    for spec in SETTINGS:
        if spec.attr in changes:
            raw = changes[spec.attr]
            try:
                changes[spec.attr] = spec.parse(raw)
            except ValueError as exc:
                shown = "(value hidden)" if spec.secret else f"= {mask_url(raw)!r}"
                problems.append(
                    f"{spec.attr} {shown} in {settings.config_file} is not valid: {exc}."
                )
    if problems:
        raise ConfigError(problems)
    return settings.replace(**changes) if changes else settings
