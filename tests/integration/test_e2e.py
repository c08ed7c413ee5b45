"""End to end on the real stack: the router, scheduler and a node agent in this process, real
replica processes, real NATS (JetStream), PostgreSQL and Redis. Apps are deployed the way
`kiln deploy` does it and called over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from eventually import eventually
from stack import BODY_LIMIT, Platform, error_of

from kiln.functions.package import package

pytestmark = [pytest.mark.integration, pytest.mark.unsandboxed]

ROOT = Path(__file__).resolve().parents[2]

TROUBLE = """
import asyncio
import os
import time

import kiln

app = kiln.App("trouble")


@app.function
def divide(a: float, b: float) -> float:
    return a / b


@app.function
def a_set() -> object:
    return {1, 2}


@app.function(timeout=1)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


@app.function(timeout=1)
async def async_sleepy(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "rested"


@app.function(timeout=60)
def hang(seconds: float, started: str) -> str:
    open(started, "w").close()
    time.sleep(seconds)
    return "survived"


@app.function
def crash() -> None:
    os._exit(3)  # the moment it starts: before anything else this replica would send


@app.function
def reverse(data: bytes) -> bytes:
    return data[::-1]


@app.function
def huge() -> bytes:
    return b"x" * (4 * 1024 * 1024)
"""


@pytest.fixture(scope="module")
async def hello(platform: Platform) -> dict[str, Any]:
    return await platform.deploy(ROOT / "examples" / "hello.py")


@pytest.fixture(scope="module")
async def trouble(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app_file = tmp_path_factory.mktemp("trouble") / "trouble.py"
    app_file.write_text(TROUBLE)
    return await platform.deploy(app_file)


async def call(platform: Platform, target: str, **kwargs: Any) -> httpx.Response:
    return await platform.call(target, **kwargs)


# The happy path ---------------------------------------------------------------------------------


async def test_function_and_class_method_are_called_through_http(
    platform: Platform, hello: dict[str, Any]
) -> None:
    assert [e["name"] for e in hello["endpoints"]] == ["shout", "Greeter.greet"]
    assert hello["endpoints"][0]["url"] == f"{platform.url}/v1/run/hello/shout"
    shout = await call(platform, "hello/shout", json={"text": "hi"})
    assert shout.status_code == 200, shout.text
    assert shout.json() == "HI!"
    greet = await call(platform, "hello/Greeter.greet", json={"name": "Ada"})
    assert greet.status_code == 200, greet.text
    assert greet.json() == "Hello, Ada!"


async def test_warm_calls_reuse_the_replica(platform: Platform, hello: dict[str, Any]) -> None:
    results = await asyncio.gather(
        *(call(platform, "hello/shout", json={"text": f"n{i}"}) for i in range(20))
    )
    assert [r.json() for r in results] == [f"N{i}!" for i in range(20)]
    async with platform.client() as client:
        replicas = (await client.get("/v1/functions/hello/shout/replicas")).json()["replicas"]
    assert 1 <= len(replicas) <= 4
    assert {r["state"] for r in replicas} <= {"starting", "ready"}

    async def idle() -> list[dict[str, Any]]:  # a heartbeat since the last call says so
        ready = await platform.ready_replicas("hello/shout")
        assert all(r["in_flight"] == 0 and r["idle_s"] is not None for r in ready), ready
        return ready

    for replica in await eventually(idle, within_s=2.5):
        assert 0 <= replica["idle_s"] <= replica["uptime_s"]


async def test_calls_to_a_serving_function_do_not_wake_the_scheduler(
    platform: Platform, hello: dict[str, Any]
) -> None:
    """Demand hints are for functions without a ready replica; each one costs the scheduler a
    reconcile pass, so a busy warm function must not send them (its queue is the signal)."""
    assert (await call(platform, "hello/shout", json={"text": "warm"})).status_code == 200
    # Recorded ready from a heartbeat, which the router hears as the scheduler does.
    await eventually(lambda: platform.ready_replicas("hello/shout"), within_s=10)
    async with platform.demand_hints() as hints:
        for i in range(4):  # spaced wider than the router's hint interval
            assert (await call(platform, "hello/shout", json={"text": f"{i}"})).status_code == 200
            await asyncio.sleep(0.3)
    assert hints == []


async def test_positional_json_and_bytes_bodies(platform: Platform, trouble: Any) -> None:
    positional = await call(platform, "trouble/divide", json=[6, 3])
    assert positional.json() == 2.0
    reversed_ = await call(
        platform,
        "trouble/reverse",
        content=b"\x00\x01abc",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reversed_.status_code == 200
    assert reversed_.headers["content-type"] == "application/octet-stream"
    assert reversed_.content == b"cba\x01\x00"


async def test_redeploy_unchanged_is_a_no_op_and_a_change_makes_a_version(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "versions.py"
    source = textwrap.dedent(
        """
        import kiln

        app = kiln.App("versions")


        @app.function
        def which() -> str:
            return "{label}"
        """
    )
    app_file.write_text(source.format(label="one"))
    first = await platform.deploy(app_file)
    assert (first["version"], first["unchanged"]) == (1, False)
    assert (await call(platform, "versions/which")).json() == "one"
    again = await platform.deploy(app_file)
    assert (again["version"], again["unchanged"]) == (1, True)
    app_file.write_text(source.format(label="two"))
    second = await platform.deploy(app_file)
    assert (second["version"], second["unchanged"]) == (2, False)
    assert (await call(platform, "versions/which")).json() == "two"
    # Rolling back to the first source makes version 1 current again, for every new call.
    app_file.write_text(source.format(label="one"))
    back = await platform.deploy(app_file)
    assert (back["version"], back["unchanged"]) == (1, False)
    answers = await asyncio.gather(*(call(platform, "versions/which") for _ in range(8)))
    assert [a.json() for a in answers] == ["one"] * 8


# Bad input --------------------------------------------------------------------------------------


async def test_malformed_json_is_400(platform: Platform, trouble: Any) -> None:
    response = await call(
        platform,
        "trouble/divide",
        content=b'{"a": 1,',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_json"
    assert error["message"].startswith("the body is not valid JSON: ")


async def test_arguments_that_do_not_match_show_the_signature(
    platform: Platform, trouble: Any
) -> None:
    response = await call(platform, "trouble/divide", json={"a": 1, "c": 2})
    assert response.status_code == 400
    assert error_of(response) == {
        "code": "invalid_arguments",
        "message": "missing a required argument: 'b'; the signature is "
        "divide(a: float, b: float) -> float",
        "request_id": response.headers["x-request-id"],
    }


async def test_unknown_app_function_and_method_are_404(platform: Platform, hello: Any) -> None:
    cases = {
        "nope/shout": "app 'nope' not found; `kiln deploy` creates it",
        "hello/whisper": "function 'whisper' not found in app 'hello'",
        "hello/Greeter.wave": "class Greeter in app 'hello' has no method 'wave'; its methods: "
        "greet",
        "hello/Greeter": "hello/Greeter is a class; call one of its methods: greet",
    }
    for target, message in cases.items():
        response = await call(platform, target, json={})
        assert response.status_code == 404, target
        assert error_of(response)["message"] == message


async def test_a_function_that_raises_is_500_with_its_exception(
    platform: Platform, trouble: Any
) -> None:
    response = await call(platform, "trouble/divide", json={"a": 1, "b": 0})
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "function_error"
    assert error["message"] == "ZeroDivisionError: division by zero"
    assert "Traceback" not in response.text


async def test_an_unserialisable_result_is_500(platform: Platform, trouble: Any) -> None:
    response = await call(platform, "trouble/a_set")
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "unserializable_result"
    assert error["message"].startswith("a_set returned a value that cannot be sent as JSON")


async def test_a_body_over_the_limit_is_413(platform: Platform, trouble: Any) -> None:
    response = await call(
        platform,
        "trouble/reverse",
        content=b"x" * (BODY_LIMIT + 1),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


async def test_missing_and_wrong_keys_are_401(platform: Platform, hello: Any) -> None:
    async with httpx.AsyncClient(base_url=platform.url) as client:
        bare = await client.post("/v1/run/hello/shout", json={"text": "x"})
        wrong = await client.post(
            "/v1/run/hello/shout",
            json={"text": "x"},
            headers={"Authorization": "Bearer kiln_op_" + "A" * 32 + "_AAAAAA"},
        )
    assert bare.status_code == wrong.status_code == 401
    assert error_of(bare)["code"] == "unauthenticated"
    assert error_of(wrong)["message"] == "malformed API key: check that it was copied whole"


async def test_a_result_over_the_message_limit_arrives_through_the_payload_store(
    platform: Platform, trouble: Any
) -> None:
    response = await call(platform, "trouble/huge")
    assert response.status_code == 200, response.text[:200]
    assert response.headers["content-type"] == "application/octet-stream"
    assert len(response.content) == 4 * 1024 * 1024


async def raw_deploy(platform: Platform, app_file: Path, **override: Any) -> httpx.Response:
    body = {**package(app_file).deploy_body(), **override}
    async with platform.client() as client:
        return await client.post("/v1/apps", json=body)


HANDMADE = """
import kiln

app = kiln.App("handmade")


@app.function
def f() -> int:
    return 1
"""


async def test_the_server_checks_specs_a_client_made_by_hand(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "handmade.py"
    app_file.write_text(HANDMADE)
    spec = package(app_file).app.spec()[0].to_dict()
    spec["resources"]["gpu"] = "none:x"
    bad_gpu = await raw_deploy(platform, app_file, functions=[spec])
    assert bad_gpu.status_code == 400
    assert error_of(bad_gpu)["code"] == "invalid_spec"
    assert "gpu" in error_of(bad_gpu)["message"]
    escape = await raw_deploy(platform, app_file, entrypoint="../../etc/passwd.py")
    assert escape.status_code == 400
    assert error_of(escape)["message"].startswith("entrypoint '../../etc/passwd.py' is not valid")
    forged = await raw_deploy(platform, app_file, digest="0" * 64)
    assert error_of(forged)["message"] == "the archive does not match its digest; upload it again"


SLOW_START = """
import time

import kiln

time.sleep(5)  # a heavy import
app = kiln.App("slowstart")


@app.function
def ping() -> str:
    return "pong"
"""


async def test_a_replica_with_a_slow_import_is_not_taken_for_dead(
    platform: Platform, tmp_path: Path
) -> None:
    app_file = tmp_path / "slowstart.py"
    app_file.write_text(SLOW_START)
    await asyncio.to_thread(platform_deploy_sync, platform, app_file)
    response = await call(platform, "slowstart/ping")
    assert response.status_code == 200, response.text
    assert response.json() == "pong"
    async with platform.client() as client:
        replicas = (await client.get("/v1/functions/slowstart/ping/replicas")).json()["replicas"]
    assert len(replicas) == 1


def platform_deploy_sync(platform: Platform, app_file: Path) -> None:
    asyncio.run(platform.deploy(app_file))


IDLER = """
import os

import kiln

app = kiln.App("idler")


@app.cls(idle_timeout=1, env={"MARKER": "%s"})
class Idler:
    @kiln.method()
    def hello(self) -> str:
        return "hi"

    @kiln.exit()
    def goodbye(self) -> None:
        with open(os.environ["MARKER"], "w") as marker:
            marker.write("exited cleanly")
"""


async def test_an_idle_replica_scales_to_zero_and_runs_its_exit_hook(
    platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "exited"
    app_file = tmp_path / "idler.py"
    app_file.write_text(IDLER % marker)
    await platform.deploy(app_file)
    assert (await call(platform, "idler/Idler.hello")).json() == "hi"

    async def gone() -> bool:
        assert marker.exists(), "the exit hook has not run"
        return await platform.scaled_to_zero("idler/Idler")

    await eventually(gone, within_s=20)
    assert marker.read_text() == "exited cleanly"


# Deadlines and lost replicas --------------------------------------------------------------------


async def test_async_call_over_its_timeout_is_504_and_the_replica_lives_on(
    platform: Platform, trouble: Any
) -> None:
    started = time.monotonic()
    late = await call(platform, "trouble/async_sleepy", json={"seconds": 5})
    assert late.status_code == 504
    assert error_of(late)["code"] == "timeout"
    assert time.monotonic() - started < 4.5
    quick = await call(platform, "trouble/async_sleepy", json={"seconds": 0})
    assert quick.json() == "rested"


async def test_sync_call_over_its_timeout_is_504_and_the_replica_is_replaced(
    platform: Platform, trouble: Any
) -> None:
    late = await call(platform, "trouble/sleepy", json={"seconds": 60})
    assert late.status_code == 504
    assert error_of(late)["code"] == "timeout"
    # The replica whose thread is stuck for a minute leaves at once instead of waiting for it.
    await eventually(lambda: not list(replica_processes("sleepy")), within_s=10)
    # The overrun thread cannot be stopped: that replica drains away and a new one serves.
    again = await call(platform, "trouble/sleepy", json={"seconds": 0})
    assert again.status_code == 200
    assert again.json() == "rested"


def replica_processes(function: str) -> Iterator[psutil.Process]:
    """Replica processes of `function`: fresh ones and assigned standbys alike run in their
    replica directory, beside their launch file."""
    for proc in psutil.process_iter(["cmdline"]):
        if not any(arg.startswith("kiln.invoker.") for arg in proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            launch = Path(proc.cwd()) / "launch.json"
            if launch.exists() and f'"function": "{function}"' in launch.read_text():
                yield proc


async def test_a_replica_killed_mid_call_is_502_worker_lost_within_seconds(
    platform: Platform, trouble: Any, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    body = {"seconds": 30, "started": str(started)}
    pending = asyncio.create_task(call(platform, "trouble/hang", json=body))
    await eventually(started.exists, within_s=30)  # a replica took the call
    victims = list(replica_processes("hang"))
    assert victims
    killed_at = time.monotonic()
    for victim in victims:
        os.kill(victim.pid, signal.SIGKILL)
    response = await pending
    assert response.status_code == 502
    assert error_of(response)["code"] == "worker_lost"
    assert time.monotonic() - killed_at < 8


async def test_a_replica_that_dies_as_the_call_starts_is_worker_lost_not_a_timeout(
    platform: Platform, trouble: Any
) -> None:
    """The router learns which replica took the call before the call's code runs, so even a
    crash at its first instruction is noticed from the missing heartbeats."""
    started = time.monotonic()
    response = await call(platform, "trouble/crash")
    assert response.status_code == 502, response.text
    assert error_of(response)["code"] == "worker_lost"
    assert time.monotonic() - started < 30  # a cold start and a few heartbeats, not 600 s


# Deploying --------------------------------------------------------------------------------------


def test_a_deploy_whose_file_fails_to_import_shows_the_users_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import kiln\n\napp = kiln.App('broken')\nRATIO = 1 / 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(HOME=str(tmp_path), KILN_HOME=str(tmp_path), KILN_URL="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "deploy", str(broken)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "broken.py failed to import" in result.stderr
    assert 'broken.py", line 4' in result.stderr
    assert "ZeroDivisionError: division by zero" in result.stderr
    assert "kiln/functions" not in result.stderr
