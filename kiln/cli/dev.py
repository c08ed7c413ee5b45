"""`kiln dev`: the whole platform in the foreground on this machine.

Phases: take the data directory's lock, start the embedded services that no `KILN_*_URL`
replaces, migrate the database, make sure an operator key exists, write config.toml, run the
router, scheduler and a node agent until SIGINT/SIGTERM/SIGHUP, then stop everything in reverse
order. A second signal during the stop
does not interrupt it; a SIGKILL still takes the servers down (see kiln.devstack.process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType

from kiln import _loop
from kiln.config_file import ClientConfig, read_config, write_config
from kiln.devstack import DevStack, embedded_services
from kiln.devstack.secrets import with_dev_secrets
from kiln.settings import Settings, mask_url

__all__ = ["run_dev"]

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _say(line: str) -> None:
    # os.write, not print: a signal handler may interrupt a print in progress.
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode())


def _say_already_stopping() -> None:
    _say("kiln dev: already stopping, please wait")


class _Shutdown:
    """Turns the first shutdown signal into KeyboardInterrupt and ignores the ones after it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signals: list[signal.Signals] = []

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            _say_already_stopping()
            return
        self.requested.set()
        raise KeyboardInterrupt

    def reinstall(self) -> None:
        """After the event loop ends (it resets the handlers it used), signals during the final
        stop are ignored again."""
        self.requested.set()
        for sig in self.signals:
            signal.signal(sig, self.handle)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # A SIGHUP ignored by our parent (`nohup kiln dev &`) stays ignored. SIGINT and SIGTERM
        # always stop kiln dev, even when a shell started it in the background with SIGINT
        # ignored.
        self.signals = [
            s for s in _SHUTDOWN_SIGNALS
            if s is not signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN
        ]  # fmt: skip
        previous = {sig: signal.signal(sig, self.handle) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_dev(
    settings: Settings,
    echo: Callable[[str], None],
    after_ready: Callable[[Settings, str], Awaitable[None]] | None = None,
) -> None:
    """Run the platform until a signal. `after_ready(settings, api_key)`, if given, runs once
    the router answers (kiln demo deploys and calls an app there)."""
    from kiln.db import bootstrap, migrate

    shutdown = _Shutdown()
    started = time.monotonic()
    embedded = embedded_services(settings)
    stack = DevStack(settings)
    with shutdown.installed():
        try:
            with stack as running:
                running = with_dev_secrets(running)
                migrate.upgrade(running)
                config_path = running.config_file
                known_key = read_config(config_path).api_key
                api_key = asyncio.run(bootstrap.ensure_operator_key(running, known_key))
                operator_password = asyncio.run(bootstrap.ensure_console_operator(running))
                _echo_mail(echo)
                url = f"http://{running.host}:{running.port}"
                write_config(
                    config_path,
                    ClientConfig(
                        url=url,
                        api_key=api_key,
                        services={
                            "nats_url": running.nats_url or "",
                            **(
                                {"nats_creds": str(running.nats_creds)}
                                if running.nats_creds
                                else {}
                            ),
                            "database_url": running.database_url or "",
                            "redis_url": running.redis_url or "",
                        },
                    ),
                )

                def ready() -> None:
                    _print_banner(echo, running, embedded, url, time.monotonic() - started)
                    _print_console(echo, running, url, operator_password)
                    echo("Press Ctrl-C to stop.")

                then = None if after_ready is None else after_ready(running, api_key)
                _loop.run(_serve(running, stack, shutdown, ready, then))
                shutdown.reinstall()
        except KeyboardInterrupt:
            pass
    echo("kiln dev: stopped")


class _Echo(logging.Handler):
    def __init__(self, echo: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        self.echo(f"kiln dev: {record.getMessage()}")


def _echo_mail(echo: Callable[[str], None]) -> None:
    """Print each mail the console writes to a file, with its link: without an SMTP server,
    this is how the person at the terminal confirms an address or resets a password."""
    mail = logging.getLogger("kiln.console.mail")
    mail.setLevel(logging.INFO)
    mail.addHandler(_Echo(echo))


def _print_console(
    echo: Callable[[str], None], settings: Settings, url: str, password: str | None
) -> None:
    from kiln.db.bootstrap import CONSOLE_OPERATOR

    echo(f"  Console     {url}/console/")
    if password is not None:
        echo(f"              operator {CONSOLE_OPERATOR}, password {password}  (shown once)")
    else:
        echo(f"              operator {CONSOLE_OPERATOR}  (forgot its password? \"Forgot your "
             f"password\" mails a link to {settings.home / 'mail'})")  # fmt: skip


async def _serve(
    settings: Settings,
    stack: DevStack,
    shutdown: _Shutdown,
    ready: Callable[[], None],
    then: Awaitable[None] | None,
) -> None:
    """The serving phase: signals now set an event that stops the platform in order; the
    embedded servers are restarted should one exit."""
    from kiln._tasks import cancel_and_wait
    from kiln.devstack.supervisor import Supervisor
    from kiln.platform import serve_platform

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if shutdown.requested.is_set():
            _say_already_stopping()
            return
        shutdown.requested.set()
        stop.set()

    for sig in shutdown.signals:
        loop.add_signal_handler(sig, on_signal)
    extra: list[asyncio.Task[None]] = []

    def started() -> None:
        ready()
        if then is not None:
            extra.append(asyncio.ensure_future(_report_failure(then)))

    supervisor = Supervisor(
        stack.services, start_timeout_s=stack.start_timeout_s, on_restart=stack.record_state
    )
    watching = asyncio.create_task(supervisor.run(), name="kiln-dev-supervisor")
    try:
        await serve_platform(settings, stop, on_ready=started, registries=[supervisor.registry])
    finally:
        await cancel_and_wait(watching, *extra)


async def _report_failure(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception as exc:  # noqa: BLE001 - the platform keeps serving; say what failed
        _say(f"kiln dev: {type(exc).__name__}: {exc}")


def _print_banner(
    echo: Callable[[str], None],
    settings: Settings,
    embedded: list[str],
    url: str,
    elapsed_s: float,
) -> None:
    def origin(name: str) -> str:
        return "embedded" if name in embedded else "external"

    echo(f"kiln dev: ready in {elapsed_s:.2f} s")
    echo(f"  NATS        {mask_url(settings.nats_url or '')}  ({origin('nats')})")
    echo(f"  PostgreSQL  {mask_url(settings.database_url or '')}  ({origin('postgres')})")
    echo(f"  Redis       {mask_url(settings.redis_url or '')}  ({origin('redis')})")
    echo(f"  Router      {url}")
    echo(f"  Config      {settings.config_file}  (router URL and an operator API key)")
    echo(f"  Data        {settings.dev_dir}")
