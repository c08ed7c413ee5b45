"""A call in the router keeps one timer across its phases; each phase still ends on time."""

from __future__ import annotations

import asyncio
import time

import pytest
from eventually import eventually

from kiln.errors import FunctionTimeout, KilnError, Unavailable
from kiln.router.dispatch import CallResult, _Call, _Phase
from kiln.wire import CallHeaders


def new_call(startup_s: float, timeout_s: float) -> _Call:
    headers = CallHeaders("c", "r", "application/json", time.time() + startup_s, timeout_s)
    future: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
    return _Call(future, headers, startup_s, "f")


async def failure(call: _Call) -> KilnError:
    with pytest.raises(KilnError) as caught:
        await asyncio.wait_for(call.future, 5)
    return caught.value


async def test_an_unconfirmed_call_is_unavailable() -> None:
    call = new_call(startup_s=10, timeout_s=10)
    call.set_deadline(0.02)
    error = await failure(call)
    assert isinstance(error, Unavailable)
    assert error.message == "the call queue did not confirm the call"


async def test_a_later_phase_deadline_keeps_the_timer_and_it_re_arms_when_it_fires() -> None:
    call = new_call(startup_s=0.15, timeout_s=10)
    call.set_deadline(0.02)
    timer = call.timer
    call.enter(_Phase.QUEUED, 0.15)
    assert call.timer is timer  # not moved: its deadline is later
    await eventually(lambda: call.timer is not timer, within_s=0.1, every_s=0.005)
    assert not call.future.done()  # fired early, re-armed for what is left
    assert call.timer is not None
    assert call.timer is not timer
    error = await failure(call)
    assert isinstance(error, FunctionTimeout)
    assert "startup_timeout (0.15 s)" in error.message


async def test_an_earlier_phase_deadline_moves_the_timer() -> None:
    call = new_call(startup_s=60, timeout_s=0.05)
    call.set_deadline(5)
    call.enter(_Phase.QUEUED, 60)
    began = time.monotonic()
    call.enter(_Phase.RUNNING, 0.05)
    error = await failure(call)
    assert isinstance(error, FunctionTimeout)
    assert error.message == "the call did not finish within the function's timeout (0.05 s)"
    assert time.monotonic() - began < 1


async def test_phases_only_move_forward() -> None:
    call = new_call(startup_s=60, timeout_s=60)
    call.set_deadline(5)
    call.enter(_Phase.RUNNING, 60)
    call.enter(_Phase.QUEUED, 0.01)
    assert call.phase is _Phase.RUNNING
    marker = new_call(startup_s=60, timeout_s=60)  # the deadline it ignored, kept by another
    marker.set_deadline(5)
    marker.enter(_Phase.QUEUED, 0.01)
    await failure(marker)
    assert not call.future.done()
    call.cancel_timer()
