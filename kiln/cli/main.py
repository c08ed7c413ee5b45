"""The `kiln` command. A thin shell: it builds Settings once, then calls into the package.

Heavy modules (SQLAlchemy, Alembic, asyncpg) are imported inside the commands that need them,
so `kiln --help` and `kiln version` stay instant.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Annotated, NoReturn

import typer

from kiln._version import __version__
from kiln.errors import KilnError
from kiln.settings import Settings

app = typer.Typer(
    name="kiln",
    help="Kiln: serverless Python functions on GPUs, with hardware-speed cold starts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def fail(error: KilnError, code: int = 1) -> NoReturn:
    typer.echo(f"error: {error.message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The one place the CLI reads the environment."""
    try:
        return Settings.from_env(os.environ)
    except KilnError as exc:
        fail(exc, code=2)


def client_settings() -> Settings:
    """Settings for commands that talk to a running Kiln: config.toml fills the gaps."""
    from kiln.cli.config import apply_client_config

    settings = load_settings()
    try:
        return apply_client_config(settings)
    except KilnError as exc:
        fail(exc, code=2)


@app.command()
def version() -> None:
    """Print the versions of kiln and Python."""
    typer.echo(f"kiln {__version__} (Python {platform.python_version()}, {sys.platform})")


@app.command()
def dev(
    port: Annotated[
        int | None, typer.Option(help="Router port (default: KILN_PORT or 8000).")
    ] = None,
) -> None:
    """Run the whole platform in the foreground; Ctrl-C stops everything it started."""
    from kiln.cli.dev import run_dev

    settings = load_settings()
    if port is not None:
        if not 1 <= port <= 65535:
            raise typer.BadParameter(f"{port} is not a port; use 1 to 65535", param_hint="--port")
        settings = settings.replace(port=port)
    try:
        run_dev(settings, echo=typer.echo)
    except KilnError as exc:
        fail(exc)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from kiln.db import migrate

    settings = client_settings()
    try:
        migrate.upgrade(settings, revision)
        typer.echo(f"database at {migrate.current(settings) or 'base'}")
    except KilnError as exc:
        fail(exc)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Revert migrations down to REVISION."""
    from kiln.db import migrate

    settings = client_settings()
    try:
        migrate.downgrade(settings, revision)
        typer.echo(f"database at {migrate.current(settings) or 'base'}")
    except KilnError as exc:
        fail(exc)


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from kiln.db import migrate

    settings = client_settings()
    try:
        typer.echo(migrate.current(settings) or "base")
    except KilnError as exc:
        fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
