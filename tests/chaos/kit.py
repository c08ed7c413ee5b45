"""What the chaos tests share: measuring how long the platform takes to serve again, and jobs
whose every run is counted."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from eventually import eventually
from stack import Platform, finished_jobs

# The promise (docs/operations.md): after a dependency is back, the first call through an
# existing router succeeds within this.
RECOVERY_S = 3.0
# Answers a client may retry: the platform says so (503 with Retry-After), or the router is
# gone (a connection error).
RETRYABLE = {502, 503, 504}

CHAOS_APP = """
import time

import kiln

app = kiln.App("chaos")


@app.function(min_replicas=1, idle_timeout=600)
def echo(x: int) -> int:
    return x


@app.function(min_replicas=1, idle_timeout=600, retries=0)
def slow(x: int, seconds: float = 0.3) -> int:
    time.sleep(seconds)
    return x
"""


async def first_success(
    platform: Platform, target: str, body: dict[str, Any], *, within_s: float
) -> tuple[float, list[int]]:
    """Call `target` until it answers 200: how long that took, and the statuses of the failed
    attempts (each must be one a client may retry)."""
    began = time.monotonic()
    failures: list[int] = []
    async with platform.client() as client:

        async def served() -> httpx.Response:
            try:
                response = await client.post(f"/v1/run/{target}", json=body, timeout=within_s)
            except httpx.TimeoutException:
                failures.append(0)
            else:
                if response.status_code == 200:
                    return response
                failures.append(response.status_code)
                if response.status_code not in RETRYABLE:
                    pytest.fail(response.text)
            raise AssertionError(f"failed so far: {failures}")

        response = await eventually(served, within_s=within_s, what=f"a call of {target}")
    took = time.monotonic() - began
    assert response.json() == body["x"], response.text
    return took, failures


async def spawn_jobs(platform: Platform, count: int, *, start: int = 0) -> dict[str, int]:
    """`count` jobs of chaos/slow: call id -> the value each must return."""
    jobs = {}
    async with platform.client() as client:
        for x in range(start, start + count):
            response = await client.post("/v1/spawn/chaos/slow", json={"x": x})
            assert response.status_code == 202, response.text
            jobs[response.json()["call_id"]] = x
    return jobs


async def job_outcomes(platform: Platform, jobs: dict[str, int], *, within_s: float) -> None:
    """Every job succeeds, once, with its own result."""
    views = await finished_jobs(platform, list(jobs), within_s=within_s)
    async with platform.client() as client:
        for view, (call_id, x) in zip(views, jobs.items(), strict=True):
            assert view["status"] == "succeeded", view
            assert view["attempts"] == 1, view
            result = await client.get(f"/v1/calls/{call_id}/result")
            assert result.json() == x, result.text
