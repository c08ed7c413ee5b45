"""The standby pool's choices, with stand-in processes: which standby a cold start gets, when a
take is replaced, and memory keeping standbys from starting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from kiln.invoker.flavours import BASE, Flavour
from kiln.invoker.standby_pool import Standby, StandbyPool

GPT2 = Flavour.of(["transformers.models.gpt2.modeling_gpt2"])
GPT2_AND_MORE = Flavour.of(["transformers.models.gpt2.modeling_gpt2", "sympy"])
SYMPY = Flavour.of(["sympy"])
OTHER_ENV = Flavour.of(["transformers.models.gpt2.modeling_gpt2"], {"MODE": "x"})


@dataclass
class FakeProcess:
    pid: int = -1  # no process group for the pool to kill
    returncode: int | None = None

    def kill(self) -> None:
        self.returncode = -9

    async def wait(self) -> int:
        return self.returncode or 0


def pool(tmp_path: Path, budget: int = 2**40) -> StandbyPool:
    return StandbyPool(env_for=lambda device, flavour: {}, directory=tmp_path, memory_budget=budget)


def ready(pool: StandbyPool, device: str, *flavours: Flavour) -> list[Standby]:
    made = []
    for flavour in flavours:
        standby = Standby(device, flavour, cast(Any, FakeProcess()))
        pool.flavours[flavour.id] = flavour
        pool.ready.setdefault((device, flavour.id), []).append(standby)
        made.append(standby)
    return made


def fake_spawns(standbys: StandbyPool) -> list[Flavour]:
    """Standbys started as stand-ins; the flavours started, in order."""
    spawned: list[Flavour] = []

    async def spawn(device: str, flavour: Flavour) -> Standby:
        spawned.append(flavour)
        return Standby(device, flavour, cast(Any, FakeProcess()))

    standbys._spawn = spawn  # type: ignore[method-assign]
    return spawned


def test_a_cold_start_gets_the_smallest_standby_that_covers_it(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    big, exact, generic, _, other_env = ready(
        standbys, "", GPT2_AND_MORE, GPT2, BASE, SYMPY, OTHER_ENV
    )
    assert standbys.take("", GPT2, holder="r1") is exact
    assert standbys.take("", GPT2, holder="r2") is big
    assert standbys.take("", GPT2, holder="r3") is generic  # then a generic one
    # Never another flavour's on CPU slots: it stays for the functions it is kept for.
    assert standbys.take("", GPT2, holder="r4") is None
    assert standbys.ready_count("") == 2  # sympy's and other_env's
    assert other_env.process.returncode is None


def test_a_function_not_yet_learned_takes_only_a_generic_standby(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    _, generic = ready(standbys, "", SYMPY, BASE)
    assert standbys.take("", None, holder="r1") is generic
    assert standbys.take("", None, holder="r2") is None


def test_on_a_gpu_any_standby_under_the_same_env_beats_none(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    (sympy,) = ready(standbys, "0", SYMPY)
    ready(standbys, "1", OTHER_ENV)
    assert standbys.take("1", GPT2, holder="r1") is None  # imported under another env
    assert standbys.take("0", GPT2, holder="r2") is sympy


def test_standbys_are_per_device_and_dead_ones_are_skipped(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    (on_gpu1,) = ready(standbys, "1", GPT2)
    dead, alive = ready(standbys, "0", GPT2, GPT2)
    cast(FakeProcess, dead.process).returncode = 1
    assert standbys.covering("1", GPT2) == 1
    assert standbys.covering("1", SYMPY) == 0
    assert standbys.take("0", GPT2, holder="r1") is alive
    assert standbys.take("0", GPT2, holder="r2") is None
    assert standbys.take("1", GPT2, holder="r3") is on_gpu1


async def test_a_take_is_replaced_once_released_not_before(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    spawned = fake_spawns(standbys)
    (taken,) = ready(standbys, "", GPT2)
    standbys.keep({"": [(GPT2, 1)]})
    assert standbys.take("", GPT2, holder="replica") is taken
    await asyncio.sleep(0)
    assert spawned == []  # the cold start that took it is not done with its first call
    standbys.release("replica")
    await asyncio.gather(*standbys._tasks)
    assert spawned == [GPT2]
    assert standbys.ready_count("") == 1
    standbys.release("replica")  # a second word (the replica's exit) changes nothing
    await asyncio.gather(*standbys._tasks)
    assert spawned == [GPT2]
    await standbys.close()


async def test_standbys_beyond_the_memory_budget_do_not_start(tmp_path: Path) -> None:
    standbys = pool(tmp_path, budget=500 * 2**20)
    spawned = fake_spawns(standbys)
    (one,) = ready(standbys, "", GPT2)
    one.rss = 400 * 2**20
    standbys._rss[GPT2.id] = one.rss
    standbys.keep({"": [(GPT2, 3)]})
    await asyncio.gather(*standbys._tasks)
    assert spawned == []  # a second 400 MiB standby would pass the 500 MiB budget
    assert standbys.metrics.skipped.labels("memory")._value.get() >= 1


def test_keep_stops_what_is_no_longer_wanted(tmp_path: Path) -> None:
    standbys = pool(tmp_path)
    gpt2, sympy = ready(standbys, "", GPT2, SYMPY)
    standbys.keep({})
    assert gpt2.process.returncode == sympy.process.returncode == -9
    assert standbys.ready_count("") == 0


@pytest.fixture(autouse=True)
def _no_real_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a unit test started a real process")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)


async def test_a_standby_still_starting_when_the_pool_closes_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = FakeProcess()
    never = asyncio.Event()
    spawned = asyncio.Event()

    class Silent:
        async def readline(self) -> bytes:
            await never.wait()  # importing for ever
            return b""

    async def spawn(*args: object, **kwargs: object) -> Any:
        cast(Any, started).stdout = Silent()
        spawned.set()
        return started

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    standbys = pool(tmp_path)
    standbys.keep({"": [(GPT2, 1)]})
    await asyncio.wait_for(spawned.wait(), 5)  # its start now waits for the word "ready"
    assert started.returncode is None
    await standbys.close()
    assert started.returncode == -9  # it does not outlive the pool
