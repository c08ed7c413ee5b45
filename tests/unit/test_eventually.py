"""`eventually()`, the tests' one way to wait (tests/eventually.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from eventually import eventually


async def test_a_sync_check_is_called_until_it_holds_and_its_value_returned() -> None:
    calls = itertools.count(1)
    assert await eventually(lambda: [n] if (n := next(calls)) >= 3 else [], within_s=5) == [3]


async def test_an_async_check_is_awaited_and_a_failed_assertion_means_not_yet() -> None:
    calls = itertools.count(1)

    async def third_call() -> int:
        n = next(calls)
        assert n >= 3, f"call {n}"
        return n

    assert await eventually(third_call, within_s=5, every_s=0.01) == 3


async def test_a_timeout_names_the_wait_and_its_last_failure() -> None:
    async def ready() -> bool:
        raise AssertionError("3 of 4 replicas")

    with pytest.raises(AssertionError) as named:
        await eventually(ready, within_s=0.1)
    assert str(named.value) == "ready: not within 0.1 s; AssertionError: 3 of 4 replicas"
    with pytest.raises(AssertionError) as written:
        await eventually(lambda: 0, within_s=0.05, every_s=0.01)
    assert str(written.value) == "lambda: 0: not within 0.05 s; it returned 0"
    with pytest.raises(AssertionError) as described:
        await eventually(lambda: [], within_s=0.05, what="the queue drained")
    assert str(described.value) == "the queue drained: not within 0.05 s; it returned []"


async def test_other_errors_are_not_waited_out() -> None:
    def broken() -> bool:
        raise KeyError("no such key")

    with pytest.raises(KeyError):
        await eventually(broken, within_s=5)


def test_sync_tests_wait_with_asyncio_run() -> None:
    calls = itertools.count(1)
    assert asyncio.run(eventually(lambda: next(calls) >= 2, within_s=5)) is True
