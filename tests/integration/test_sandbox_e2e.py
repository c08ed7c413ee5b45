"""A hostile function in a sandbox: each attack is refused and the platform is unharmed (a
bystander function on the same node keeps answering after every one).

Needs bubblewrap, setpriv and root (the node agent gives each sandbox a uid of its own); the
memory and fork-bomb tests also need writable cgroups."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from eventually import eventually
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform

from kiln.db.models import Function, Replica
from kiln.invoker.sandbox import cgroup_root

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or shutil.which("setpriv") is None,
        reason="sandboxes need bubblewrap and setpriv: apt-get install bubblewrap util-linux",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need the node agent to run as root"),
]
needs_cgroups = pytest.mark.skipif(
    cgroup_root() is None, reason="memory and process caps need writable cgroups (run as root)"
)

HOSTILE = """
import ctypes
import errno
import os
import socket
import threading
import time

import kiln

app = kiln.App("hostile")


def _look(path: str) -> str:
    try:
        return "listed: " + ",".join(sorted(os.listdir(path))[:5])
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "denied"


def _connect(host: str, port: int) -> str:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"failed: {exc}"
    return "connected"


@app.function(memory_mb=256, idle_timeout=120, max_replicas=1)
def probe(
    what: str, paths: list[str] | None = None, pid: int = 0, targets: list | None = None
) -> dict:
    if what == "connect":
        return {f"{host}:{port}": _connect(host, port) for host, port in targets or []}
    if what == "whoami":
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {
            "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "uid_map": [line.split() for line in open("/proc/self/uid_map")],
            "caps": [status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd")],
            "no_new_privs": status["NoNewPrivs"].strip(),
        }
    if what == "files":
        return {path: _look(path) for path in paths or []}
    if what == "processes":
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        secrets = []
        for p in pids:
            try:
                environ = open(f"/proc/{p}/environ", "rb").read()
            except OSError:
                continue
            secrets += [k for k in (b"KILN_DATABASE_URL", b"KILN_API_KEY_PEPPER",
                                    b"KILN_SNAPSHOT_SIGNING_KEY") if k in environ]
        return {"count": len(pids), "secrets": sorted(set(s.decode() for s in secrets))}
    if what == "signal":
        try:
            os.kill(pid, 0)
            signalled = "delivered"
        except ProcessLookupError:
            signalled = "no such process"
        except PermissionError:
            signalled = "denied"
        libc = ctypes.CDLL(None, use_errno=True)
        traced = libc.ptrace(16, pid, 0, 0)  # PTRACE_ATTACH
        return {"signal": signalled, "ptrace": traced, "errno": ctypes.get_errno()}
    if what == "memory":
        hoard = []
        for _ in range(64):  # 64 x 16 MiB, well past memory_mb=256
            hoard.append(bytearray(16 * 2**20))
            hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])
        return {"held_mib": 16 * len(hoard)}
    if what == "forkbomb":
        # Threads count against the process cap as processes do, and cost little memory: once
        # they fill it, a fork is refused too.
        threads = 0
        stop = threading.Event()
        try:
            for _ in range(20000):
                threading.Thread(target=stop.wait, daemon=True).start()
                threads += 1
        except RuntimeError:
            pass
        forked, refused = 0, None
        while refused is None and forked < 200:  # children hold their slots while they sleep
            try:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                forked += 1
            except OSError as exc:
                refused = errno.errorcode.get(exc.errno, str(exc.errno))
        stop.set()
        return {"threads": threads, "forked": forked, "refused": refused}
    raise ValueError(what)
"""

BYSTANDER = """
import kiln

app = kiln.App("bystander")


@app.function(idle_timeout=120)
def hello() -> str:
    return "still here"
"""


@pytest.fixture(scope="module", autouse=True)
async def _deployed(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("hostile")
    await platform.deploy_source(directory, "hostile.py", HOSTILE)
    await platform.deploy_source(directory, "bystander.py", BYSTANDER)
    await bystander_answers(platform)


async def probe(platform: Platform, what: str, **kwargs: Any) -> dict[str, Any]:
    response = await platform.call("hostile/probe", json={"what": what, **kwargs})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def bystander_answers(platform: Platform) -> None:
    response = await platform.call("bystander/hello")
    assert response.status_code == 200, response.text
    assert response.json() == "still here"


async def test_it_runs_under_an_unprivileged_uid_in_a_user_namespace_of_its_own(
    platform: Platform,
) -> None:
    found = await probe(platform, "whoami")
    uid = found["uid"]
    assert uid >= platform.settings.sandbox_uid_base
    assert found["gid"] == uid
    assert found["groups"] in ([], [uid])
    # A user namespace of its own: its uid and root (which only built the sandbox) are
    # themselves, nothing else of the host's uids exists there; no capabilities, none to gain.
    assert found["uid_map"] == [["0", "0", "1"], [str(uid), str(uid), "1"]]
    assert found["caps"] == ["0000000000000000"] * 3
    assert found["no_new_privs"] == "1"
    await bystander_answers(platform)


async def test_it_sees_no_other_replica_nor_the_caches_nor_the_agents_home(
    platform: Platform,
) -> None:
    home = platform.settings.home
    boxes = {p.name for p in (home / "sandboxes").iterdir()}
    assert len(boxes) >= 2  # the bystander's and the hostile function's, at least
    paths = [
        str(home), str(home / "snapshots"), str(home / "node" / "code"), str(home / "replicas"),
        str(home / "sandboxes"), *(str(home / "sandboxes" / box) for box in boxes), "/root",
        "/etc", "/home", str(Path(__file__).parent),
    ]  # fmt: skip
    found = await probe(platform, "files", paths=paths)
    shown = {
        name
        for outcome in found.values()
        if outcome.startswith("listed: ")
        for name in outcome.removeprefix("listed: ").split(",")
    }
    # Only the directories on the way to its own box exist in its view: one box, no caches,
    # no agent files, nothing of the host's homes or secrets.
    assert len(shown & boxes) <= 1, found
    assert not shown & {"snapshots", "node", "replicas", "config.toml", "dev", ".ssh"}, found
    assert not shown & {"shadow", "gshadow", "sudoers", "ssh"}, found
    assert found[str(home / "snapshots")] == "missing"
    assert found[str(Path(__file__).parent)] == "missing"  # the platform's tests and sources
    await bystander_answers(platform)


async def test_it_sees_only_its_own_processes_and_no_secrets(platform: Platform) -> None:
    found = await probe(platform, "processes")
    assert found["count"] <= 4  # bubblewrap and the replica (and maybe a helper)
    assert found["secrets"] == []
    await bystander_answers(platform)


async def test_it_can_neither_signal_nor_trace_a_process_outside(platform: Platform) -> None:
    found = await probe(platform, "signal", pid=os.getpid())  # the platform's own process
    assert found["signal"] in ("no such process", "denied")
    assert found["ptrace"] == -1
    await bystander_answers(platform)


@needs_cgroups
async def test_a_fork_bomb_is_capped(platform: Platform) -> None:
    found = await probe(platform, "forkbomb")
    assert found["threads"] < 20000
    assert found["refused"] == "EAGAIN", found
    await bystander_answers(platform)


@needs_cgroups
async def test_memory_past_its_cap_stops_the_replica_and_says_why(
    platform: Platform, engine: AsyncEngine
) -> None:
    response = await platform.call("hostile/probe", json={"what": "memory"})
    assert response.status_code >= 500, response.text
    await bystander_answers(platform)

    async def errors_recorded() -> list[str]:
        async with engine.connect() as conn:
            return [
                str(error)
                for error in await conn.scalars(
                    sa.select(Replica.error)
                    .join(Function, Function.id == Replica.function_id)
                    .where(Function.name == "probe", Replica.error.is_not(None))
                )
            ]

    errors = await eventually(errors_recorded, within_s=10)
    assert any("out of memory" in e and "memory_mb=256" in e for e in errors), errors
    # The function itself starts again for the next call.
    assert (await probe(platform, "whoami"))["uid"] >= platform.settings.sandbox_uid_base


@pytest.mark.skipif(shutil.which("iptables") is None, reason="egress rules need iptables")
async def test_it_cannot_reach_the_platforms_database_redis_or_metrics(platform: Platform) -> None:
    settings = platform.settings
    database, redis = urlsplit(str(settings.database_url)), urlsplit(str(settings.redis_url))
    nats = urlsplit(settings.nats_servers[0])
    with contextlib.ExitStack() as listeners:
        elsewhere = listeners.enter_context(socket.create_server(("127.0.0.1", 0)))
        with contextlib.suppress(OSError):  # something may serve the metrics port already
            listeners.enter_context(socket.create_server(("127.0.0.1", settings.metrics_port)))
        refused = {
            f"{database.hostname}:{database.port or 5432}",
            f"{redis.hostname}:{redis.port or 6379}",
            f"127.0.0.1:{settings.metrics_port}",
        }
        allowed = {f"{nats.hostname}:{nats.port}", f"127.0.0.1:{elsewhere.getsockname()[1]}"}
        targets = [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in refused | allowed]
        for host, port in targets:  # every one of them answers the platform
            socket.create_connection((host, port), timeout=3).close()
        found = await probe(platform, "connect", targets=targets)
    assert found == {**dict.fromkeys(refused, "refused"), **dict.fromkeys(allowed, "connected")}
    await bystander_answers(platform)
