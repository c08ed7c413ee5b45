"""The OpenAI-compatible routes against the same engine called in-process (issue 22), in one run:

1. chat: time to first token and tokens per second of streamed chat completions through Kiln
   (the catalog's chat entry, called with OpenAI's own client) against the same engine class
   instantiated here, its hooks run by hand, its torch thread pool as wide as the replica's,
   and its `chat` generator iterated directly, at 1 and 8 concurrent streams (and, where
   torch's default pool is wider, the engine with that pool too). Targets: first token at
   most 5 ms later at p50; streaming throughput at least 0.95x of in-process.
2. embeddings: requests per second of concurrent single-input requests through Kiln and
   in-process, with the engine's batching (the catalog's) and without it (the same engine
   with `max_batch = 1`, deployed as an app of its own with the catalog's concurrency).
3. vLLM, where it is installed and a CUDA GPU is present: Kiln's catalog chat (which then
   generates with vLLM) against vLLM's own OpenAI server on the same model, each alone on the
   GPU. Target: at least 0.9x of its throughput. Elsewhere one line says why it was skipped.

    .venv/bin/python bench/openai.py [--rounds 5] [--max-tokens 64] [--quick] [--model DIR]

Kiln runs as `kiln dev` with its defaults (embedded NATS, PostgreSQL and Redis, sandboxed
replicas where the machine allows), the model folder shown to the sandboxes as an operator
would (KILN_SANDBOX_SHARE). The chat model is a random GPT-2 built here with the byte
tokenizer and chat template of `kiln.catalog.tiny`'s chat model, wide enough that a decoding
step costs real time on a CPU, and it writes until `max_tokens` (it never writes EOS), so
every stream has the same length. Measurements alternate batch by batch, so drift on a busy
machine hits both sides alike.

On a machine with fewer cores than busy processes (client, router, NATS, replica) the wall
clock charges Kiln for sharing the cores; each measurement also reports the CPU time every
process spent per token or request (from /proc, less what it uses idle), which says what each
part costs wherever it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from warm_path import start_kiln, wait_http

import kiln
from kiln.catalog.embeddings import TransformersEmbeddings
from kiln.catalog.entries import ENTRIES
from kiln.catalog.tiny import tiny_chat_model, tiny_embedding_model
from kiln.devstack.ports import pick_port
from kiln.functions.package import package

HERE = Path(__file__).resolve().parent

# Random GPT-2s: on a CPU about 5M parameters (a decoding step of several ms on 2 cores); on a
# GPU GPT-2 small's shape, so that vLLM's step is not all overhead.
CPU_SHAPE = {"layers": 6, "width": 256, "heads": 4}
GPU_SHAPE = {"layers": 12, "width": 768, "heads": 12}
MESSAGES = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a map."}
]
STREAMS = (1, 8)
# So that a round holds as many first tokens at 1 stream as at 8 (a median of a few is noise).
STREAMS_PER_ROUND = 8
# Kiln's own processes: what it adds to the engine's.
PLATFORM = ("server", "nats", "postgres", "redis")
# The processes of a Kiln (or vLLM) server, by a word of their command lines.
ROLES = (
    ("kiln.invoker.replica", "replica"),
    ("kiln.invoker.standby", "standbys"),
    ("nats-server", "nats"),
    ("postgres", "postgres"),
    ("redis-server", "redis"),
    ("bwrap", "bwrap"),
    ("vllm", "vllm"),
)
CHAT, EMBED, UNBATCHED = "bench-chat", "bench-embed", "bench-embed-unbatched"
BATCHED = f"max_batch={TransformersEmbeddings.max_batch} (catalog)"
SINGLE = "max_batch=1"

UNBATCHED_APP = '''
import kiln
from {module} import {engine}

app = kiln.App({app!r})


@app.cls(gpu="none", concurrency={concurrency}, min_replicas=1, max_replicas=1)
class Embeddings({engine}):
    """The catalog's embeddings engine, one input per forward pass."""

    model_id = {model!r}
    max_batch = 1
'''


def openai_package() -> Any:
    """OpenAI's client package. This script has its name, and Python puts the script's folder
    first on sys.path, so `import openai` would import the script itself (and mypy, checking
    this file as module `openai`, cannot see the package's types: the client is Any here)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    return importlib.import_module("openai")


@dataclass(frozen=True)
class Setup:
    chat_model: Path
    embed_model: Path
    share: list[Path]  # folders the sandboxes must read
    work: Path  # app files, logs


# Models ---------------------------------------------------------------------------------------


def build_chat_model(directory: Path, shape: dict[str, int]) -> Path:
    """A random GPT-2 of `shape` with the tiny chat model's tokenizer, chat template and output
    layer (only letters, spaces and punctuation get logits other than 0, far above it: it never
    writes EOS, and each token is one character)."""
    return tiny_chat_model(directory / "chat", **shape)


def parameters(directory: Path) -> int:
    """The parameters in a model folder's safetensors files, from their headers."""
    from safetensors import safe_open

    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                total += math.prod(file.get_slice(name).get_shape())
    return total


def engine_class(slug: str, model: Path, **more: Any) -> type[Any]:
    """The class a catalog deployment of `slug` serves (as `kiln.catalog.apps.catalog_app`
    makes it), for calling in-process."""
    found = ENTRIES[slug]
    module, _, name = found.engine.partition(":")
    base = getattr(importlib.import_module(module), name)
    return type(found.class_name, (base,), {"model_id": str(model), **more})


def gpu_type() -> str:
    """The catalogue's type of this machine's GPU, or "none"."""
    import torch

    from kiln.gpus import gpu_type_of

    return gpu_type_of(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "none"


def vllm_skipped() -> str | None:
    """Why the vLLM comparison cannot run here, or None when it can."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


# Measurements ---------------------------------------------------------------------------------


@dataclass
class Stream:
    ttft_s: float  # request start to the first non-empty delta
    tokens: int  # completion tokens, as the engine counted them
    decode_s: float  # first delta to last
    prompt_tokens: int = 0

    @property
    def rate(self) -> float:
        """Tokens per second after the first: (tokens - 1) / (last delta - first delta)."""
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else math.nan


@dataclass
class Batch:
    streams: list[Stream]
    wall_s: float  # the first request's start to the last stream's end

    @property
    def aggregate(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall_s


def inprocess_stream(engine: Any, request: kiln.ChatRequest, go: threading.Barrier) -> Stream:
    go.wait()
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    prompt = 0
    for item in engine.chat(request):
        if isinstance(item, kiln.Finish):
            tokens, prompt = item.completion_tokens, item.prompt_tokens
        elif item:
            last = time.perf_counter()
            first = first or last
    return Stream(first - started, tokens, last - first, prompt)


def in_process(
    engine: Any, request: kiln.ChatRequest, width: int
) -> Callable[[int], Awaitable[Batch]]:
    """`n` streams of the engine in this process, its torch thread pool `width` wide."""

    def batch(n: int) -> Batch:
        torch_threads(width)
        return inprocess_batch(engine, request, n)

    return lambda n: asyncio.to_thread(batch, n)


def inprocess_batch(engine: Any, request: kiln.ChatRequest, n: int) -> Batch:
    """`n` streams at once, each stepped by a thread of its own (as a replica's call threads
    step theirs)."""
    go = threading.Barrier(n)
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        streams = list(pool.map(lambda _: inprocess_stream(engine, request, go), range(n)))
    return Batch(streams, time.perf_counter() - started)


async def client_stream(client: Any, model: str, max_tokens: int) -> Stream:
    started = time.perf_counter()
    first = last = 0.0
    tokens = prompt = 0
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = int(chunk.usage.completion_tokens)
            prompt = int(chunk.usage.prompt_tokens)
    return Stream(first - started, tokens, last - first, prompt)


async def client_batch(client: Any, model: str, max_tokens: int, n: int) -> Batch:
    started = time.perf_counter()
    streams = await asyncio.gather(*(client_stream(client, model, max_tokens) for _ in range(n)))
    return Batch(list(streams), time.perf_counter() - started)


Usage = dict[int, tuple[str, float]]  # pid: (role, CPU seconds so far)


def cpu_usage(server: int | None) -> Usage:
    """CPU seconds (user + system) used so far by this process (role "bench": the in-process
    engine, or the client) and by the server whose pid is `server` and its children."""
    import psutil

    def used(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    usage = {os.getpid(): ("bench", used(psutil.Process()))}
    if server is None:
        return usage
    root = psutil.Process(server)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            command = " ".join(proc.cmdline())
            role = next((r for key, r in ROLES if key in command), "other")
            usage[proc.pid] = ("server" if proc.pid == server else role, used(proc))
    return usage


def by_role(before: Usage, after: Usage) -> dict[str, float]:
    """The CPU seconds each role used between two readings: a process started meanwhile counts
    whole, one that ended meanwhile is lost."""
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        roles[role] = roles.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return roles


@dataclass
class Idle:
    took_s: float  # until the server was quiet (or the limit)
    cores: dict[str, float]  # what each role uses while nothing is asked of it ({}: never quiet)


async def settle(server: int, *, idle_cores: float = 0.1, limit_s: float = 60) -> Idle:
    """Wait until the server's processes together use under `idle_cores` for 3 s in a row (after
    a deploy Kiln's node agent fills its pool of standby processes, which takes CPU for a
    while), and what each role used meanwhile: its background work (heartbeats, the
    scheduler's loop), taken off what is charged to the measurements."""
    began = time.perf_counter()
    quiet: list[dict[str, float]] = []
    while len(quiet) < 3 and time.perf_counter() - began < limit_s:
        before, started = cpu_usage(server), time.perf_counter()
        await asyncio.sleep(1)
        after, elapsed = cpu_usage(server), time.perf_counter() - started
        used = {r: s / elapsed for r, s in by_role(before, after).items() if r != "bench"}
        quiet = [*quiet, used] if sum(used.values()) < idle_cores else []
    roles = {role for sample in quiet for role in sample}
    cores = {r: statistics.mean(sample.get(r, 0.0) for sample in quiet) for r in roles}
    return Idle(time.perf_counter() - began, cores)


@dataclass
class Target:
    name: str
    run: Callable[[int], Awaitable[Batch]]  # n concurrent streams
    server: int | None = None  # the pid whose process tree serves it (None: in-process)
    idle: dict[str, float] = field(default_factory=dict)  # cores each role uses unasked
    batches: dict[int, list[Batch]] = field(default_factory=dict)
    cpu: dict[int, dict[str, float]] = field(default_factory=dict)  # by streams, by role


async def measure_chat(targets: list[Target], rounds: int) -> None:
    """Every target at every stream count, once to warm up, then `rounds` times interleaved;
    a round runs `STREAMS_PER_ROUND` streams a target at each stream count (8 batches of 1
    stream, one of 8), the targets taking turns batch by batch."""
    for n in STREAMS:
        for t in targets:
            await t.run(n)
    for _ in range(rounds):
        for n in STREAMS:
            for t in [*targets] * max(1, STREAMS_PER_ROUND // n):
                before, started = cpu_usage(t.server), time.perf_counter()
                t.batches.setdefault(n, []).append(await t.run(n))
                elapsed = time.perf_counter() - started
                add_cpu(t.cpu.setdefault(n, {}), before, cpu_usage(t.server), t.idle, elapsed)


def add_cpu(
    total: dict[str, float], before: Usage, after: Usage, idle: dict[str, float], elapsed: float
) -> None:
    """Add each role's CPU seconds between `before` and `after`, less its idle use."""
    for role, seconds in by_role(before, after).items():
        used = seconds - idle.get(role, 0.0) * elapsed
        total[role] = total.get(role, 0.0) + max(0.0, used)


@dataclass
class EmbedTarget:
    name: str
    batching: str
    call: Callable[[str], Awaitable[Any]]
    passes: Callable[[], int] | None = None  # forward passes so far, where it can be read
    server: int | None = None
    idle: dict[str, float] = field(default_factory=dict)
    rps: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    per_pass: list[float] = field(default_factory=list)


async def embed_load(t: EmbedTarget, clients: int, requests: int) -> None:
    """`requests` single-input requests from `clients` concurrent callers."""
    todo = iter(range(requests))
    passes = t.passes() if t.passes else 0

    async def caller() -> None:
        for i in todo:
            started = time.perf_counter()
            await t.call(f"request {i}: a lighthouse keeper finds a map")
            t.latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    t.rps.append(requests / (time.perf_counter() - began))
    if t.passes:
        t.per_pass.append(requests / (t.passes() - passes))


async def measure_embeddings(
    targets: list[EmbedTarget], clients: int, requests: int, rounds: int
) -> None:
    for t in targets:
        await embed_load(t, clients, clients * 2)  # warm up
        t.rps.clear()
        t.latencies.clear()
        t.per_pass.clear()
    for _ in range(rounds):
        for t in targets:
            before, started = cpu_usage(t.server), time.perf_counter()
            await embed_load(t, clients, requests)
            elapsed = time.perf_counter() - started
            add_cpu(t.cpu, before, cpu_usage(t.server), t.idle, elapsed)
            t.requests += requests


# Report ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def chat_table(targets: list[Target], *, ttft_target_ms: float | None, ratio: float) -> None:
    print(f"\n{'target':<22} {'streams':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'tok/s p50':>10} "
          f"{'tok/s p10':>10} {'aggregate':>10}")  # fmt: skip
    print(f"{'':<22} {'':>7} {'ms':>9} {'ms':>9} {'/stream':>10} {'/stream':>10} {'tok/s':>10}")
    stats: dict[tuple[str, int], tuple[float, float, float]] = {}
    for n in STREAMS:
        for t in targets:
            streams = [s for b in t.batches[n] for s in b.streams]
            ttft = [s.ttft_s * 1000 for s in streams]
            rates = [s.rate for s in streams]
            aggregate = statistics.median(b.aggregate for b in t.batches[n])
            stats[(t.name, n)] = (statistics.median(ttft), statistics.median(rates), aggregate)
            print(f"{t.name:<22} {n:>7} {statistics.median(ttft):>9.1f} "
                  f"{percentile(ttft, 0.9):>9.1f} {statistics.median(rates):>10.1f} "
                  f"{percentile(rates, 0.1):>10.1f} {aggregate:>10.1f}")  # fmt: skip
    base, kiln_ = targets[0].name, targets[1].name
    print(f"\n{kiln_} against {base} (p50s; targets from issue 22):")
    for n in STREAMS:
        b, k = stats[(base, n)], stats[(kiln_, n)]
        added = k[0] - b[0]
        line = f"  {n} stream(s): first token {added:+.1f} ms"
        if ttft_target_ms is not None:
            line += f" (target <= {ttft_target_ms:g} ms: {verdict(added <= ttft_target_ms)})"
        per, agg = k[1] / b[1], k[2] / b[2]
        print(f"{line}; tokens/s per stream {per:.3f}x, aggregate {agg:.3f}x (target >= "
              f"{ratio:g}: {verdict(per >= ratio)}, {verdict(agg >= ratio)})")  # fmt: skip


def cpu_line(label: str, cpu: dict[str, float], per: float, unit: str, server: str) -> str:
    """The CPU each role used per `unit`, in ms, the busiest first; `server` names the root."""
    names = {"bench": "this process (engine)" if server == "" else "this process (client)",
             "server": server}  # fmt: skip
    parts = [
        f"{names.get(role, role)} {seconds / per * 1000:.2f}"
        for role, seconds in sorted(cpu.items(), key=lambda item: -item[1])
        if seconds / per * 1000 >= 0.005
    ]
    return f"  {label}: {', '.join(parts)} ms per {unit}"


def chat_cpu(targets: list[Target]) -> None:
    print("\nCPU per completion token by process, less its idle use (ms; on a machine with "
          "fewer cores than busy processes, this says what each costs):")  # fmt: skip
    for n in STREAMS:
        for t in targets:
            tokens = sum(s.tokens for b in t.batches[n] for s in b.streams)
            server = {"kiln": "kiln dev (router, scheduler, agent)"}.get(t.name, t.name)
            label = f"{t.name}, {n} stream(s)"
            print(cpu_line(label, t.cpu[n], tokens, "token", "" if t.server is None else server))
    kiln_ = next(t for t in targets if t.name == "kiln")
    for n in STREAMS:
        tokens = sum(s.tokens for b in kiln_.batches[n] for s in b.streams)
        own = sum(kiln_.cpu[n].get(role, 0.0) for role in PLATFORM) / tokens * 1000
        print(f"  Kiln's own processes ({', '.join(PLATFORM)}) at {n} stream(s): {own:.2f} ms "
              f"per token: one core carries {1000 / max(own, 1e-6):.0f} tokens/s")  # fmt: skip


def embed_table(targets: list[EmbedTarget], clients: int, requests: int) -> None:
    print(f"\nembeddings: {clients} concurrent callers, {requests} requests of one input each "
          f"per round (requests/s = inputs/s)")  # fmt: skip
    print(f"{'target':<14} {'batching':<22} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'inputs/pass':>12}")  # fmt: skip
    for t in targets:
        ms = [v * 1000 for v in t.latencies]
        per_pass = f"{statistics.median(t.per_pass):>12.1f}" if t.per_pass else f"{'-':>12}"
        print(f"{t.name:<14} {t.batching:<22} {statistics.median(t.rps):>8.0f} "
              f"{statistics.median(ms):>8.1f} {percentile(ms, 0.9):>8.1f} {per_pass}")  # fmt: skip
    for t in targets:
        server = "" if t.server is None else "kiln dev (router, scheduler, agent)"
        print(cpu_line(f"{t.name}, {t.batching}", t.cpu, t.requests, "request", server))
    rps = {(t.name, t.batching): statistics.median(t.rps) for t in targets}
    on, off = BATCHED, SINGLE
    replica = {t.batching: t.cpu.get("replica", 0.0) / t.requests * 1000 for t in targets
               if t.name == "kiln"}  # fmt: skip
    print(f"  Kiln's replica spends {replica[on]:.2f} ms of CPU per request with batching, "
          f"{replica[off]:.2f} ms without: {replica[off] / replica[on]:.2f}x the requests per "
          "replica core with batching")  # fmt: skip
    for name in ("in-process", "kiln"):
        print(f"  {name}: batching gives {rps[(name, on)] / rps[(name, off)]:.2f}x the "
              "requests/s")  # fmt: skip
    print(f"  kiln against in-process: {rps[('kiln', on)] / rps[('in-process', on)]:.2f}x with "
          f"batching, {rps[('kiln', off)] / rps[('in-process', off)]:.2f}x without")  # fmt: skip


# Servers --------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_vllm(model: Path, port: int, context: int, log: Path) -> subprocess.Popen[bytes]:
    """vLLM's own OpenAI server on `model`, with its defaults but the context Kiln's engine
    uses."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", CHAT, "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", str(context)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - the child owns it
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=900)
    except RuntimeError:
        stop(proc, 30)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"vLLM's server did not start; the end of its log:\n{tail}") from None
    return proc


def deploy(url: str, key: str, setup: Setup, *, chat_gpu: str, concurrency: int) -> None:
    """The catalog's chat and embeddings entries, and the embeddings engine without batching
    as an app of its own; one replica each, started now."""
    headers = {"Authorization": f"Bearer {key}"}
    scaling = {"min_replicas": 1, "max_replicas": 1}
    for body in (
        {"catalog": "chat", "name": CHAT, "model": str(setup.chat_model), "gpu": chat_gpu},
        {"catalog": "embeddings", "name": EMBED, "model": str(setup.embed_model), "gpu": "none"},
    ):
        response = httpx.post(
            f"{url}/v1/deployments", json={**body, **scaling}, headers=headers, timeout=120
        )
        response.raise_for_status()
    module, _, engine = ENTRIES["embeddings"].engine.partition(":")
    source = UNBATCHED_APP.format(
        module=module, engine=engine, app=UNBATCHED, concurrency=concurrency,
        model=str(setup.embed_model),
    )  # fmt: skip
    folder = setup.work / "unbatched"
    folder.mkdir()
    (folder / "unbatched_app.py").write_text(source)
    body = package(folder / "unbatched_app.py").deploy_body()
    httpx.post(f"{url}/v1/apps", json=body, headers=headers, timeout=120).raise_for_status()


# Run ------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, setup: Setup, stack: contextlib.ExitStack) -> None:
    oai = openai_package()
    skipped = vllm_skipped()
    gpu = gpu_type()
    vllm_target = None
    if skipped is None:  # first, alone on the GPU: Kiln's replica would want the same memory
        vllm_target = await vllm_server(oai, args, setup)

    port = pick_port([], set())
    home = setup.work / "kiln"
    home.mkdir(mode=0o700)
    share = ",".join(str(path) for path in setup.share)
    proc, key = start_kiln(home, port, KILN_SANDBOX_SHARE=share)
    stack.callback(stop, proc, 60)
    url = f"http://127.0.0.1:{port}"
    concurrency = ENTRIES["embeddings"].concurrency
    began = time.perf_counter()
    deploy(url, key, setup, chat_gpu=gpu, concurrency=concurrency)
    async with oai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600
    ) as client:
        # The first call of each waits for its replica to start.
        await asyncio.gather(
            client_stream(client, CHAT, 4),
            client.embeddings.create(model=EMBED, input="warm"),
            client.embeddings.create(model=UNBATCHED, input="warm"),
        )
        up = time.perf_counter() - began
        # The in-process engines load while Kiln's node agent fills its standby pool.
        engines = [
            engine_class("embeddings", setup.embed_model),
            engine_class("embeddings", setup.embed_model, max_batch=1),
        ]
        if vllm_target is None:
            engines.append(engine_class("chat", setup.chat_model))
        quiet, *loaded = await asyncio.gather(
            settle(proc.pid), *(asyncio.to_thread(started, cls) for cls in engines)
        )
        state = (
            f"quiet {quiet.took_s:.0f} s later, then using {sum(quiet.cores.values()):.3f} cores"
            if quiet.cores
            else f"still busy {quiet.took_s:.0f} s later (measured anyway)"
        )
        print(f"kiln dev: three deployments answering {up:.1f} s after the deploy requests; its "
              f"processes {state}")  # fmt: skip

        kiln_target = Target(
            "kiln",
            lambda n: client_batch(client, CHAT, args.max_tokens, n),
            server=proc.pid,
            idle=quiet.cores,
        )
        model = describe(setup.chat_model, gpu, vllm=skipped is None)
        prompt = (await client_stream(client, CHAT, 1)).prompt_tokens
        print(f"\nchat: {model}; prompt {prompt} tokens, max_tokens {args.max_tokens}, "
              f"temperature 0; {args.rounds} rounds after a warm-up")  # fmt: skip
        width = replica_threads(proc.pid)
        print(f"  torch's thread pool: {torch_threads()} by default in this process; "
              f"{width or 'as wide as the machine'} in Kiln's replica (the node agent's "
              f"OMP_NUM_THREADS)")  # fmt: skip
        if vllm_target is not None:
            await measure_chat([kiln_target], args.rounds)
            chat_table([vllm_target, kiln_target], ttft_target_ms=None, ratio=0.9)
            chat_cpu([vllm_target, kiln_target])
            print("  (vLLM's server was measured first, alone: these rounds are not interleaved)")
            print("  the in-process comparison is skipped: on this machine the catalog generates "
                  "with vLLM, compared with vLLM's own server above")  # fmt: skip
        else:
            chat = loaded[2]
            request = kiln.ChatRequest(
                messages=tuple(kiln.Message(role="user", content=m["content"]) for m in MESSAGES),
                max_tokens=args.max_tokens, temperature=0,
            )  # fmt: skip
            # The engine as the replica runs it (its thread pool as wide), which the targets
            # compare with; and, where that differs, as this process runs it by default.
            default = torch_threads()
            widths = [replica_threads(proc.pid) or default]
            widths += [default] if widths[0] != default else []
            inprocess = [
                Target(f"in-process, {w} thread{'s' * (w > 1)}", in_process(chat, request, w))
                for w in widths
            ]
            await measure_chat([inprocess[0], kiln_target, *inprocess[1:]], args.rounds)
            chat.stop()
            torch_threads(default)
            chat_table([inprocess[0], kiln_target, *inprocess[1:]], ttft_target_ms=5.0, ratio=0.95)
            chat_cpu([inprocess[0], kiln_target, *inprocess[1:]])
            print(f"\nvLLM comparison skipped: {skipped}.")

        batched, single = loaded[:2]

        def local(engine: Any) -> Callable[[str], Awaitable[Any]]:
            return lambda text: engine.embed(kiln.EmbeddingsRequest(input=(text,)))

        def remote(model: str) -> Callable[[str], Awaitable[Any]]:
            return lambda text: client.embeddings.create(model=model, input=text)

        embed_targets = [
            EmbedTarget("in-process", BATCHED, local(batched), lambda: int(batched.batches)),
            EmbedTarget("kiln", BATCHED, remote(EMBED), server=proc.pid, idle=quiet.cores),
            EmbedTarget("in-process", SINGLE, local(single), lambda: int(single.batches)),
            EmbedTarget("kiln", SINGLE, remote(UNBATCHED), server=proc.pid, idle=quiet.cores),
        ]
        await measure_embeddings(embed_targets, concurrency, args.embed_requests, args.rounds)
        await batched.stop()
        await single.stop()
        embed_table(embed_targets, concurrency, args.embed_requests)


async def vllm_server(oai: Any, args: argparse.Namespace, setup: Setup) -> Target:
    """vLLM's own server on the chat model, measured at every stream count, then stopped."""
    port = pick_port([], set())
    context = await asyncio.to_thread(model_context, setup.chat_model)
    server = start_vllm(setup.chat_model, port, context, setup.work / "vllm.log")
    try:
        async with oai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
        ) as client:
            target = Target(
                "vllm server",
                lambda n: client_batch(client, CHAT, args.max_tokens, n),
                server=server.pid,
            )
            target.idle = (await settle(server.pid)).cores
            await measure_chat([target], args.rounds)
    finally:
        stop(server, 120)
    return target


def model_context(model: Path) -> int:
    """The context `TransformersText` gives `model`."""
    from transformers import AutoConfig, AutoTokenizer

    from kiln.catalog.text import context_length

    return context_length(AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model))


def torch_threads(width: int | None = None) -> int:
    """The width of this process's torch thread pool, set to `width` first if given."""
    import torch

    if width is not None:
        torch.set_num_threads(width)
    return int(torch.get_num_threads())


def replica_threads(server: int) -> int | None:
    """The thread pool width (OMP_NUM_THREADS) the node agent gave the replicas under `server`
    (the catalog's entries set none of their own); None when it left the pool as wide as the
    machine."""
    import psutil

    for proc in psutil.Process(server).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "kiln.invoker.replica" in " ".join(proc.cmdline()):
                width = proc.environ().get("OMP_NUM_THREADS")
                return int(width) if width else None
    return None


def started(cls: type[Any]) -> Any:
    """An engine with its `load` and `start` hooks run, as a replica runs them. An embeddings
    engine stays on the CPU: Kiln's embeddings deployments here are CPU replicas."""
    engine = cls()
    engine.load()
    if hasattr(engine, "max_batch") and engine.model.device.type != "cpu":
        engine.model = engine.model.to("cpu")
    engine.start()
    return engine


def describe(model: Path, gpu: str, *, vllm: bool) -> str:
    config = json.loads((model / "config.json").read_text())
    shape = ", ".join(f"{k} {config[k]}" for k in ("n_layer", "n_embd", "n_head") if k in config)
    shape = f" ({shape})" if shape else ""
    engine = "vLLM" if vllm else "transformers generate()"
    where = "CPU" if gpu == "none" else gpu
    return (f"{config.get('model_type', '?')}{shape}, {parameters(model) / 1e6:.1f}M "
            f"parameters, {engine} on {where}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds after warm-up")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--embed-requests", type=int, default=384, help="per round and target")
    parser.add_argument("--model", type=Path, help="a chat model folder instead of the random one")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32 tokens, 192 requests")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.max_tokens, args.embed_requests = 2, 32, 192
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs (load average {load}), torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, Python {sys.version.split()[0]}")  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="kiln-bench-") as work_dir,
        contextlib.ExitStack() as stack,
    ):
        work = Path(work_dir)
        models = work / "models"
        on_gpu = vllm_skipped() is None or gpu_type() != "none"
        if args.model is None:
            chat_model = build_chat_model(models, GPU_SHAPE if on_gpu else CPU_SHAPE)
        else:
            chat_model = args.model.resolve()
        embed_model = tiny_embedding_model(models / "embed")
        models.chmod(0o755)
        work.chmod(0o755)  # the sandboxes reach the models through it
        share = [models] if args.model is None else [models, chat_model]
        asyncio.run(run(args, Setup(chat_model, embed_model, share, work), stack))


if __name__ == "__main__":
    main()
