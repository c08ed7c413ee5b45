"""The invocation log and the call metrics on the real stack (issue 9): every kind of call gets
its row (sync, failed, stream, WebSocket session, job attempt), cold starts are flagged, a
burst is recorded whole, only a function's owner lists its calls, and the metrics move."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eventually import eventually
from prometheus_client.parser import text_string_to_metric_families
from stack import Platform, running_platform
from websockets.asyncio.client import connect

from kiln.settings import Settings

pytestmark = pytest.mark.integration

OBS = """
import kiln

app = kiln.App("obs")


@app.function()
def echo(x: int) -> dict:
    return {"x": x}


@app.function()
def boom() -> None:
    raise ValueError("no")


@app.function()
def count(n: int):
    yield from range(n)


@app.cls()
class Talk:
    @kiln.websocket()
    async def chat(self, session: kiln.Session) -> None:
        async for message in session:
            await session.send(message.upper())
"""


@pytest.fixture(scope="module", name="platform")
async def platform_with_obs(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    async with running_platform(
        settings, tmp_path_factory.mktemp("obs-home"), stop_apps=True
    ) as running:
        await running.deploy_source(tmp_path_factory.mktemp("obs"), "obs.py", OBS)
        yield running


async def calls_of(
    platform: Platform, target: str, count: int, query: str = ""
) -> list[dict[str, Any]]:
    """The function's logged calls once there are `count` of them (rows are written in
    batches: at 100 rows or every 5 s)."""

    async def logged() -> list[dict[str, Any]]:
        async with platform.client() as client:
            response = await client.get(f"/v1/functions/{target}/calls?limit=1000{query}")
        assert response.status_code == 200, response.text
        calls: list[dict[str, Any]] = response.json()["calls"]
        assert len(calls) >= count, calls
        return calls

    return await eventually(logged, within_s=15)


async def metrics(platform: Platform) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with platform.client() as client:
        text = (await client.get("/metrics")).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_each_kind_of_call_gets_its_row(platform: Platform) -> None:
    before = await metrics(platform)
    first = await platform.call("obs/echo", json={"x": 1})  # starts a replica: a cold call
    second = await platform.call("obs/echo", json={"x": 2})
    failed = await platform.call("obs/boom")
    assert (first.status_code, second.status_code, failed.status_code) == (200, 200, 500)
    async with platform.client() as client:
        streamed = await client.post("/v1/run/obs/count", json={"n": 3})
        assert streamed.status_code == 200
        spawned = await client.post("/v1/spawn/obs/echo", json={"x": 3})
        assert spawned.status_code == 202
    ws_url = platform.url.replace("http://", "ws://") + "/v1/ws/obs/Talk.chat"
    headers = {"Authorization": f"Bearer {platform.key}"}
    async with connect(ws_url, additional_headers=headers, open_timeout=60) as ws:
        await ws.send("hi")
        assert await ws.recv() == "HI"

    echoes = await calls_of(platform, "obs/echo", 3)
    by_request = {c["request_id"]: c for c in echoes if c["kind"] == "sync"}
    cold = by_request[first.headers["x-request-id"]]
    warm = by_request[second.headers["x-request-id"]]
    assert (cold["status"], cold["cold_start"], warm["cold_start"]) == ("succeeded", True, False)
    assert cold["replica_id"] == warm["replica_id"] is not None
    assert cold["queue_wait_ms"] > warm["queue_wait_ms"]  # it waited for the cold start
    assert cold["duration_ms"] >= cold["queue_wait_ms"] + cold["execution_ms"] - 1
    assert (warm["bytes_in"], warm["bytes_out"]) == (len(b'{"x":2}'), len(second.content))
    job = next(c for c in echoes if c["kind"] == "job")
    assert (job["status"], job["call_id"]) == ("succeeded", f"{spawned.json()['call_id']}:1")
    assert (job["bytes_in"], job["bytes_out"]) == (len(b'{"x":3}'), len(b'{"x":3}'))

    [boom] = await calls_of(platform, "obs/boom", 1)
    assert (boom["status"], boom["error_code"]) == ("failed", "function_error")
    assert boom["request_id"] == failed.headers["x-request-id"]
    [stream] = await calls_of(platform, "obs/count", 1)
    assert (stream["kind"], stream["status"], stream["bytes_out"]) == ("stream", "succeeded", 3)
    [session] = await calls_of(platform, "obs/Talk", 1)
    assert (session["kind"], session["method"], session["status"]) == (
        "websocket", "chat", "succeeded",
    )  # fmt: skip
    assert (session["bytes_in"], session["bytes_out"]) == (2, 2)

    after = await metrics(platform)
    ok = {"app": "obs", "function": "echo", "kind": "sync", "outcome": "ok", "tier": "operator"}
    assert (
        value(after, "kiln_router_calls_total", **ok)
        - value(before, "kiln_router_calls_total", **ok)
        == 2
    )
    boom_labels = {**ok, "function": "boom", "outcome": "function_error"}
    assert value(after, "kiln_router_calls_total", **boom_labels) == 1
    stream_labels = {**ok, "function": "count", "kind": "stream"}
    assert value(after, "kiln_router_calls_total", **stream_labels) == 1
    executed = value(after, "kiln_router_call_execution_seconds_count", app="obs", function="echo")
    assert executed >= 2
    # The cold starts behind these calls, and the scheduler's decisions to start them.
    assert (
        sum(v for (name, _), v in after.items() if name == "kiln_cold_starts_total") >= 4
    )  # echo, boom, count, Talk
    assert value(after, "kiln_scheduler_scale_decisions_total", direction="up") >= 4
    assert value(before, "kiln_scheduler_replicas", app="obs", function="echo") == 0
    assert value(after, "kiln_scheduler_replicas", app="obs", function="echo") == 1
    assert value(after, "kiln_scheduler_replicas_by_state", state="ready") >= 4


async def test_a_burst_is_logged_whole_and_pages_back(platform: Platform) -> None:
    async with platform.client() as client:
        burst = await asyncio.gather(
            *(client.post("/v1/run/obs/echo", json={"x": i}) for i in range(300))
        )
    assert {r.status_code for r in burst} == {200}
    sent = {r.headers["x-request-id"] for r in burst}
    logged = await calls_of(platform, "obs/echo", 300, "&kind=sync")
    assert sent <= {c["request_id"] for c in logged}
    # Pages of 120, newest first, chained by `next_before`, cover the same rows once each.
    pages: list[dict[str, Any]] = []
    before = ""
    async with platform.client() as client:
        while True:
            page = (
                await client.get(f"/v1/functions/obs/echo/calls?kind=sync&limit=120{before}")
            ).json()
            pages.extend(page["calls"])
            if page["next_before"] is None:
                break
            before = f"&before={page['next_before']}"
    ids = [c["id"] for c in pages]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == len(ids)
    assert sent <= {c["request_id"] for c in pages}


async def test_only_the_owner_lists_a_functions_calls(platform: Platform) -> None:
    async with platform.client() as operator:
        customer = (await operator.post("/v1/customers", json={"name": "other"})).json()
        key = (
            await operator.post("/v1/keys", json={"kind": "account", "customer_id": customer["id"]})
        ).json()["key"]
        bad = await operator.get("/v1/functions/obs/echo/calls?status=lost")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == (
        "status='lost' is not valid: expected one of succeeded, failed, cancelled"
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with platform.client() as client:
        theirs = await client.get("/v1/functions/obs/echo/calls", headers=headers)
    assert theirs.status_code == 404
    assert theirs.json()["error"]["message"] == "function 'echo' not found in app 'obs'"
