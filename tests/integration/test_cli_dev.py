"""`kiln dev` as a user runs it: a real process, real signals, real servers, checked by pid."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from eventually import eventually

from kiln.devstack.ports import pick_port
from kiln.devstack.probes import postgres_answers
from kiln.devstack.process import is_gone

pytestmark = pytest.mark.devstack

READY = "kiln dev: ready"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(HOME=str(home), KILN_HOME=str(home), PYTHONUNBUFFERED="1")
    return env


class DevProcess:
    """One `kiln dev` child whose output a reader thread collects line by line."""

    def __init__(self, home: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = extra[extra.index("--port") + 1] if "--port" in extra else None
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "dev", *extra],
            env=env or clean_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        def seen() -> bool:
            return any(text in line for line in self.lines) or not self._reader.is_alive()

        with self._changed:
            self._changed.wait_for(seen, timeout_s)
            if not any(text in line for line in self.lines):
                raise AssertionError(f"no {text!r} from kiln dev; output:\n{self.output}")

    def finish(self, timeout_s: float = 90.0) -> int:
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def server_pids(self) -> list[int | None]:
        state = self.home / "dev" / "state.json"
        if not state.exists():
            return []
        return [entry["pid"] for entry in json.loads(state.read_text())["services"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevProcess]:
    process = DevProcess(tmp_path, "--port", str(pick_port([], set())))
    try:
        yield process
    finally:
        process.close()
        for pid in process.server_pids():
            if pid and not is_gone(pid):
                os.kill(pid, signal.SIGKILL)


def running_pids(dev: DevProcess) -> list[int]:
    pids = [pid for pid in dev.server_pids() if pid]
    assert len(pids) == 3
    return pids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_every_server(dev: DevProcess, sig: signal.Signals) -> None:
    dev.wait_for(READY)
    pids = running_pids(dev)
    assert all(not is_gone(pid) for pid in pids)
    dev.proc.send_signal(sig)
    assert dev.finish() == 0
    assert "kiln dev: stopped" in dev.output
    # Gone the moment kiln dev exits, and recorded as stopped: kiln dev stopped them itself
    # (the kernel's parent-death signal would only catch them afterwards).
    assert [pid for pid in pids if not is_gone(pid)] == []
    assert dev.server_pids() == [None, None, None]


def test_ready_banner_and_config(dev: DevProcess) -> None:
    dev.wait_for("Press Ctrl-C to stop.")
    config = tomllib.loads((dev.home / "config.toml").read_text())
    assert config["kiln"]["url"] == f"http://127.0.0.1:{dev.port}"
    assert config["kiln"]["api_key"].startswith("kiln_op_")
    assert config["kiln"]["api_key"] not in dev.output
    assert postgres_answers(config["services"]["database_url"])
    for name in ("NATS", "PostgreSQL", "Redis"):
        line = next(line for line in dev.lines if line.strip().startswith(name))
        assert "(embedded)" in line
    assert (dev.home / "config.toml").stat().st_mode & 0o077 == 0


def test_a_second_kiln_dev_is_refused_and_harms_nothing(dev: DevProcess) -> None:
    dev.wait_for(READY)
    pids = running_pids(dev)
    second = DevProcess(dev.home, "--port", str(pick_port([], set())))
    assert second.finish() == 1
    assert f"error: another kiln process (pid {dev.proc.pid}) is already running" in second.output
    assert all(not is_gone(pid) for pid in pids)
    assert dev.proc.poll() is None


def test_killed_kiln_dev_leaves_no_server(dev: DevProcess) -> None:
    dev.wait_for(READY)
    pids = running_pids(dev)
    dev.proc.send_signal(signal.SIGKILL)
    dev.proc.wait(10)
    asyncio.run(eventually(lambda: all(is_gone(pid) for pid in pids), within_s=15))


def test_restart_finds_its_data_again(dev: DevProcess) -> None:
    dev.wait_for(READY)
    first_key = tomllib.loads((dev.home / "config.toml").read_text())["kiln"]["api_key"]
    dev.proc.send_signal(signal.SIGINT)
    assert dev.finish() == 0

    again = DevProcess(dev.home, "--port", str(pick_port([], set())))
    try:
        again.wait_for(READY)
        # The operator key is reused only if its hash is still in the database: the data
        # directory, not just config.toml, survived.
        second_key = tomllib.loads((dev.home / "config.toml").read_text())["kiln"]["api_key"]
        assert second_key == first_key
        again.proc.send_signal(signal.SIGINT)
        assert again.finish() == 0
    finally:
        again.close()


def test_bad_setting_fails_before_starting_anything(tmp_path: Path) -> None:
    env = clean_env(tmp_path) | {"KILN_PORT": "eighty"}
    bad = DevProcess(tmp_path, env=env)
    assert bad.finish() == 2
    assert bad.output.strip() == (
        "error: KILN_PORT='eighty' is not valid: expected an integer from 1 to 65535."
    )
    assert not (tmp_path / "dev").exists()


def test_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "version"],
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("kiln 0.1.0 (Python ")


def test_failed_start_reports_the_error_and_stops_the_servers(tmp_path: Path) -> None:
    env = clean_env(tmp_path) | {"KILN_DATABASE_URL": "postgresql://u@127.0.0.1:1/kiln"}
    failed = DevProcess(tmp_path, "--port", str(pick_port([], set())), env=env)
    assert failed.finish() == 1
    assert "error: cannot connect to PostgreSQL at postgresql+asyncpg://u@127.0.0.1:1/kiln" in (
        failed.output
    )
    assert "Traceback" not in failed.output
    # NATS and Redis were started (the database was external) and stopped again.
    assert failed.server_pids() == [None, None]


def test_the_console_its_operator_and_mail_links(dev: DevProcess) -> None:
    """`kiln dev` prints the console's URL and its operator's password (once); mail without an
    SMTP server goes to a file, and kiln dev prints its link."""
    import re

    import httpx

    dev.wait_for("Press Ctrl-C to stop.")
    url = f"http://127.0.0.1:{dev.port}"
    assert f"Console     {url}/console/" in dev.output
    found = re.search(r"operator (\S+), password (\S+)  \(shown once\)", dev.output)
    assert found is not None, dev.output
    email, password = found.groups()
    with httpx.Client(base_url=url, headers={"Origin": url}) as browser:
        page = browser.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        signed_in = browser.post(
            "/console/login",
            data={"csrf": csrf.group(1), "email": email, "password": password, "next": ""},
        )
        assert signed_in.status_code == 303
        home = browser.get("/console/", follow_redirects=True)
        assert home.status_code == 200
        assert "<h1>Customers</h1>" in home.text
        asked = browser.post("/console/forgot", data={"csrf": csrf.group(1), "email": email})
        assert asked.status_code == 200
    dev.wait_for(f"its link: {url}/console/reset?token=")
    assert list((dev.home / "mail").glob("*-reset-operator@kiln.local.eml"))
