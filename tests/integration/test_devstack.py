"""The embedded service stack: real servers start, answer, keep their data and never leak.

Every test here starts its own embedded NATS, PostgreSQL and Redis in a temporary directory,
whatever services the machine runs, because the stack itself is what is under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from eventually import eventually

from kiln._nats import connect_options
from kiln._tasks import cancel_and_wait
from kiln.devstack import DevStack
from kiln.devstack.ports import pick_port
from kiln.devstack.probes import nats_answers, postgres_answers, redis_answers
from kiln.devstack.process import is_gone
from kiln.devstack.redis import EmbeddedRedis
from kiln.devstack.supervisor import Supervisor
from kiln.errors import DevStackBusy, DevStackError
from kiln.settings import Settings

pytestmark = pytest.mark.devstack


def bare_settings(home: Path) -> Settings:
    return Settings.from_env({"HOME": str(home), "KILN_HOME": str(home)})


def recorded(home: Path) -> list[dict[str, Any]]:
    state = home / "dev" / "state.json"
    return json.loads(state.read_text())["services"] if state.exists() else []


def still_running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if not is_gone(pid)]


def all_gone(pids: list[int]) -> bool:
    """A check for `eventually`."""
    assert still_running(pids) == []
    return True


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # A failing test must not leave servers behind either.
    for entry in recorded(tmp_path):
        if entry["pid"] and not is_gone(entry["pid"]):
            os.kill(entry["pid"], signal.SIGKILL)


def test_start_answers_and_stop_leaves_nothing(home: Path) -> None:
    stack = DevStack(bare_settings(home), durable=False)
    running = stack.start()
    try:
        pids = [entry.pid for entry in stack.state() if entry.pid]
        assert len(pids) == 3
        assert [entry.name for entry in stack.state()] == ["nats", "postgres", "redis"]
        assert nats_answers(running.nats_url or "", have_credentials=True)
        assert postgres_answers(running.database_url or "")
        assert redis_answers(running.redis_url or "")
        assert "/kiln?" in (running.database_url or "")
    finally:
        stack.stop()
    # Gone the moment stop() returns: stopped and reaped by us, not later by the kernel's
    # parent-death signal.
    assert still_running(pids) == []
    assert [entry["pid"] for entry in recorded(home)] == [None, None, None]


async def test_a_server_that_dies_is_started_again_on_its_data_and_counted(home: Path) -> None:
    stack = DevStack(bare_settings(home), durable=False)
    running = stack.start()
    supervisor = Supervisor(stack.services, on_restart=stack.record_state)
    watching = asyncio.create_task(supervisor.run())
    answers = {
        "nats": lambda: nats_answers(running.nats_url or "", have_credentials=True),
        "postgres": lambda: postgres_answers(running.database_url or ""),
        "redis": lambda: redis_answers(running.redis_url or ""),
    }
    try:
        for service in stack.services:
            assert service.process is not None
            dead = service.process.pid
            os.kill(dead, signal.SIGKILL)  # a crash: PostgreSQL leaves its postmaster.pid
            restarts = supervisor.restarts.labels(service.name)

            def back() -> bool:
                return restarts._value.get() >= 1 and answers[service.name]()  # noqa: B023

            await eventually(back, within_s=60, what=f"{service.name} came back")
            entry = next(e for e in recorded(home) if e["name"] == service.name)
            assert entry["pid"] == service.process.pid != dead  # the stray check knows it
            assert service.url == next(e.url for e in stack.state() if e.name == service.name)
    finally:
        await cancel_and_wait(watching)
        stack.stop()


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
        assert all(entry.pid and not is_gone(entry.pid) for entry in first.state())


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

    nc = await nats.connect(**connect_options(settings))
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

    nc = await nats.connect(**connect_options(settings))
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
from kiln.devstack.redis import EmbeddedRedis
from kiln.devstack.supervisor import Supervisor
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
        asyncio.run(eventually(lambda: all_gone(pids), within_s=15))
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    # The kernel released the lock with the dead owner: the next start just works.
    with DevStack(bare_settings(home), durable=False) as running:
        assert postgres_answers(running.database_url or "")


SLEEPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_DFL); time.sleep(600)"


def _shows(cmdline: list[str], args: tuple[str, ...]) -> bool:
    """The child's command line is visible (it is empty until exec is done) and ends in args."""
    return bool(cmdline) and cmdline[len(cmdline) - len(args) :] == list(args)


def start_sleeper(*args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *args])
    asyncio.run(eventually(lambda: _shows(psutil.Process(proc.pid).cmdline(), args), within_s=10))
    return proc


def test_a_stray_server_from_an_earlier_run_is_stopped(home: Path) -> None:
    dev = (home / "dev").resolve()
    dev.mkdir(parents=True)
    # A leaked server of this directory, a process with a reused pid (wrong start time), and an
    # unrelated process: only the first may be stopped.
    stray = start_sleeper(str(dev / "nats"))
    reused = start_sleeper(str(dev / "postgres"))
    bystander = start_sleeper()
    try:

        def entry(name: str, proc: subprocess.Popen[bytes], create_time: float) -> object:
            return {"name": name, "pid": proc.pid, "create_time": create_time, "ports": {},
                    "url": ""}  # fmt: skip

        services = [
            entry("nats", stray, psutil.Process(stray.pid).create_time()),
            entry("postgres", reused, psutil.Process(reused.pid).create_time() - 100),
            entry("redis", bystander, psutil.Process(bystander.pid).create_time()),
        ]
        (dev / "state.json").write_text(json.dumps({"owner_pid": 1, "services": services}))
        with DevStack(bare_settings(home), durable=False):
            assert stray.wait(10) is not None
            assert reused.poll() is None
            assert bystander.poll() is None
    finally:
        for proc in (stray, reused, bystander):
            proc.kill()
            proc.wait(10)


def test_a_stale_postmaster_is_stopped(home: Path) -> None:
    with DevStack(bare_settings(home), durable=False):
        pass
    data_dir = (home / "dev" / "postgres").resolve()
    stale = start_sleeper("-D", str(data_dir))
    try:
        (data_dir / "postmaster.pid").write_text(f"{stale.pid}\n{data_dir}\n")
        with DevStack(bare_settings(home), durable=False) as running:
            assert stale.wait(10) is not None
            assert postgres_answers(running.database_url or "")
    finally:
        stale.kill()
        stale.wait(10)


def test_failure_mid_start_stops_what_already_started(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []

    def broken_start(self: EmbeddedRedis, timeout_s: float) -> None:
        started.extend(entry["pid"] for entry in recorded(home))
        raise DevStackError("redis would not start")

    monkeypatch.setattr(EmbeddedRedis, "start", broken_start)
    stack = DevStack(bare_settings(home), durable=False)
    with pytest.raises(DevStackError, match="redis would not start"):
        stack.start()
    assert len(started) == 2
    assert still_running(started) == []
    assert stack.services == []
    # The lock was released with the failure: the next start is not refused.
    monkeypatch.undo()
    with DevStack(bare_settings(home), durable=False) as running:
        assert redis_answers(running.redis_url or "")


def test_a_port_taken_after_it_was_chosen_is_replaced(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program may bind a port between our choice and the server's bind."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]

        def first_choice_is_taken(preferred: list[int | None], taken: set[int]) -> int:
            # First attempts (which pass preferred ports) all get the squatted port.
            return busy if preferred else pick_port([], taken)

        monkeypatch.setattr("kiln.devstack.stack.pick_port", first_choice_is_taken)
        stack = DevStack(bare_settings(home), durable=False)
        with stack as running:
            assert all(busy not in entry.ports.values() for entry in stack.state())
            assert nats_answers(running.nats_url or "", have_credentials=True)
            assert postgres_answers(running.database_url or "")
            assert redis_answers(running.redis_url or "")
