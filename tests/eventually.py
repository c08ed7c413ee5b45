"""`eventually()`: the one way a test waits for something that happens in its own time.

A check is called until it holds: it holds when it returns a truthy value, which `eventually`
returns; until then it returns a falsy one or raises AssertionError. Past `within_s` the wait
fails with an AssertionError that names what was awaited and how it last failed. Wait for the
event itself this way, never sleep for it; and before asserting that something did not happen,
wait for a marker that proves it would have happened by then.

Sync tests (which have no event loop) wait with `asyncio.run(eventually(...))`.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["eventually"]

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    within_s: float,
    every_s: float = ...,
    what: str | None = ...,
) -> T: ...
@overload
async def eventually(
    check: Callable[[], T], *, within_s: float, every_s: float = ..., what: str | None = ...
) -> T: ...
async def eventually(
    check: Callable[[], Any],
    *,
    within_s: float,
    every_s: float = 0.05,
    what: str | None = None,
) -> Any:
    """Call `check` (a function or a coroutine function) every `every_s` until it holds, for
    at most `within_s` seconds; its last value. `what` names the wait in the failure (by
    default the check's name, or a lambda's source)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except AssertionError as failed:
            last = f"AssertionError: {failed}" if str(failed) else "AssertionError"
        else:
            if value:
                return value
            last = f"it returned {value!r}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what or _described(check)}: not within {within_s} s; {last}")
        await asyncio.sleep(every_s)


def _described(check: Callable[[], object]) -> str:
    name = getattr(check, "__name__", repr(check))
    if name != "<lambda>":
        return name
    try:
        source = inspect.getsource(check)
    except (OSError, TypeError):
        return name
    # The lambda's line as written, less the arguments of the call around it.
    written = source[source.find("lambda") :].splitlines()[0]
    return re.sub(r",\s*(within_s|every_s|what)=.*$", "", written).rstrip(" ,)")
