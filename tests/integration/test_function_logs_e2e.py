"""Function logs on the real stack (issue 9): what a function prints (stdout, stderr, from
threads) and logs reaches `/v1/functions/APP/FN/logs` line by line, tagged with its replica,
call and request id; `kiln logs --follow` shows prints while the call still runs; a failed
call's traceback is there under its request id; only the owner reads a function's logs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from eventually import eventually
from stack import Platform, running_platform

from kiln._nats import connect_options
from kiln.settings import Settings
from kiln.wire import Subjects

pytestmark = pytest.mark.integration

CHATTY = """
import logging
import sys
import threading
import time

import kiln

app = kiln.App("chatty")
log = logging.getLogger("chatty")


@app.function()
def talk(name: str) -> str:
    print(f"hello {name}")
    print(f"to stderr {name}", file=sys.stderr)
    log.warning("a warning about %s", name)
    worker = threading.Thread(target=lambda: print(f"from a thread {name}"))
    worker.start()
    worker.join()
    return name


@app.function()
def ticks(n: int, pause: float) -> int:
    for i in range(n):
        print(f"tick {i}", flush=True)
        time.sleep(pause)
    return n


@app.function()
async def fails() -> None:
    raise ValueError("this went wrong")
"""


@pytest.fixture(scope="module", name="platform")
async def platform_with_chatty(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    async with running_platform(
        settings, tmp_path_factory.mktemp("logs-home"), stop_apps=True
    ) as running:
        await running.deploy_source(tmp_path_factory.mktemp("chatty"), "chatty.py", CHATTY)
        yield running


async def logged(
    platform: Platform, target: str, matching: str, count: int, query: str = ""
) -> list[dict[str, Any]]:
    """The function's log records whose line contains `matching`, once there are `count`."""

    async def found() -> list[dict[str, Any]]:
        async with platform.client() as client:
            response = await client.get(f"/v1/functions/{target}/logs?since=10m{query}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in response.text.splitlines() if line]
        assert len([r for r in records if matching in r["line"]]) >= count, records
        return [r for r in records if matching in r["line"]]

    return await eventually(found, within_s=15)


async def test_prints_and_logs_come_back_tagged_with_their_call(platform: Platform) -> None:
    reply = await platform.call("chatty/talk", json={"name": "ada"})
    assert reply.status_code == 200, reply.text
    request_id = reply.headers["x-request-id"]
    records = await logged(platform, "chatty/talk", "ada", 4)
    by_line = {r["line"]: r for r in records}
    assert by_line["hello ada"]["stream"] == "stdout"
    assert by_line["to stderr ada"]["stream"] == "stderr"
    assert by_line["from a thread ada"]["stream"] == "stdout"
    warning = by_line["chatty: a warning about ada"]
    assert (warning["stream"], warning["level"]) == ("log", "WARNING")
    for record in records:
        assert record.get("request_id") == request_id, record
        assert record["call"].endswith(record["call"].rsplit("-", 1)[-1])
        assert len(record["replica"]) == 36
    # Another call's lines are not that request's.
    other = await platform.call("chatty/talk", json={"name": "bob"})
    only = await logged(platform, "chatty/talk", "", 4, f"&request_id={request_id}")
    assert {r["request_id"] for r in only} == {request_id}
    assert all("bob" not in r["line"] for r in only)
    assert other.status_code == 200


async def test_a_failed_calls_traceback_is_in_its_logs(platform: Platform) -> None:
    reply = await platform.call("chatty/fails")
    assert reply.status_code == 500
    request_id = reply.headers["x-request-id"]
    [record] = await logged(platform, "chatty/fails", "ValueError: this went wrong", 1)
    assert (record["stream"], record["level"], record["request_id"]) == (
        "log", "ERROR", request_id,
    )  # fmt: skip
    assert "Traceback" in record["line"]
    assert request_id in record["line"]  # the replica's own log line names the request


async def test_kiln_logs_follow_shows_prints_as_they_happen(
    platform: Platform, tmp_path: Path
) -> None:
    nc = await nats.connect(**connect_options(platform.settings))
    js, stream = nc.jetstream(), Subjects(platform.settings.namespace).logs_stream
    readers = {c.name for c in await js.consumers_info(stream)}

    async def following() -> bool:  # the follower's reader (a consumer) is on the stream
        return bool({c.name for c in await js.consumers_info(stream)} - readers)

    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(
        HOME=str(tmp_path), KILN_HOME=str(tmp_path), KILN_URL=platform.url,
        KILN_API_KEY=platform.key, PYTHONUNBUFFERED="1",
    )  # fmt: skip
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiln", "logs", "chatty/ticks", "--follow", "--since", "1s",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    seen: list[tuple[float, str]] = []

    async def read() -> None:
        assert follower.stdout is not None
        async for raw in follower.stdout:
            seen.append((time.monotonic(), raw.decode().rstrip("\n")))

    reader = asyncio.ensure_future(read())
    try:
        await eventually(following, within_s=30)
        call = asyncio.ensure_future(platform.call("chatty/ticks", json={"n": 6, "pause": 0.5}))

        def first_tick() -> bool:
            assert not call.done() or call.result().status_code == 200, call.result().text
            return any(line.endswith("tick 0") for _, line in seen)

        await eventually(first_tick, within_s=30)
        first_seen = time.monotonic()
        # The first tick is on screen while the call still runs (it lasts 3 s).
        assert not call.done()
        reply = await call
        finished = time.monotonic()
        assert reply.status_code == 200
        await eventually(lambda: sum("tick" in line for _, line in seen) >= 6, within_s=15)
    finally:
        await nc.close()
        follower.terminate()
        await asyncio.wait_for(follower.wait(), 10)
        await asyncio.wait_for(reader, 10)
    ticks = [line for _, line in seen if "tick" in line]
    assert [t.rsplit(" ", 2)[-2:] for t in ticks] == [["tick", str(i)] for i in range(6)]
    request_id = reply.headers["x-request-id"]
    assert all(f"  {request_id}  stdout  " in t for t in ticks), ticks
    assert finished - first_seen > 1.0  # seen well before the call ended


async def test_only_the_owner_reads_a_functions_logs(platform: Platform) -> None:
    async with platform.client() as operator:
        customer = (await operator.post("/v1/customers", json={"name": "snoop"})).json()
        key = (
            await operator.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        ).json()["key"]
        bad = await operator.get("/v1/functions/chatty/talk/logs?follow=maybe")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "follow='maybe' is not valid: expected true or false"
    async with platform.client() as client:
        theirs = await client.get(
            "/v1/functions/chatty/talk/logs", headers={"Authorization": f"Bearer {key}"}
        )
    assert theirs.status_code == 404
