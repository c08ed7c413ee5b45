"""How a replica decodes arguments, runs user code and encodes results (no NATS needed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import kiln
from kiln.errors import InvalidArguments, UnserializableResult
from kiln.functions.spec import FunctionSpec
from kiln.invoker.coldstart import ColdStart, build_instance
from kiln.invoker.target import Target, build_target
from kiln.wire import Origin

app = kiln.App("target-tests")
STOPPED: list[int] = []


@app.function
def add(a: int, b: int = 1) -> int:
    return a + b


@app.function
def thread_name() -> str:
    return threading.current_thread().name


@app.function
async def twice(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


@app.function
def raw(data: bytes) -> bytes:
    return data.upper()


@app.function
def odd() -> object:
    return {1}


@app.cls
class Counter:
    @kiln.enter()
    def start(self) -> None:
        self.count = 10

    @kiln.method()
    def bump(self, by: int) -> int:
        self.count += by
        return self.count

    @kiln.exit()
    def stop(self) -> None:
        STOPPED.append(self.count)


def target(name: str) -> Target:
    specs = {spec.name: spec for spec in app.spec()}
    spec: FunctionSpec = specs[name]
    return build_target(spec, app.functions[name])


async def test_keyword_and_positional_json() -> None:
    t = target("add")
    assert (await t.call(None, b'{"a": 2}', "application/json")).body == b"3"
    assert (await t.call(None, b"[2, 5]", "application/json")).body == b"7"


async def test_sync_code_runs_off_the_event_loop() -> None:
    result = await target("thread_name").call(None, b"{}", "application/json")
    assert result.body.startswith(b'"kiln-call')


async def test_async_code_and_bytes() -> None:
    assert (await target("twice").call(None, b'{"x": 4}', "application/json")).body == b"8"
    result = await target("raw").call(None, b"abc", "application/octet-stream")
    assert (result.body, result.content_type) == (b"ABC", "application/octet-stream")


async def test_mismatched_arguments_show_the_signature() -> None:
    with pytest.raises(InvalidArguments) as caught:
        await target("add").call(None, b'{"c": 1}', "application/json")
    assert caught.value.message == (
        "missing a required argument: 'a'; the signature is add(a: int, b: int = 1) -> int"
    )
    with pytest.raises(InvalidArguments, match=r"not a JSON int$"):
        await target("add").call(None, b"5", "application/json")


async def test_unserialisable_result() -> None:
    with pytest.raises(UnserializableResult, match=r"^odd returned a value that cannot be sent"):
        await target("odd").call(None, b"{}", "application/json")


async def test_class_lifecycle() -> None:
    t = target("Counter")
    record = ColdStart()
    await build_instance(t, None, record, private=False)
    assert record.origin is Origin.HOOKS
    assert set(record.phases) == {"enter"}
    assert (await t.call("bump", b'{"by": 5}', "application/json")).body == b"15"
    assert (await t.call("bump", b'{"by": 1}', "application/json")).body == b"16"
    await t.exit()
    assert STOPPED == [16]
