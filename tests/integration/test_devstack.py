"""The embedded service stack: real servers start, answer, keep their data and never leak.

Every test here starts its own embedded NATS, PostgreSQL and Redis in a temporary directory,
whatever services the machine runs, because the stack itself is what is under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.devstack import DevStack
from kiln.devstack.probes import nats_answers, postgres_answers, redis_answers
from kiln.devstack.process import is_gone
from kiln.errors import DevStackBusy
from kiln.settings import Settings

pytestmark = pytest.mark.devstack


def bare_settings(home: Path) -> Settings:
    return Settings.from_env({"HOME": str(home), "KILN_HOME": str(home)})


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not is_gone(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if not is_gone(pid)]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # A failing test must not leave servers behind either.
    state = tmp_path / "dev" / "state.json"
    if state.exists():
        for record in json.loads(state.read_text())["services"].values():
            if record["pid"] and not is_gone(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)


def test_start_answers_and_stop_leaves_nothing(home: Path) -> None:
    stack = DevStack(bare_settings(home), durable=False)
    running = stack.start()
    try:
        pids = [entry.pid for entry in stack.state()]
        assert [entry.name for entry in stack.state()] == ["nats", "postgres", "redis"]
        assert nats_answers(running.nats_url or "")
        assert postgres_answers(running.database_url or "")
        assert redis_answers(running.redis_url or "")
        assert (running.database_url or "").endswith("/kiln")
    finally:
        stack.stop()
    assert wait_gone(pids, timeout_s=1) == []
    recorded = json.loads((home / "dev" / "state.json").read_text())["services"]
    assert all(record["pid"] is None for record in recorded.values())


def test_only_unset_services_are_started(home: Path) -> None:
    external = "redis://127.0.0.1:1/0"
    stack = DevStack(bare_settings(home).replace(redis_url=external), durable=False)
    with stack as running:
        assert [entry.name for entry in stack.state()] == ["nats", "postgres"]
        assert running.redis_url == external


def test_second_stack_on_the_same_directory_is_refused(home: Path) -> None:
    first = DevStack(bare_settings(home), durable=False)
    with first:
        second = DevStack(bare_settings(home), durable=False)
        with pytest.raises(DevStackBusy) as caught:
            second.start()
        assert caught.value.message == (
            f"another kiln process (pid {os.getpid()}) is already running the embedded services "
            f"in {(home / 'dev').resolve()}; stop it first (Ctrl-C in its terminal, or "
            f"`kill {os.getpid()}`), or set KILN_HOME to use another directory"
        )
        assert second.services == []
        assert all(not is_gone(entry.pid) for entry in first.state())


async def _write_everything(settings: Settings) -> None:
    import asyncpg
    import nats
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(settings.database_url)
    await conn.execute("CREATE TABLE kept (value text)")
    await conn.execute("INSERT INTO kept VALUES ('still here')")
    await conn.close()

    client = aioredis.Redis.from_url(settings.redis_url or "")
    await client.set("kept", "still here")
    await client.aclose()

    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await js.add_stream(name="kept", subjects=["kept.>"])
    await js.publish("kept.one", b"still here")
    await nc.close()


async def _read_everything(settings: Settings) -> tuple[object, object, object]:
    import asyncpg
    import nats
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(settings.database_url)
    row = await conn.fetchval("SELECT value FROM kept")
    await conn.close()

    client = aioredis.Redis.from_url(settings.redis_url or "")
    cached = await client.get("kept")
    await client.aclose()

    nc = await nats.connect(settings.nats_servers)
    message = await nc.jetstream().get_msg("kept", seq=1)
    await nc.close()
    return row, cached, message.data or b""


async def test_data_and_ports_survive_a_restart(home: Path) -> None:
    with DevStack(bare_settings(home)) as first:
        await _write_everything(first)
    with DevStack(bare_settings(home)) as second:
        assert (second.nats_url, second.database_url, second.redis_url) == (
            first.nats_url,
            first.database_url,
            first.redis_url,
        )
        assert await _read_everything(second) == ("still here", b"still here", b"still here")


CRASHING_OWNER = """
import json, sys, time
from pathlib import Path
from kiln.devstack import DevStack
from kiln.settings import Settings

home = Path(sys.argv[1])
stack = DevStack(Settings.from_env({"HOME": str(home), "KILN_HOME": str(home)}), durable=False)
stack.start()
print(json.dumps([entry.pid for entry in stack.state()]), flush=True)
time.sleep(600)
"""


def test_killed_owner_takes_its_servers_down(home: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", CRASHING_OWNER, str(home)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        pids = json.loads(owner.stdout.readline())
        assert len(pids) == 3
        assert all(not is_gone(pid) for pid in pids)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_gone(pids) == []
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    # The kernel released the lock with the dead owner: the next start just works.
    with DevStack(bare_settings(home), durable=False) as running:
        assert postgres_answers(running.database_url or "")


def test_a_stray_server_from_an_earlier_run_is_stopped(home: Path) -> None:
    dev = (home / "dev").resolve()
    dev.mkdir(parents=True)
    # Something that looks like a leaked server of this directory, and an unrelated process
    # that happens to carry a recorded pid: only the first may be stopped.
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(dev)])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        state = {
            "owner_pid": 1,
            "services": {
                "nats": {"pid": stray.pid, "ports": {}, "url": ""},
                "redis": {"pid": bystander.pid, "ports": {}, "url": ""},
            },
        }
        (dev / "state.json").write_text(json.dumps(state))
        with DevStack(bare_settings(home), durable=False):
            assert stray.wait(10) is not None
            assert bystander.poll() is None
    finally:
        for proc in (stray, bystander):
            proc.kill()
            proc.wait(10)
