"""Secrets for a development installation.

Production sets `KILN_API_KEY_PEPPER` and `KILN_SNAPSHOT_SIGNING_KEY` (settings refuse to start
without them). `kiln dev` generates them once and keeps them beside the embedded data, so keys
and snapshots made by one run stay valid in the next.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from kiln.settings import Settings

__all__ = ["with_dev_secrets"]

_GENERATED = ("api_key_pepper", "snapshot_signing_key")


def with_dev_secrets(settings: Settings, root: Path | None = None) -> Settings:
    path = (root or settings.dev_dir) / "secrets.json"
    try:
        stored: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    missing = [name for name in _GENERATED if not stored.get(name)]
    if missing:
        for name in missing:
            stored[name] = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stored, out)
        tmp.replace(path)
    changes = {name: stored[name] for name in _GENERATED if getattr(settings, name) is None}
    return settings.replace(**changes) if changes else settings
