"""Secrets for a development installation.

Production sets `KILN_API_KEY_PEPPER`, `KILN_SNAPSHOT_SIGNING_KEY` and `KILN_WEBHOOK_SECRET`
(settings refuse to start without them). `kiln dev` generates them once and keeps them beside
the embedded data, so keys, snapshots and webhook signatures made by one run stay valid in the
next.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from kiln._files import write_private
from kiln.errors import ConfigError
from kiln.settings import Settings

__all__ = ["with_dev_secrets"]

_GENERATED = ("api_key_pepper", "snapshot_signing_key", "webhook_secret")


def with_dev_secrets(settings: Settings, root: Path | None = None) -> Settings:
    path = (root or settings.dev_dir) / "secrets.json"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        stored = {}
    except (OSError, ValueError) as exc:
        # Never replace a damaged file silently: a new pepper would void every key made so far.
        raise ConfigError(
            [
                f"{path} cannot be read ({exc}); restore it, or delete it to "
                "generate new secrets (API keys made so far stop working)"
            ]
        ) from None
    if not isinstance(stored, dict):
        raise ConfigError([f"{path} is not a JSON object; restore it or delete it"])
    missing = [name for name in _GENERATED if not stored.get(name)]
    if missing:
        for name in missing:
            stored[name] = secrets.token_urlsafe(32)
        write_private(path, json.dumps(stored).encode())
    changes = {name: stored[name] for name in _GENERATED if getattr(settings, name) is None}
    return settings.replace(**changes) if changes else settings
