"""`kiln db upgrade|current|downgrade` as a user runs them, against a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from kiln.config_file import ClientConfig, write_config
from kiln.db.migrate import migrations_dir

pytestmark = pytest.mark.integration

# The newest migration, which `kiln db upgrade` reaches.
HEAD = ScriptDirectory(str(migrations_dir())).get_current_head()


def kiln(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        env=base | {"HOME": str(home), "KILN_HOME": str(home)} | env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_upgrade_current_downgrade(tmp_path: Path, fresh_database: Callable[[], str]) -> None:
    url = fresh_database()
    assert kiln(tmp_path, "db", "current", KILN_DATABASE_URL=url).stdout == "base\n"
    upgraded = kiln(tmp_path, "db", "upgrade", KILN_DATABASE_URL=url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout == f"database at {HEAD}\n"
    assert kiln(tmp_path, "db", "current", KILN_DATABASE_URL=url).stdout == f"{HEAD}\n"
    downgraded = kiln(tmp_path, "db", "downgrade", "base", KILN_DATABASE_URL=url)
    assert downgraded.returncode == 0, downgraded.stderr
    assert downgraded.stdout == "database at base\n"


def test_database_url_comes_from_config_toml(
    tmp_path: Path, fresh_database: Callable[[], str]
) -> None:
    url = fresh_database()
    write_config(tmp_path / "config.toml", ClientConfig(services={"database_url": url}))
    result = kiln(tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"database at {HEAD}\n"


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    result = kiln(tmp_path, "db", "current", KILN_DATABASE_URL="postgresql://u:pw@127.0.0.1:1/x")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: cannot connect to PostgreSQL at postgresql+asyncpg://u:***@127.0.0.1:1/x ("
    )
    assert result.stderr.endswith(
        "); is it running? `kiln dev` starts an embedded one, or set KILN_DATABASE_URL\n"
    )
    assert "Traceback" not in result.stderr


def test_missing_database_url_names_the_variable(tmp_path: Path) -> None:
    result = kiln(tmp_path, "db", "upgrade")
    assert result.returncode == 2
    assert result.stderr == (
        "error: KILN_DATABASE_URL is required here: PostgreSQL URL; unset under `kiln dev` "
        "starts an embedded one.\n"
    )


def test_bad_config_toml_value_is_named(tmp_path: Path) -> None:
    write_config(tmp_path / "config.toml", ClientConfig(services={"database_url": "mysql://x"}))
    result = kiln(tmp_path, "db", "current")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: database_url = 'mysql://x' in {tmp_path / 'config.toml'} is not valid: "
        "expected a "
        "postgresql:// or postgres:// or postgresql+asyncpg:// URL such as "
        "postgresql://127.0.0.1:5432/kiln.\n"
    )


def test_the_first_console_operator(tmp_path: Path, fresh_database: Callable[[], str]) -> None:
    url = fresh_database()
    assert kiln(tmp_path, "db", "upgrade", KILN_DATABASE_URL=url).returncode == 0
    made = kiln(tmp_path, "db", "operator", "Ops@Example.com", KILN_DATABASE_URL=url)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("operator ops@example.com made; password ")
    assert made.stdout.endswith(" (shown once)\n")
    again = kiln(tmp_path, "db", "operator", "ops@example.com", KILN_DATABASE_URL=url)
    assert again.returncode == 1
    assert "already has a console account" in again.stdout
    bad = kiln(tmp_path, "db", "operator", "ops", KILN_DATABASE_URL=url)
    assert bad.returncode == 1
    assert bad.stderr == "error: 'ops' is not an email address (name@example.com)\n"
