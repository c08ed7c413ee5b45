"""`kiln demo`: deploy an app into the running `kiln dev` and time cold and warm calls."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kiln.errors import InvalidRequest
from kiln.settings import Settings

__all__ = ["DemoCall", "parse_calls", "run_demo"]

WARM_CALLS = 20

DemoCall = tuple[str, Any]


def parse_calls(specs: list[str]) -> list[DemoCall]:
    """`NAME=JSON` pairs, e.g. `shout={"text": "hi"}`."""
    calls = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or not name:
            raise InvalidRequest(
                f'--call {spec!r} is not NAME=JSON, e.g. shout=\'{{"text": "hi"}}\''
            )
        try:
            calls.append((name, json.loads(raw)))
        except ValueError as exc:
            raise InvalidRequest(f"--call {spec!r}: the arguments are not JSON ({exc})") from None
    return calls


async def run_demo(
    settings: Settings, api_key: str, file: Path, calls: list[DemoCall], echo: Callable[[str], None]
) -> None:
    from kiln.functions.package import package

    pkg = await asyncio.to_thread(package, file)
    url = f"http://{settings.host}:{settings.port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        deployed = (await client.post("/v1/apps", json=pkg.deploy_body())).raise_for_status().json()
        echo(f"demo: deployed {deployed['app']} version {deployed['version']}")
        for name, arguments in calls:
            path = f"/v1/run/{deployed['app']}/{name}"
            cold, result = await _timed(client, path, arguments)
            warm = [(await _timed(client, path, arguments))[0] for _ in range(WARM_CALLS)]
            echo(
                f"demo: {deployed['app']}/{name}({json.dumps(arguments)}) = {result}\n"
                f"      cold {cold * 1000:7.1f} ms (a replica started from zero)\n"
                f"      warm {statistics.median(warm) * 1000:7.1f} ms median, "
                f"{min(warm) * 1000:.1f}-{max(warm) * 1000:.1f} ms over {WARM_CALLS} calls"
            )
    echo(f"demo: done; the platform keeps running at {url} (Ctrl-C stops it)")


async def _timed(client: httpx.AsyncClient, path: str, arguments: Any) -> tuple[float, str]:
    started = time.perf_counter()
    response = await client.post(path, json=arguments)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        return elapsed, f"HTTP {response.status_code}: {response.text}"
    return elapsed, response.text
