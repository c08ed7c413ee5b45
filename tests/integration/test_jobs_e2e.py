"""Async jobs on the real stack (issue 6): spawn, status and result; idempotent spawns; retries
with backoff and the poison job that fails every attempt without blocking the others;
cancellation reaching the replica; signed completion webhooks retried until delivered; results
that expire; and a job that outlives the router that took it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from eventually import eventually
from stack import Platform, error_of, running_platform

import kiln
from kiln._nats import connect_options
from kiln.db.enums import CallStatus
from kiln.db.models import Call
from kiln.db.session import create_engine
from kiln.settings import SandboxMode, Settings
from kiln.wire import Subjects

pytestmark = pytest.mark.integration

JOBS = """
import asyncio
import time
from pathlib import Path

import kiln

app = kiln.App("jobs")


@app.function()
def echo(x: int) -> dict:
    return {"x": x}


@app.function(retries=2)
def flaky(tally: str) -> str:
    path = Path(tally)
    seen = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(seen))
    if seen < 3:
        raise RuntimeError(f"attempt {seen} fails")
    return f"worked on attempt {seen}"


@app.function(retries=1)
def poison() -> None:
    raise ValueError("always")


@app.function()
def count(n: int):
    yield from range(n)


@app.function()
def big() -> bytes:
    return b"z" * (2 * 1024 * 1024)


@app.function()
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.function()
async def waits(started: str, cancelled: str) -> str:
    Path(started).touch()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        Path(cancelled).touch()
        raise
    return "never"
"""


@pytest.fixture(scope="module", name="platform")
async def platform_with_jobs(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    home = tmp_path_factory.mktemp("jobs-home")
    # Unsandboxed: the tests meet their jobs through files on the host (see stack.py).
    unsandboxed = settings.replace(job_result_ttl_s=30, sandbox=SandboxMode.OFF)
    async with running_platform(unsandboxed, home, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("jobs"), "jobs.py", JOBS)
        yield running


async def spawn(platform: Platform, target: str, **kwargs: Any) -> str:
    async with platform.client() as client:
        response = await client.post(f"/v1/spawn/{target}", **kwargs)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/calls/{response.json()['call_id']}"
    call_id: str = response.json()["call_id"]
    return call_id


FINAL = ("succeeded", "failed", "cancelled", "expired")


async def finished(platform: Platform, call_id: str) -> dict[str, Any]:
    return await eventually(lambda: view_of(platform, call_id, *FINAL), within_s=60)


async def view_of(platform: Platform, call_id: str, *statuses: str) -> dict[str, Any]:
    """The call's view, once in one of `statuses`: a check for `eventually`."""
    async with platform.client() as client:
        view: dict[str, Any] = (await client.get(f"/v1/calls/{call_id}")).json()
    assert view["status"] in statuses, view
    return view


async def test_a_job_runs_and_its_result_is_kept(platform: Platform) -> None:
    call_id = await spawn(platform, "jobs/echo", json={"x": 7})
    view = await finished(platform, call_id)
    assert view["status"] == "succeeded"
    assert (view["function"], view["result"], view["attempts"]) == ("jobs/echo", {"x": 7}, 1)
    assert view["error"] is None
    async with platform.client() as client:
        raw = await client.get(f"/v1/calls/{call_id}/result")
        assert (raw.status_code, raw.json()) == (200, {"x": 7})
        # A large result is kept aside, and served whole.
        big = await finished(platform, await spawn(platform, "jobs/big"))
        assert "result" not in big
        data = await client.get(big["result_url"])
    assert data.content == b"z" * (2 * 1024 * 1024)
    # The attempt was counted as started (a redelivery that started none is no lost attempt).
    nc = await nats.connect(**connect_options(platform.settings))
    try:
        starts = await nc.jetstream().key_value(
            Subjects(platform.settings.namespace).job_starts_bucket
        )
        (key,) = [k for k in await starts.keys() if k.endswith(f".{call_id}")]
        assert (await starts.get(key)).value == b"1"
    finally:
        await nc.close()


async def test_a_repeated_spawn_with_its_key_is_the_same_job(platform: Platform) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await spawn(platform, "jobs/echo", json={"x": 1}, headers=headers)
    again = await spawn(platform, "jobs/echo", json={"x": 1}, headers=headers)
    assert again == first
    async with platform.client() as client:
        other = await client.post("/v1/spawn/jobs/echo", json={"x": 2}, headers=headers)
    assert other.status_code == 422
    assert error_of(other)["message"] == (
        "Idempotency-Key 'order-42' was used for a different request (another function, "
        "arguments or webhook); use a new key for a new job"
    )
    assert (await finished(platform, first))["result"] == {"x": 1}


async def test_failed_attempts_are_retried_and_a_poison_job_blocks_nothing(
    platform: Platform, tmp_path: Path
) -> None:
    poisoned = await spawn(platform, "jobs/poison")
    flaky = await spawn(platform, "jobs/flaky", json={"tally": str(tmp_path / "tally")})
    after = await spawn(platform, "jobs/echo", json={"x": 3})
    assert (await finished(platform, after))["status"] == "succeeded"
    view = await finished(platform, flaky)
    assert (view["status"], view["attempts"], view["result"]) == (
        "succeeded",
        3,
        "worked on attempt 3",
    )
    view = await finished(platform, poisoned)
    assert (view["status"], view["attempts"], view["max_attempts"]) == ("failed", 2, 2)
    assert view["error"] == {"code": "function_error", "message": "ValueError: always"}
    async with platform.client() as client:
        no_result = await client.get(f"/v1/calls/{poisoned}/result")
    assert no_result.status_code == 409


async def test_cancelling_a_running_job_stops_it_in_the_replica(
    platform: Platform, tmp_path: Path
) -> None:
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"
    call_id = await spawn(
        platform, "jobs/waits", json={"started": str(started), "cancelled": str(cancelled)}
    )
    await eventually(started.exists, within_s=30)
    async with platform.client() as client:
        response = await client.post(f"/v1/calls/{call_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        await eventually(cancelled.exists, within_s=30)
        again = await client.post(f"/v1/calls/{call_id}/cancel")
    assert again.status_code == 409
    assert error_of(again)["message"] == f"call {call_id} is already cancelled"
    assert (await finished(platform, call_id))["status"] == "cancelled"


async def test_a_completion_webhook_is_signed_and_retried_until_delivered(
    platform: Platform,
) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        body = await reader.readexactly(int(headers["content-length"]))
        received.append((headers, body))
        status = b"500 Internal Server Error" if len(received) == 1 else b"204 No Content"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        call_id = await spawn(
            platform,
            "jobs/echo",
            json={"x": 5},
            params={"webhook": f"http://127.0.0.1:{port}/done"},
        )
        # The first delivery is refused: it is sent again.
        await eventually(lambda: len(received) >= 2, within_s=30)
    finally:
        server.close()
    headers, body = received[1]
    assert json.loads(body)["call_id"] == call_id
    assert json.loads(body)["result"] == {"x": 5}
    assert headers["kiln-webhook-id"] == call_id
    stamp, _, mac = headers["kiln-signature"].partition(",v1=")
    timestamp = stamp.removeprefix("t=")
    secret = platform.settings.require("webhook_secret").encode()
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected)


async def test_spawn_refuses_bad_webhooks_and_keys(platform: Platform) -> None:
    async with platform.client() as client:
        bad_hook = await client.post(
            "/v1/spawn/jobs/echo", json={"x": 1}, params={"webhook": "ftp://example.com"}
        )
        bad_key = await client.post(
            "/v1/spawn/jobs/echo", json={"x": 1}, headers={"Idempotency-Key": "x" * 300}
        )
        nobody = await client.get("/v1/calls/00000000-0000-0000-0000-000000000000")
    assert bad_hook.status_code == 400
    assert error_of(bad_hook)["message"] == (
        "webhook='ftp://example.com' is not valid: expected an http:// or https:// URL of at "
        "most 2048 characters"
    )
    assert bad_key.status_code == 400
    assert nobody.status_code == 404


async def test_a_job_outlives_the_router_that_took_it(settings: Settings, tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with running_platform(settings, home) as first:
        await first.deploy_source(tmp_path, "jobs.py", JOBS)
        call_id = await spawn(first, "jobs/slow", json={"seconds": 2})
        await eventually(lambda: view_of(first, call_id, "running"), within_s=60)
    # That platform (router, recorder and node agent) is gone; another one finds the job done.
    async with running_platform(settings, home) as second:
        view = await finished(second, call_id)
    assert (view["status"], view["result"]) == ("succeeded", "slept")


async def test_a_finished_jobs_result_expires(settings: Settings, tmp_path: Path) -> None:
    # A namespace of its own: the module's platform must not record this job with its TTL.
    alone = settings.replace(job_result_ttl_s=1.0, namespace=f"{settings.namespace}ttl")
    async with running_platform(alone, tmp_path) as short:
        await short.deploy_source(tmp_path, "jobs.py", JOBS)
        call_id = await spawn(short, "jobs/echo", json={"x": 9})
        assert (await finished(short, call_id))["result"] == {"x": 9}
        view = await eventually(lambda: view_of(short, call_id, "expired"), within_s=1.5)
        async with short.client() as client:
            gone = await client.get(f"/v1/calls/{call_id}/result")
        assert "result" not in view
        assert gone.status_code == 404
        # The sweeper drops the stored result too.
        engine = create_engine(short.settings, application_name="kiln-test")

        async def dropped() -> bool:
            async with engine.connect() as conn:
                query = sa.select(Call.status, Call.result).where(Call.id == call_id)
                row = (await conn.execute(query)).first()
            if row is None:  # forgotten a TTL after it expired (a slow check sees that)
                return True
            assert (row.status, row.result) == (CallStatus.EXPIRED, None), row
            return True

        try:
            await eventually(dropped, within_s=10)
        finally:
            await engine.dispose()


async def test_python_code_calls_deployed_functions(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln.lookup(...)` and a decorated function's `.remote()`, `.spawn()` and
    `.remote_gen()`, from a process that only knows the URL and a key."""
    monkeypatch.setenv("KILN_URL", platform.url)
    monkeypatch.setenv("KILN_API_KEY", platform.key)
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = kiln.App("jobs")

    @app.function
    def echo(x: int) -> dict[str, int]:
        raise AssertionError("runs remotely, not here")

    def calls() -> dict[str, Any]:
        echo_remote = kiln.lookup("jobs/echo", url=platform.url, api_key=platform.key)
        job = echo.spawn(x=2)
        waiting = kiln.lookup("jobs/slow").spawn(seconds=30)
        with pytest.raises(TimeoutError):
            waiting.get(timeout=0.2)
        waiting.cancel()
        with pytest.raises(kiln.RemoteError) as failed:
            kiln.lookup("jobs/poison").spawn().get(timeout=60)
        with pytest.raises(kiln.RemoteError) as bad:
            echo_remote.remote(y=1)
        return {
            "remote": echo.remote(x=1),
            "positional": echo_remote.remote(3),
            "job": job.get(timeout=60),
            "cancelled": waiting.status()["status"],
            "gen": list(kiln.lookup("jobs/count").remote_gen(n=4)),
            "failed": (failed.value.api_code, failed.value.api_message),
            "bad": (bad.value.http_status, bad.value.api_code),
        }

    results = await asyncio.to_thread(calls)
    assert results == {
        "remote": {"x": 1},
        "positional": {"x": 3},
        "job": {"x": 2},
        "cancelled": "cancelled",
        "gen": [0, 1, 2, 3],
        "failed": ("function_error", "the job failed: ValueError: always"),
        "bad": (400, "invalid_arguments"),
    }
