"""`kiln demo`: deploy an app into the running `kiln dev` and time cold and warm calls; with
`--chat-model`, also deploy the catalog's chat entry and time its first token, cold and warm,
through OpenAI's own client."""

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

__all__ = ["TINY", "DemoCall", "chat_model_folder", "parse_calls", "run_demo"]

WARM_CALLS = 20
WARM_STREAMS = 10
TINY = "tiny"  # --chat-model tiny: a small random model built on the spot (nothing to download)
_CHAT_APP = "demo-chat"
_CHAT_TOKENS = 24
_CHAT_IDLE_S = 5  # so that the demo sees a second cold start, from the snapshot

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


def chat_model_folder(settings: Settings) -> Path:
    """Where `--chat-model tiny` builds its model (sandboxed replicas are shown it)."""
    return settings.home / "models" / "tiny-chat"


async def run_demo(
    settings: Settings,
    api_key: str,
    file: Path,
    calls: list[DemoCall],
    echo: Callable[[str], None],
    *,
    chat_model: str | None = None,
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
        if chat_model is not None:
            await _chat_demo(client, url, api_key, chat_model, echo)
    echo(f"demo: done; the platform keeps running at {url} (Ctrl-C stops it)")


async def _chat_demo(
    client: httpx.AsyncClient, url: str, api_key: str, model: str, echo: Callable[[str], None]
) -> None:
    try:
        import openai
    except ImportError:
        echo("demo: skipping the chat model: OpenAI's client is not installed (pip install openai)")
        return
    body = {
        "catalog": "chat", "name": _CHAT_APP, "model": model, "gpu": "none",
        "idle_timeout": _CHAT_IDLE_S,
    }  # fmt: skip
    deployed = (await client.post("/v1/deployments", json=body)).raise_for_status().json()
    echo(f"demo: deployed the catalog's chat entry as {_CHAT_APP}: {deployed['served_model']}")
    async with openai.AsyncOpenAI(base_url=deployed["base_url"], api_key=api_key) as oai:
        baked, text = await _first_token(oai)
        warm = [(await _first_token(oai))[0] for _ in range(WARM_STREAMS)]
        restored = None
        if await _scaled_to_zero(client):
            restored, _ = await _first_token(oai)
    echo(
        f"demo: OpenAI(base_url={deployed['base_url']!r}).chat.completions.create("
        f"model={_CHAT_APP!r}, stream=True) said {text!r}\n"
        f"      first token cold {baked * 1000:7.1f} ms (the first replica: it baked the "
        "snapshot)\n"
        + (
            f"      first token cold {restored * 1000:7.1f} ms (from zero again: restored from "
            "the snapshot)\n"
            if restored is not None
            else "      (it did not scale to zero in time for a second cold start)\n"
        )
        + f"      first token warm {statistics.median(warm) * 1000:7.1f} ms median over "
        f"{WARM_STREAMS} streams"
    )


async def _scaled_to_zero(client: httpx.AsyncClient) -> bool:
    """Wait (a bounded while) for the chat deployment's replicas to go, idle."""
    deadline = time.monotonic() + _CHAT_IDLE_S + 60
    while time.monotonic() < deadline:
        found = (await client.get(f"/v1/deployments/{_CHAT_APP}")).raise_for_status().json()
        if found["status"] == "scaled_to_zero":
            return True
        await asyncio.sleep(1)
    return False


async def _first_token(oai: Any) -> tuple[float, str]:
    """The time to the first text delta of one streamed chat completion, and its whole text."""
    started = time.perf_counter()
    first: float | None = None
    parts = []
    stream = await oai.chat.completions.create(
        model=_CHAT_APP,
        messages=[{"role": "user", "content": "Tell me about kilns."}],
        max_tokens=_CHAT_TOKENS,
        stream=True,
    )
    async for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first or time.perf_counter() - started
            parts.append(delta)
    return first or time.perf_counter() - started, "".join(parts)


async def _timed(client: httpx.AsyncClient, path: str, arguments: Any) -> tuple[float, str]:
    started = time.perf_counter()
    response = await client.post(path, json=arguments)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        return elapsed, f"HTTP {response.status_code}: {response.text}"
    return elapsed, response.text
