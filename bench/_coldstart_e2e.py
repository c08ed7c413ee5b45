"""The end-to-end cold start of `bench/coldstart.py`: a request through the router to a class
with zero replicas whose snapshot is cached on the node, until the response.

It starts `kiln dev` (embedded services, one node agent with its standby pool), deploys a class
whose `@kiln.enter(snap=True)` hook loads the benchmark's model with `from_pretrained`, makes
the first call (which runs the hook and bakes the snapshot), and waits until the node agent has
also copied the snapshot to the shared store: that copy (the agent reads the whole blob, the
embedded NATS writes it) competes with a cold start for this machine's cores, and the first
restore after a bake took 0.43 s instead of 0.08 s while it ran. Then, for each run, it waits
until the function has scaled to zero, a standby process is idle again and the rest of the
platform is at rest, times one call (cold), and at once a second one (warm, same replica). The
cold start's cost is cold minus warm: what the model's own forward pass costs (seconds for bf16
on a CPU without bf16 units) is not cold-start time. The phases come from the platform's own
cold-start histograms.

The timed calls use `--e2e-call`: `touch` (the default) reads one byte of every page of every
weight, which is everything a forward pass would fault in, without its arithmetic: on a CPU
without bf16 units a 355M forward takes 15+ s, and its run-to-run noise would bury a cost of a
tenth of a second. `forward` times `next_token` itself (on a GPU, or with patience). The first
call, which bakes, always runs `next_token`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from warm_path import start_kiln  # noqa: E402

from kiln.devstack.ports import pick_port  # noqa: E402
from kiln.functions.package import package  # noqa: E402
from kiln.snapshots.shared import SharedSnapshots  # noqa: E402
from kiln.wire import Subjects  # noqa: E402

APP = """
import os

import kiln

app = kiln.App("coldbench")


@app.cls(idle_timeout=1, timeout=600, startup_timeout=3600, env={{"MODEL_DIR": "{model_dir}"}})
class Model:
    @kiln.enter(snap=True)
    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            os.environ["MODEL_DIR"], dtype=torch.bfloat16
        ).eval()

    @kiln.method()
    def next_token(self) -> int:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.arange(8).unsqueeze(0)).logits
        return int(logits[0, -1].argmax())

    @kiln.method()
    def touch(self) -> int:
        # One byte of every 4 KiB page of every weight: all a forward pass would fault in,
        # without its arithmetic.
        import torch

        total = 0
        with torch.inference_mode():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                flat = tensor.detach().reshape(-1).view(torch.uint8)
                total += int(flat[::4096].sum())
        return total
"""
_PHASES = ("schedule", "assign", "code_load", "restore", "enter", "first_call")


@dataclass(frozen=True)
class EndToEnd:
    size: str
    bake_s: float
    cold_s: list[float]
    warm_s: list[float]
    phases: dict[str, float]  # mean seconds per restored cold start
    origins: dict[str, float]


def end_to_end(
    args: argparse.Namespace,
    floors: dict[str, float] | None = None,
    from_pretrained: dict[str, float] | None = None,
) -> None:
    """`floors`: seconds to move each size's bytes (warm page cache); `from_pretrained`: the
    median fresh-process `from_pretrained` time, each measured by the tables above."""
    floors = floors or {}
    from_pretrained = from_pretrained or {}
    print("\n== end to end: a request through the router to a class with zero replicas whose "
          "snapshot is on the node (warm page cache), until the response")  # fmt: skip
    for size in args.sizes:
        model_dir = args.workdir.expanduser() / size / "hf"
        method = "next_token" if args.e2e_call == "forward" else "touch"
        result = _measure(size, model_dir, args.runs, method)
        cold = sorted(result.cold_s)
        warm = statistics.median(result.warm_s)
        extra = sorted(c - w for c, w in zip(result.cold_s, result.warm_s, strict=True))
        median = statistics.median(extra)
        print(f"\n  {size}: first call (runs the hook, bakes) {result.bake_s:.2f} s; over "
              f"{len(cold)} runs: cold call median {statistics.median(cold):.3f} s, p90 "
              f"{_p90(cold):.3f} s; warm call median {warm:.3f} s; cold-start cost (cold - "
              f"warm) median {median:.3f} s, p90 {_p90(extra):.3f} s")  # fmt: skip
        shown = ", ".join(f"{name} {result.phases[name] * 1000:.0f} ms"
                          for name in _PHASES if name in result.phases)  # fmt: skip
        print(f"  phases (mean of the restored starts): {shown}")
        print(f"  replicas by origin: {result.origins}")
        floor = floors.get(size)
        if floor is not None:
            limit = 1.5 * floor + 0.1
            verdict = "met" if median <= limit else "missed"
            print(f"  target: cold-start cost <= 1.5 x floor ({floor:.3f} s) + 100 ms = "
                  f"{limit:.3f} s: {verdict}")  # fmt: skip
        reference = from_pretrained.get(size)
        if reference is not None:
            speedup = reference / median
            verdict = "met" if speedup >= 20 else "missed"
            print(f"  target: cold-start cost >= 20x below from_pretrained in a fresh process "
                  f"({reference:.2f} s): {speedup:.1f}x, {verdict}")  # fmt: skip


def _measure(size: str, model_dir: Path, runs: int, method: str) -> EndToEnd:
    with tempfile.TemporaryDirectory(prefix="kiln-coldstart-") as tmp:
        home = Path(tmp)
        app_file = home / "coldbench.py"
        app_file.write_text(textwrap.dedent(APP.format(model_dir=model_dir)))
        port = pick_port([], set())
        # Unpickling the model's class imports its library: standbys import it ahead of time.
        imports = "torch,transformers.models.gpt2.modeling_gpt2"
        kiln, key = start_kiln(home, port, KILN_STANDBY_IMPORTS=imports)
        try:
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(3600.0),
            )
            client.post("/v1/apps", json=package(app_file).deploy_body()).raise_for_status()
            bake_s = _timed_call(client, "next_token")
            _wait_uploaded(home, _wait_sealed(home))
            before = _phase_sums(client)
            cold, warm = [], []
            for _ in range(runs):
                _wait_for_zero(client)
                _wait_for_quiet(kiln.pid)
                cold.append(_timed_call(client, method))
                warm.append(_timed_call(client, method))
            after = _phase_sums(client)
            phases = _mean_phases(before, after)
            return EndToEnd(size, bake_s, cold, warm, phases, _origins(client))
        finally:
            kiln.terminate()
            kiln.wait(120)


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.9))]


def _timed_call(client: httpx.Client, method: str) -> float:
    started = time.perf_counter()
    response = client.post(f"/v1/run/coldbench/Model.{method}", json={})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def _wait_sealed(home: Path, timeout_s: float = 600) -> str:
    """The key of the snapshot the node agent sealed."""
    deadline = time.monotonic() + timeout_s
    root = home / "snapshots"
    while True:
        sealed = [p.parent.name for p in root.glob("*/manifest.sig")] if root.exists() else []
        if sealed:
            return sealed[0]
        if time.monotonic() > deadline:
            raise RuntimeError("the snapshot was never sealed; see the replica logs")
        time.sleep(0.2)


def _wait_uploaded(home: Path, key: str, timeout_s: float = 1800) -> None:
    """Until the agent's copy to the shared store is done: it reads the whole blob and the
    embedded NATS writes it, so a cold start timed meanwhile measures the upload too (which
    is real for the first cold start after a bake on the same node, and noted as such)."""
    nats_url = tomllib.loads((home / "config.toml").read_text())["services"]["nats_url"]

    async def wait() -> None:
        nc = await nats.connect(servers=[nats_url])
        subjects = Subjects("kiln")
        shared = SharedSnapshots(nc.jetstream(), subjects.snapshot_bucket, subjects.snapshot_leases)
        deadline = time.monotonic() + timeout_s
        try:
            while not await shared.has(key):
                if time.monotonic() > deadline:
                    raise RuntimeError("the snapshot never reached the shared store")
                await asyncio.sleep(0.5)
        finally:
            await nc.close()

    asyncio.run(wait())


def _wait_for_zero(client: httpx.Client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/v1/functions/coldbench/Model/replicas").json()["replicas"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the function did not scale to zero")
        time.sleep(0.1)


def _wait_for_quiet(platform_pid: int, timeout_s: float = 120) -> None:
    """An idle standby that finished its imports, and every other process of the platform at
    rest too (the last replica's exit, the pool's refill): a cold start measured while the
    previous one is still being cleaned up measures the cleanup."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        platform = psutil.Process(platform_pid)
        processes = [platform, *platform.children(recursive=True)]
        try:
            for proc in processes:
                proc.cpu_percent(None)
            time.sleep(0.5)
            busy = [p for p in processes if p.cpu_percent(None) >= 5]
            standbys = [
                p for p in processes
                if "kiln.invoker.standby" in p.cmdline()
                and not (Path(p.cwd()) / "launch.json").exists()  # not yet a replica
            ]  # fmt: skip
        except psutil.Error:
            continue  # a process came or went: look again
        if standbys and not busy:
            return
    raise RuntimeError("the platform did not come to rest with a standby ready")


_SAMPLE = re.compile(r'^kiln_cold_start_phase_seconds_(sum|count)\{phase="(\w+)"\} ([0-9.e+-]+)$')


def _phase_sums(client: httpx.Client) -> dict[tuple[str, str], float]:
    sums = {}
    for line in client.get("/metrics").text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            sums[(match[2], match[1])] = float(match[3])
    return sums


def _mean_phases(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, float]:
    means = {}
    for phase in _PHASES:
        count = after.get((phase, "count"), 0) - before.get((phase, "count"), 0)
        if count:
            means[phase] = (after[(phase, "sum")] - before.get((phase, "sum"), 0)) / count
    return means


def _origins(client: httpx.Client) -> dict[str, Any]:
    origins: dict[str, Any] = {}
    pattern = re.compile(r'^kiln_cold_starts_total\{origin="(\w+)"\} ([0-9.e+-]+)$')
    for line in client.get("/metrics").text.splitlines():
        match = pattern.match(line)
        if match:
            origins[match[1]] = int(float(match[2]))
    return origins
