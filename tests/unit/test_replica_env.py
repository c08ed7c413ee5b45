"""What a node agent starts replicas and standbys with: OpenMP's idle threads sleep instead of
spinning (the cores are shared), the pools are as wide as a CPU cap and leave a core to the
platform on a host it shares, and a function's own env overrides all of it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kiln.invoker.agent import NodeAgent
from kiln.invoker.flavours import Flavour
from kiln.settings import Settings


def agent(tmp_path: Path, *, shares_host: bool = False) -> NodeAgent:
    settings = Settings.from_env(
        {"HOME": str(tmp_path), "KILN_SANDBOX": "off", "KILN_SNAPSHOTS": "off"}
    )
    return NodeAgent(settings, cast(Any, None), shares_host=shares_host)


def launch(env: dict[str, str]) -> Any:
    return SimpleNamespace(spec={"resources": {"env": env}}, environment="")


def test_idle_openmp_threads_sleep_unless_the_function_says_otherwise(tmp_path: Path) -> None:
    node = agent(tmp_path)
    plain = node._replica_env(launch({}), tmp_path, "none", [])
    assert plain["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_NUM_THREADS" not in plain  # no cap: torch sizes its pool to the node
    own = node._replica_env(launch({"OMP_WAIT_POLICY": "ACTIVE"}), tmp_path, "none", [])
    assert own["OMP_WAIT_POLICY"] == "ACTIVE"
    standby = node._standby_env("", Flavour.of([], {"OMP_WAIT_POLICY": "ACTIVE"}))
    assert standby["OMP_WAIT_POLICY"] == "ACTIVE"
    assert node._standby_env("", Flavour.of([]))["OMP_WAIT_POLICY"] == "PASSIVE"


def test_under_a_cpu_cap_the_pools_are_as_wide_as_the_cap(tmp_path: Path) -> None:
    node = agent(tmp_path)
    node.sandboxes = cast(Any, SimpleNamespace(cpus=1.5))
    assert node._threads_env() == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    env = node._replica_env(launch({"OMP_NUM_THREADS": "8"}), tmp_path, "none", [])
    assert env["OMP_NUM_THREADS"] == "8"


@pytest.mark.parametrize(
    ("cores", "cap", "width"),
    [(2, None, "1"), (16, None, "15"), (1, None, "1"), (16, 4.0, "4"), (4, 8.0, "3")],
)
def test_on_a_host_the_platform_shares_the_pools_leave_it_a_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, cap: float | None, width: str
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    node = agent(tmp_path, shares_host=True)
    if cap is not None:
        node.sandboxes = cast(Any, SimpleNamespace(cpus=cap))
    assert node._threads_env() == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": width}
    own = node._replica_env(launch({"OMP_NUM_THREADS": "2"}), tmp_path, "none", [])
    assert own["OMP_NUM_THREADS"] == "2"
    assert node._standby_env("", Flavour.of([]))["OMP_NUM_THREADS"] == width
