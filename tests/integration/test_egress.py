"""The sandboxes' egress chain on a real firewall: a process under a sandbox uid is refused
what the policy refuses and reaches what it allows; other users are untouched; the chain goes
when the agent stops. Needs root and iptables (the agent's own requirements for it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.invoker.egress import Egress, remove_chains
from kiln.settings import EgressMode, Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("iptables") is None, reason="needs iptables: apt-get install iptables"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="firewall rules need root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

UIDS = (299_900, 299_909)
CONNECT = """
import socket, sys
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "connected")
    except ConnectionRefusedError:
        print(target, "refused")
"""


@pytest.fixture
def listeners() -> Iterator[list[int]]:
    """Three ports on 127.0.0.1 that accept connections: NATS, a database, somewhere else."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    try:
        yield [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def reached(uid: int | None, ports: list[int]) -> dict[int, str]:
    # Any Python the sandbox uid may run (the venv's may sit in a directory closed to it).
    python = shutil.which("python3", path="/usr/bin") or str(Path(sys.base_prefix) / "bin/python3")
    targets = [f"127.0.0.1:{port}" for port in ports]
    command = [python, "-c", CONNECT, *targets]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    return {int(line.split()[0].rpartition(":")[2]): line.split()[1] for line in out.splitlines()}


def policy(settings: Settings, mode: EgressMode, nats: int, database: int) -> Egress:
    chosen = settings.replace(
        sandbox_egress=mode,
        nats_url=f"nats://127.0.0.1:{nats}",
        database_url=f"postgresql://kiln@127.0.0.1:{database}/kiln",
        redis_url=None,
    )
    return Egress.for_node(chosen, first_uid=UIDS[0], last_uid=UIDS[1], tag=f"test/{os.getpid()}")


@pytest.mark.parametrize(
    ("mode", "elsewhere"), [(EgressMode.ALLOW, "connected"), (EgressMode.DENY, "refused")]
)
def test_a_sandbox_uid_reaches_nats_and_what_the_policy_allows(
    settings: Settings, listeners: list[int], mode: EgressMode, elsewhere: str
) -> None:
    nats, database, other = listeners
    egress = policy(settings, mode, nats, database)
    egress.install()
    try:
        assert reached(UIDS[0] + 3, listeners) == {
            nats: "connected", database: "refused", other: elsewhere,
        }  # fmt: skip
        # Only the sandboxes' uids: the platform and everyone else are untouched.
        assert set(reached(None, listeners).values()) == {"connected"}
        assert set(reached(UIDS[1] + 1, listeners).values()) == {"connected"}
    finally:
        egress.remove()
    assert set(reached(UIDS[0] + 3, listeners).values()) == {"connected"}
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True)
    assert egress.chain not in rules.stdout


def test_a_chain_left_by_a_crashed_agent_is_replaced_not_doubled(
    settings: Settings, listeners: list[int]
) -> None:
    nats, database, _ = listeners
    crashed = policy(settings, EgressMode.DENY, nats, database)
    crashed.install()
    again = policy(settings, EgressMode.ALLOW, nats, database)
    again.install()
    try:
        rules = subprocess.run(["iptables", "-w", "-S", "OUTPUT"], capture_output=True, text=True)
        assert rules.stdout.count(again.chain) == 1
        assert reached(UIDS[0], listeners)[listeners[2]] == "connected"  # the new policy's
    finally:
        again.remove()


def test_chains_a_killed_agent_left_are_found_by_their_comment_and_removed(
    settings: Settings, listeners: list[int]
) -> None:
    nats, database, _ = listeners
    left = policy(settings, EgressMode.ALLOW, nats, database)
    left.install()  # and never removed: its agent was killed
    # One per tool (iptables, and ip6tables where the node has it).
    assert remove_chains(f"kiln {settings.namespace} test/{os.getpid()}") == len(left.tools)
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True)
    assert left.chain not in rules.stdout
    assert set(reached(UIDS[0], listeners).values()) == {"connected"}
