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
from kiln.errors import ConfigError, KilnError
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


def load_settings() -> Settings:
    """The one place the CLI reads the environment."""
    return Settings.from_env(os.environ)


def client_settings() -> Settings:
    """Settings for commands that talk to a running Kiln: config.toml fills the gaps."""
    from kiln.cli.config import apply_client_config

    return apply_client_config(load_settings())


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
    run_dev(settings, echo=typer.echo)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from kiln.db import migrate

    settings = client_settings()
    migrate.upgrade(settings, revision)
    typer.echo(f"database at {migrate.current(settings) or 'base'}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Revert migrations down to REVISION."""
    from kiln.db import migrate

    settings = client_settings()
    migrate.downgrade(settings, revision)
    typer.echo(f"database at {migrate.current(settings) or 'base'}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from kiln.db import migrate

    typer.echo(migrate.current(client_settings()) or "base")


def main() -> NoReturn:
    """Run the CLI. Every Kiln error ends here, as one line on stderr and an exit status:
    2 for invalid settings or config.toml, 1 for anything else."""
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except KilnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
