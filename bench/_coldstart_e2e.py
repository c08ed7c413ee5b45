"""The end-to-end cold start of `bench/coldstart.py`: a request through the router to a class
with zero replicas whose snapshot is on the node, until the response, with Kiln's defaults (no
KILN_STANDBY_IMPORTS: standbys import what the snapshot's manifest says the class needs).

It starts `kiln dev` (embedded services, one node agent with its standby pool), deploys three
copies of a class (three functions, three snapshots) whose `@kiln.enter(snap=True)` hook loads
the benchmark's model with `from_pretrained`, calls each once (which runs the hook and bakes its
snapshot) and waits until the node agent has also copied each snapshot to the shared store (that
copy competes with a cold start for this machine's cores). Then, with the page cache warm and
then right after evicting the snapshots' files, it measures three cases:

    one at a time   the function has scaled to zero and the platform is at rest (the standby
                    pool refilled): one cold call, then at once a warm one (same replica)
    back to back    the next cold call right after the previous one's replica scaled to zero,
                    without waiting for anything else
    three at once   the three functions cold-start together; each then gets a warm call

A cold start's cost is its cold call minus the warm call that follows: what the model's own work
costs is not cold-start time. The timed call is `touch` (one byte of every page of every
weight: all a forward pass faults in, without its arithmetic, which on a CPU without bf16 units
takes seconds and would bury a cost of a tenth of one), or the forward itself with `--e2e-call
forward`. Phases and the process each cold start ran in (standby, partial, fresh) come from the
platform's own metrics.

The floor is the bytes the cold starts move (one snapshot, or three for "three at once") over
the bandwidth measured in the same run: page cache to memory (warm), or the disk right after
eviction (evicted). The naive path's startup is a fresh process's `from_pretrained` and first
forward minus one warm forward, from the tables above.
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
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from warm_path import start_kiln  # noqa: E402

from kiln.devstack.ports import pick_port  # noqa: E402
from kiln.functions.package import package  # noqa: E402
from kiln.settings import Settings  # noqa: E402
from kiln.snapshots.shared import shared_snapshots  # noqa: E402

APP = """
import os

import kiln

app = kiln.App("{app}")


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
APPS = ("coldbench0", "coldbench1", "coldbench2")
CASES = ("one at a time", "back to back", "three at once")
_PHASES = ("schedule", "assign", "code_load", "restore", "enter", "first_call")


@dataclass
class Case:
    size: str
    cache: str
    case: str
    cold_s: list[float] = field(default_factory=list)
    warm_s: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # mean seconds per cold start
    processes: Counter[str] = field(default_factory=Counter)

    def costs(self) -> list[float]:
        return sorted(c - w for c, w in zip(self.cold_s, self.warm_s, strict=True))


def end_to_end(
    args: argparse.Namespace,
    floors: dict[str, dict[str, float]],
    naive: dict[str, dict[str, float]],
    evict: Callable[[list[Path]], None],
) -> None:
    """`floors[size][cache]`: seconds to move one snapshot's bytes; `naive[size][cache]`: the
    naive path's startup (fresh-process from_pretrained and first forward, less a warm
    forward); `evict`: drops files from the page cache (checked with mincore)."""
    states = ["warm", "evicted"] if args.cache == "both" else [args.cache]
    method = "next_token" if args.e2e_call == "forward" else "touch"
    print("\n== end to end, default settings: a request through the router to a class with zero "
          f"replicas whose snapshot is on the node; timed call `{method}`")  # fmt: skip
    results: list[Case] = []
    for size in args.sizes:
        model_dir = args.workdir.expanduser() / size / "hf"
        results += _measure_size(size, model_dir, states, args.runs, method, evict)
    _table(results, floors, naive)


def _measure_size(
    size: str,
    model_dir: Path,
    states: list[str],
    runs: int,
    method: str,
    evict: Callable[[list[Path]], None],
) -> list[Case]:
    with tempfile.TemporaryDirectory(prefix="kiln-coldstart-") as tmp:
        home = Path(tmp)
        port = pick_port([], set())
        # Defaults: nothing about the model is configured. Its files are on this host (no hub to
        # download from), so they are shared with the sandboxes as a node's model store is:
        # readable by every uid.
        for path in (model_dir, *model_dir.rglob("*")):
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
        kiln, key = start_kiln(home, port, KILN_SANDBOX_SHARE=str(model_dir.parent))
        try:
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(3600.0),
            )
            for app in APPS:
                app_file = home / f"{app}.py"
                app_file.write_text(textwrap.dedent(APP.format(app=app, model_dir=model_dir)))
                client.post("/v1/apps", json=package(app_file).deploy_body()).raise_for_status()
            bake_started = time.perf_counter()
            for app in APPS:  # each bakes its snapshot (the hook and one touch)
                _timed_call(client, app, "touch")
            print(f"  [{size}] three snapshots baked in {time.perf_counter() - bake_started:.1f} s",
                  file=sys.stderr)  # fmt: skip
            snapshots = _wait_sealed(home, len(APPS))
            _wait_uploaded(home, list(snapshots.values()))
            files = {
                app: sorted((home / "snapshots" / k).iterdir()) for app, k in snapshots.items()
            }
            cases = []
            for cache in states:
                for case in CASES:
                    result = Case(size, cache, case)
                    before = _metrics(client)
                    for number in range(runs):
                        _one_round(client, kiln.pid, case, method, result, files, cache, evict)
                        print(f"  [{size} {cache} {case}] round {number + 1}/{runs}: cold "
                              f"{result.cold_s[-1]:.3f} s, warm {result.warm_s[-1]:.3f} s",
                              file=sys.stderr)  # fmt: skip
                    after = _settled_metrics(client, before, len(result.cold_s))
                    result.phases = _mean_phases(before, after)
                    result.processes = _processes(before, after)
                    cases.append(result)
            return cases
        finally:
            kiln.terminate()
            kiln.wait(120)


def _one_round(
    client: httpx.Client,
    platform_pid: int,
    case: str,
    method: str,
    result: Case,
    files: dict[str, list[Path]],
    cache: str,
    evict: Callable[[list[Path]], None],
) -> None:
    apps = list(APPS) if case == "three at once" else [APPS[0]]
    for app in apps:
        _wait_for_zero(client, app)
    if case != "back to back":
        _wait_for_quiet(platform_pid)
    if cache == "evicted":
        evict([path for app in apps for path in files[app]])
    with ThreadPoolExecutor(len(apps)) as pool:
        colds = list(pool.map(lambda app: _timed_call(client, app, method), apps))
        warms = list(pool.map(lambda app: _timed_call(client, app, method), apps))
    result.cold_s += colds
    result.warm_s += warms


def _table(
    results: list[Case], floors: dict[str, dict[str, float]], naive: dict[str, dict[str, float]]
) -> None:
    head = ("size", "cache", "case", "n", "cold p50", "warm p50", "cost p50", "cost max",
            "floor", "limit", "verdict", "naive", "x", "verdict", "processes",
            "schedule", "assign", "restore")  # fmt: skip
    widths = (5, 8, 14, 3, 9, 9, 9, 9, 7, 7, 8, 7, 6, 8, 22, 9, 7, 8)
    print("\nseconds (phases in ms, means); cost = cold - warm; limit = 1.5 x floor + 0.1; "
          "x = naive startup / cost p50 (target 20)")  # fmt: skip
    print("".join(f"{h:<{w}} " if i < 3 else f"{h:>{w}} " for i, (h, w) in
                  enumerate(zip(head, widths, strict=True))))  # fmt: skip
    for case in results:
        costs = case.costs()
        scale = len(APPS) if case.case == "three at once" else 1
        floor = floors.get(case.size, {}).get(case.cache)
        cells: list[str] = [case.size, case.cache, case.case, str(len(costs)),
                            f"{statistics.median(case.cold_s):.3f}",
                            f"{statistics.median(case.warm_s):.3f}",
                            f"{statistics.median(costs):.3f}", f"{costs[-1]:.3f}"]  # fmt: skip
        if floor is not None:
            limit = 1.5 * floor * scale + 0.1
            cells += [f"{floor * scale:.3f}", f"{limit:.3f}", "met" if costs[-1] <= limit
                      else "missed"]  # fmt: skip
        else:
            cells += ["-", "-", "-"]
        startup = naive.get(case.size, {}).get(case.cache)
        if startup is not None:
            ratio = startup / max(statistics.median(costs), 1e-3)
            cells += [f"{startup:.2f}", f"{ratio:.0f}", "met" if ratio >= 20 else "missed"]
        else:
            cells += ["-", "-", "-"]
        cells.append(",".join(f"{k}:{v}" for k, v in sorted(case.processes.items())) or "-")
        cells += [f"{case.phases.get(p, 0) * 1000:.0f}" for p in ("schedule", "assign", "restore")]
        print("".join(f"{c:<{w}} " if i < 3 else f"{c:>{w}} " for i, (c, w) in
                      enumerate(zip(cells, widths, strict=True))))  # fmt: skip
    print("  verdict (limit): every cold start of the case, the slowest included, within the "
          "limit; the floor of `three at once` moves three snapshots")  # fmt: skip


def _timed_call(client: httpx.Client, app: str, method: str) -> float:
    started = time.perf_counter()
    response = client.post(f"/v1/run/{app}/Model.{method}", json={})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def _wait_sealed(home: Path, count: int, timeout_s: float = 1800) -> dict[str, str]:
    """App -> the key of its snapshot, once the node agent sealed all `count`."""
    deadline = time.monotonic() + timeout_s
    root = home / "snapshots"
    while True:
        found = {}
        for manifest in root.glob("*/manifest.sig") if root.exists() else ():
            text = (manifest.parent / "manifest.json").read_text()
            app = re.search(r'"function": "(\w+)/Model"', text)
            if app:
                found[app[1]] = manifest.parent.name
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(found)} snapshots were sealed; see the replica logs")
        time.sleep(0.2)


def _wait_uploaded(home: Path, keys: list[str], timeout_s: float = 1800) -> None:
    """Until the agent's copies to the shared store are done: it reads each blob and the
    embedded NATS writes it, which a cold start timed meanwhile would measure too."""
    services = tomllib.loads((home / "config.toml").read_text())["services"]

    async def wait() -> None:
        nc = await nats.connect(
            servers=[services["nats_url"]], user_credentials=services.get("nats_creds")
        )
        shared = shared_snapshots(Settings.from_env({}), nc.jetstream())
        deadline = time.monotonic() + timeout_s
        try:
            for key in keys:
                while not await shared.has(key):
                    if time.monotonic() > deadline:
                        raise RuntimeError("a snapshot never reached the shared store")
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    asyncio.run(wait())


def _wait_for_zero(client: httpx.Client, app: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/functions/{app}/Model/replicas").json()["replicas"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{app} did not scale to zero")
        time.sleep(0.05)


def _wait_for_quiet(platform_pid: int, timeout_s: float = 300) -> None:
    """Every process of the platform at rest (the last replica's exit, the pool's refills
    done), with idle standbys: a cold start measured while the previous one is still being
    cleaned up measures the cleanup (that is the back-to-back case)."""
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
_STARTS = re.compile(r'^kiln_cold_starts_total\{origin="(\w+)",process="(\w+)"\} ([0-9.e+-]+)$')


def _metrics(client: httpx.Client) -> dict[tuple[str, str], float]:
    found = {}
    for line in client.get("/metrics").text.splitlines():
        if match := _SAMPLE.match(line):
            found[(match[2], match[1])] = float(match[3])
        elif match := _STARTS.match(line):
            found[("process", match[2])] = found.get(("process", match[2]), 0) + float(match[3])
    return found


def _settled_metrics(
    client: httpx.Client, before: dict[tuple[str, str], float], cold_starts: int
) -> dict[tuple[str, str], float]:
    """The metrics once the scheduler has counted every cold start of the case (a replica's
    report travels beside its reply, so the last one may still be on its way)."""
    deadline = time.monotonic() + 10
    while True:
        after = _metrics(client)
        if sum(_processes(before, after).values()) >= cold_starts or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _mean_phases(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, float]:
    means = {}
    for phase in _PHASES:
        count = after.get((phase, "count"), 0) - before.get((phase, "count"), 0)
        if count:
            means[phase] = (after[(phase, "sum")] - before.get((phase, "sum"), 0)) / count
    return means


def _processes(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (kind, name), value in after.items():
        if kind == "process":
            counts[name] = int(value - before.get((kind, name), 0))
    return +counts
