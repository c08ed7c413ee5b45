"""The `kiln` command. A thin shell: it builds Settings once, then calls into the package.

Heavy modules (SQLAlchemy, Alembic, asyncpg) are imported inside the commands that need them,
so `kiln --help` and `kiln version` stay instant.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from kiln._version import __version__
from kiln.cli import invoices as _invoices  # noqa: F401 - its commands join billing_app
from kiln.cli.access import customers_app, keys_app, plans_app
from kiln.cli.billing import billing_app
from kiln.cli.catalog import catalog_app
from kiln.cli.nats import nats_app
from kiln.cli.observe import calls, logs
from kiln.cli.output import JsonFlag, echo_json, echo_table
from kiln.cli.pods import pods_app
from kiln.cli.shell import shell
from kiln.errors import ConfigError, KilnError
from kiln.settings import Settings

app = typer.Typer(
    name="kiln",
    help="Kiln: serverless Python functions on GPUs, with hardware-speed cold starts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(
    help="The database: schema migrations and the first console operator.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(customers_app, name="customers")
app.add_typer(plans_app, name="plans")
app.add_typer(keys_app, name="keys")
app.add_typer(billing_app, name="billing")
app.add_typer(catalog_app, name="catalog")
app.add_typer(nats_app, name="nats")
app.add_typer(pods_app, name="pods")
app.command()(logs)
app.command()(shell)
app.command()(calls)


def load_settings() -> Settings:
    """The one place the CLI reads the environment."""
    return Settings.from_env(os.environ)


def client_settings() -> Settings:
    """Settings for commands that reach a running Kiln's services: config.toml fills the gaps."""
    from kiln.client import client_settings as with_config

    return with_config(load_settings())


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


@app.command()
def demo(
    file: Annotated[Path, typer.Argument(help="The app to deploy.", exists=True, dir_okay=False)],
    call: Annotated[
        list[str] | None, typer.Option(help="NAME=JSON: an entry point to time, repeatable.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Router port.")] = None,
    chat_model: Annotated[
        str | None,
        typer.Option(
            help="Also deploy the catalog's chat entry with this model (a Hugging Face id, a "
            "folder, or `tiny`: a small random model built here) and time its first token "
            "through OpenAI's client."
        ),
    ] = None,
) -> None:
    """Run `kiln dev`, deploy FILE, time one cold and several warm calls of each --call."""
    from kiln.cli.demo import TINY, chat_model_folder, parse_calls, run_demo
    from kiln.cli.dev import run_dev

    calls = parse_calls(call or [])
    settings = load_settings()
    if port is not None:
        settings = settings.replace(port=port)
    if chat_model == TINY:
        from kiln.catalog.tiny import tiny_chat_model

        chat_model = str(tiny_chat_model(chat_model_folder(settings)))
    if chat_model is not None and Path(chat_model).is_dir():  # sandboxes must be shown it
        folder = Path(chat_model).resolve()
        settings = settings.replace(sandbox_share=(*settings.sandbox_share, folder))
        chat_model = str(folder)
    run_dev(
        settings,
        echo=typer.echo,
        after_ready=lambda running, key: run_demo(
            running, key, file, calls, typer.echo, chat_model=chat_model
        ),
    )


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


@db_app.command("operator")
def db_operator(
    email: Annotated[str, typer.Argument(help="The operator's address, e.g. ops@example.com.")],
) -> None:
    """Make a console operator user (for a platform's first one; `kiln dev` makes its own) and
    print its password, this once."""
    import asyncio

    from kiln.db.bootstrap import ensure_console_operator

    password = asyncio.run(ensure_console_operator(client_settings(), email))
    if password is None:
        typer.echo(f'{email} already has a console account; "Forgot your password?" resets it')
        raise typer.Exit(1)
    typer.echo(f"operator {email.strip().lower()} made; password {password} (shown once)")


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from kiln.db import migrate

    typer.echo(migrate.current(client_settings()) or "base")


@app.command()
def deploy(
    file: Annotated[
        Path,
        typer.Argument(
            help="The app file, e.g. app.py.", exists=True, dir_okay=False, readable=True
        ),
    ],
    reset_scaling: Annotated[
        bool,
        typer.Option(
            "--reset-scaling",
            help="Replace live scaling changes (kiln scale) with the values in the code.",
        ),
    ] = False,
) -> None:
    """Package the app in FILE with its local modules, deploy it, and print its URLs."""
    from kiln.client import connect
    from kiln.functions.package import package

    pkg = package(file)
    body = pkg.deploy_body(reset_scaling=reset_scaling)
    with connect(settings=load_settings()) as api:
        result = api.request("POST", "/v1/apps", json=body).json()
    verb = "unchanged" if result["unchanged"] else "deployed"
    typer.echo(f"{verb} {result['app']} version {result['version']} ({len(pkg.files)} files)")
    for endpoint in result["endpoints"]:
        typer.echo(f"  {endpoint['name']:<24} POST {endpoint['url']}")
    for name, kept in result.get("kept_settings", {}).items():
        values = ", ".join(f"{k}={v}" for k, v in kept.items())
        typer.echo(
            f"  {name}: kept the live settings {values} (from kiln scale); "
            "deploy with --reset-scaling to use the code's"
        )


@app.command()
def call(
    target: Annotated[str, typer.Argument(help="APP/FUNCTION or APP/Class.method")],
    data: Annotated[str, typer.Argument(help="JSON object of keyword arguments.")] = "{}",
    stream: Annotated[
        bool, typer.Option("--stream", help="A generator: print each item as it arrives.")
    ] = False,
) -> None:
    """Call a function and print its result."""
    from kiln.client import connect

    app_name, slash, name = target.partition("/")
    if not slash or not app_name or not name:
        raise typer.BadParameter(f"{target!r} is not APP/FUNCTION or APP/Class.method")
    path = f"/v1/run/{app_name}/{name}"
    headers = {"Content-Type": "application/json"}
    with connect(settings=load_settings()) as api:
        if stream:
            for item in api.stream_items("POST", path, content=data.encode(), headers=headers):
                if "data" in item:
                    typer.echo(json.dumps(item["data"]))
            return
        response = api.request("POST", path, content=data.encode(), headers=headers)
    if response.headers.get("content-type", "").startswith("application/json"):
        typer.echo(response.text)
    else:
        sys.stdout.buffer.write(response.content)


@app.command()
def scale(
    target: Annotated[str, typer.Argument(help="APP/FUNCTION (a class: APP/Class)")],
    min_replicas: Annotated[int | None, typer.Option("--min", help="min_replicas")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="max_replicas")] = None,
    buffer: Annotated[int | None, typer.Option("--buffer", help="buffer_replicas")] = None,
    idle_timeout: Annotated[
        int | None, typer.Option("--idle-timeout", help="seconds idle before scale-down")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="calls in flight per replica")
    ] = None,
    target_concurrency: Annotated[
        int | None, typer.Option("--target-concurrency", help="calls per replica to scale for")
    ] = None,
) -> None:
    """Change a function's scaling live; it holds across restarts and redeploys."""
    from kiln.client import connect

    app_name, slash, name = target.partition("/")
    if not slash or not app_name or not name or "/" in name:
        raise typer.BadParameter(f"{target!r} is not APP/FUNCTION or APP/Class")
    changes = {
        key: value
        for key, value in (
            ("min_replicas", min_replicas), ("max_replicas", max_replicas),
            ("buffer_replicas", buffer), ("idle_timeout", idle_timeout),
            ("concurrency", concurrency), ("target_concurrency", target_concurrency),
        )
        if value is not None
    }  # fmt: skip
    if not changes:
        raise typer.BadParameter(
            "nothing to change: give one or more of --min, --max, --buffer, --idle-timeout, "
            "--concurrency, --target-concurrency"
        )
    with connect(settings=load_settings()) as api:
        fn = api.request("PATCH", f"/v1/functions/{app_name}/{name}", json=changes).json()
    typer.echo(
        f"{fn['app']}/{fn['name']}: min {fn['min_replicas']}, max {fn['max_replicas']}, "
        f"buffer {fn['buffer_replicas']}, idle timeout {fn['idle_timeout']}s, concurrency "
        f"{fn['concurrency']} (target {fn['target_concurrency']}); {fn['replicas']} live"
    )


@app.command()
def apps(as_json: JsonFlag = False) -> None:
    """List apps with their current version and state."""
    from kiln.client import connect

    with connect(settings=load_settings()) as api:
        found = api.request("GET", "/v1/apps").json()["apps"]
    if as_json:
        echo_json(found)
        return
    rows = [
        (a["name"], str(a["version"] or "-"), a["state"], (a["digest"] or "-")[:12],
         a["updated_at"][:19].replace("T", " "))
        for a in found
    ]  # fmt: skip
    echo_table(("APP", "VERSION", "STATE", "DIGEST", "UPDATED"), rows)


@app.command()
def stop(app_name: Annotated[str, typer.Argument(metavar="APP", help="The app to stop.")]) -> None:
    """Stop an app and remove it: its replicas drain (calls in flight finish), its routes go."""
    from kiln.client import connect

    with connect(settings=load_settings()) as api:
        api.request("DELETE", f"/v1/apps/{app_name}")
    typer.echo(f"stopped {app_name}: its replicas drain and its routes are gone")


@app.command()
def ps(as_json: JsonFlag = False) -> None:
    """List functions with their replicas."""
    from kiln.client import connect

    with connect(settings=load_settings()) as api:
        functions = api.request("GET", "/v1/functions").json()["functions"]
        for fn in functions:
            path = f"/v1/functions/{fn['app']}/{fn['name']}/replicas"
            fn_replicas = api.request("GET", path).json()["replicas"] if fn["replicas"] else []
            fn["live_replicas"] = fn_replicas
    if as_json:
        echo_json(functions)
        return
    rows = [
        (f"{fn['app']}/{fn['name']}", fn["kind"], fn["gpu"], str(fn["replicas"]),
         str(fn["min_replicas"]), str(fn["max_replicas"]), f"{fn['idle_timeout']}s")
        for fn in functions
    ]  # fmt: skip
    echo_table(("FUNCTION", "KIND", "GPU", "REPLICAS", "MIN", "MAX", "IDLE"), rows)
    for fn in functions:
        for replica in fn["live_replicas"]:
            typer.echo(
                f"  {fn['app']}/{fn['name']}  {replica['id'][:8]}  {replica['state']:<9}"
                f"  node {replica['node']}{_gpu(replica)}  in flight "
                f"{replica['in_flight']}  up {_duration(replica.get('uptime_s'))}"
                f"{_idle(replica.get('idle_s'))}{_origin(replica.get('origin'))}"
            )


def _gpu(replica: dict[str, Any]) -> str:
    if not replica.get("gpu"):
        return ""
    indices = ",".join(str(i) for i in replica.get("gpu_indices") or [])
    return f"  gpu {replica['gpu']}" + (f" [{indices}]" if indices else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _idle(seconds: float | None) -> str:
    return "" if seconds is None else f"  idle {_duration(seconds)}"


def _origin(origin: str | None) -> str:
    """How `kiln ps` says where a replica's state came from."""
    shown = {
        "snapshot": "from snapshot",
        "baked": "hooks ran, snapshot baked",
        "hooks": "hooks ran",
        "fallback": "hooks ran (snapshot failed)",
    }
    return f"  {shown.get(origin or '', origin)}" if origin else ""


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
