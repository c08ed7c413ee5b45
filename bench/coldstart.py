"""Cold start: Kiln's snapshot restore against the usual ways of loading a model, in fresh
processes, on the same machine, in one run; one table per model size and page-cache state.

    .venv/bin/pip install -e '.[worker,bench]'
    .venv/bin/python bench/coldstart.py [--sizes 125m,355m,1.5b] [--runs 5] [--cache both]
        [--workdir ~/.cache/kiln-bench/coldstart] [--methods from_pretrained,kiln-mapped,...]
        [--device cpu|cuda] [--e2e on|off] [--e2e-call touch|forward]

On CPU the run ends with the end-to-end section (`_coldstart_e2e.py`): cold starts through a
running `kiln dev` with default settings, one at a time, back to back and three at once, page
cache warm and evicted, against the floor and the naive path's startup measured above.

The models are GPT-2 (small, medium, XL: about 125M, 355M and 1.5B parameters) in bf16 with
random weights, built once into the work directory (no downloads) as an HF `save_pretrained`
directory, a tensorizer file and a sealed Kiln snapshot, and reused by later runs. Methods:

    from_pretrained   AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)
    safetensors       a meta-device skeleton + safetensors.torch.load_file + load_state_dict(assign)
    runai             runai-model-streamer's SafetensorsStreamer into the skeleton
    tensorizer        TensorDeserializer(...).load_into_module(skeleton)
    fastsafetensors   fastsafe_open(device="cpu", nogds=True) into the skeleton
    kiln-mapped       Kiln's restore_state, blob mapped copy-on-write (the default), into a standby
    kiln-private      the same, read into private memory with parallel preadv
    kiln-mapped-tf    kiln-mapped into a standby that had also imported transformers' GPT-2

Every run is a fresh process, and the runs alternate between methods (each method's first run,
then each one's second, ...). A Kiln standby is started ahead of its run and imports torch and
kiln.snapshots before it says it is ready; the clock starts when the snapshot is assigned to it.
With `--cache evicted` every file the method reads is dropped from the page cache first
(fsync, then posix_fadvise DONTNEED), and mincore checks that the pages really left.

Columns: `total` spawn (Kiln: assignment) until the model is usable, imports included; `load` the
loading step alone, after the imports; `1st fwd` the first forward pass on 1x8 tokens right after,
where a lazy loader (a mapping) pays for what it put off, so `total+1st` is the honest time to a
first result; `peak RSS` the child's peak resident set after that forward (VmHWM: ru_maxrss would
include the parent's); `base RSS` its resident set after the imports, before loading; `vs
from_pretrained` the ratio of median totals. p90 is nearest-rank, so with 5 runs it is the
slowest. The floor row is the weights' bytes over the best bandwidth measured here: reading the
file from the page cache with parallel preadv, or memcpy (warm), and reading it right after
eviction (evicted). Targets (issue 4): Kiln ahead of every other loader; peak RSS of a CPU
restore at most the snapshot's size plus the process baseline; at least 20x faster than
from_pretrained.

With `--device cuda` every method loads onto the GPU, and the snapshot is one baked from the
model on the GPU (its `cuda.safetensors` blob, restored through the pinned staging ring):

    from_pretrained     AutoModelForCausalLM.from_pretrained(dir, dtype=bf16, device_map="cuda")
    from_pretrained-to  the CPU from_pretrained above, then .to("cuda")
    safetensors         the meta skeleton + load_file(device="cuda") + load_state_dict(assign)
    kiln-cuda           Kiln's restore_state into a standby that imported torch and
                        kiln.snapshots and ran kiln.snapshots.cuda.prepare() (CUDA context,
                        cuBLAS handle, pinned staging ring) before it was assigned
    kiln-cuda-tf        the same, the standby having imported transformers' GPT-2 too

A fresh process creates its CUDA context after its imports and before `load` is timed, so
`load` is the loading step alone for every row and `total` has the context in it. runai,
tensorizer and fastsafetensors have no CUDA rows yet. The floor is the weights' bytes over the
slower of the two stages any loader to the GPU goes through: page cache to pinned memory
(parallel preadv, measured on the blob) and pinned memory to the GPU (measured copies); a
second floor row counts the host-to-device copy alone. `peak GPU` is the process's
max_memory_allocated after the first forward. The end-to-end section runs on CPU only.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import mmap
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _coldstart_worker import SIZES, loaders, snapshot_key, versions

BENCH = Path(__file__).resolve().parent
WORKER = BENCH / "_coldstart_worker.py"
STANDBY = ("kiln-mapped", "kiln-private", "kiln-mapped-tf", "kiln-cuda", "kiln-cuda-tf")
CHILD_TIMEOUT_S = 900
MIB = 1024 * 1024


@dataclass(frozen=True)
class Built:
    size: str
    directory: Path
    parameters: int
    tensor_bytes: int
    snapshot: Path
    checksum: list[float]
    device: str = "cpu"  # where the methods load to; a cuda snapshot was baked on the GPU

    @property
    def snapshot_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.snapshot.iterdir())

    def files(self, method: str) -> list[Path]:
        """What `method` reads, to warm or evict before its run."""
        if method in STANDBY:
            return sorted(self.snapshot.iterdir())
        if method == "tensorizer":  # no file where tensorizer is not installed: its row says so
            files = [self.directory / "model.tensors", self.directory / "hf" / "config.json"]
            return [path for path in files if path.exists()]
        return sorted((self.directory / "hf").iterdir())


@dataclass(frozen=True)
class Run:
    total: float
    load: float
    first: float
    baseline_rss: int
    peak_rss_loaded: int
    peak_rss: int
    checksum: list[float]
    gpu_peak: int = 0


@dataclass
class Row:
    method: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)

    def p90(self, name: str) -> float:
        values = sorted(getattr(run, name) for run in self.runs)
        return values[math.ceil(0.9 * len(values)) - 1]

    def ready_first(self) -> float:
        return statistics.median(run.total + run.first for run in self.runs)

    def wrong(self, reference: list[float]) -> bool:
        return any(
            not math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-3)
            for run in self.runs
            for got, want in zip(run.checksum, reference, strict=True)
        )


def child_env() -> dict[str, str]:
    # Nothing is downloaded: every model is built locally.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RUNAI_STREAMER_LOG_LEVEL": "WARNING"}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED leaves dirty pages where they are
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> float:
    """The fraction of the file's pages in the page cache (mincore on a mapping that is never
    touched, so the check itself reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"mmap of {path} for mincore failed")
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
        return (pages - bytes(vector).count(0)) / pages
    finally:
        _libc.munmap(address, size)


def warm(paths: list[Path]) -> None:
    chunk = bytearray(16 * MIB)
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while f.readinto(chunk):
                pass


@dataclass
class Evictions:
    """Whether DONTNEED did its work: some sandboxes ignore it, and then the evicted rows are
    warm ones under another name."""

    worst: float = 0.0  # the largest fraction of a file still cached right after eviction
    checks: int = 0

    def evict(self, paths: list[Path]) -> None:
        for path in paths:
            drop(path)
            self.worst = max(self.worst, resident(path))
            self.checks += 1

    def describe(self) -> str:
        if self.worst > 0.05:
            return (f"EVICTION DID NOT WORK here: up to {self.worst:.0%} of a file stayed in the "
                    "page cache after DONTNEED, so these rows are partly warm")  # fmt: skip
        return (f"eviction checked with mincore after each of {self.checks} DONTNEEDs: at most "
                f"{self.worst:.1%} of a file stayed in the page cache")  # fmt: skip


@dataclass(frozen=True)
class Floor:
    nbytes: int
    read_warm: float  # bytes per second: page cache to memory, parallel preadv
    memcpy: float
    read_evicted_sequential: float
    read_evicted_parallel: float

    def seconds(self, cache: str) -> float:
        if cache == "warm":
            return self.nbytes / max(self.read_warm, self.memcpy)
        return self.nbytes / max(self.read_evicted_sequential, self.read_evicted_parallel)

    def describe(self) -> str:
        gib = 1024**3
        return (f"bandwidth here: page cache to memory ({READERS} preadv threads) "
                f"{self.read_warm / gib:.2f} GiB/s, memcpy {self.memcpy / gib:.2f} GiB/s; right "
                f"after eviction: sequential read {self.read_evicted_sequential / gib:.2f} GiB/s, "
                f"parallel {self.read_evicted_parallel / gib:.2f} GiB/s")  # fmt: skip


READERS = 8
CHUNK = 64 * MIB


def _parallel_read(fd: int, buffer: memoryview) -> None:
    def read(start: int) -> None:
        end = min(start + CHUNK, len(buffer))
        while start < end:
            got = os.preadv(fd, [buffer[start:end]], start)
            if got <= 0:
                raise OSError(f"short read at byte {start}")
            start += got

    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(read, range(0, len(buffer), CHUNK)))


def _sequential_read(fd: int, buffer: memoryview) -> None:
    position = 0
    while position < len(buffer):
        got = os.preadv(fd, [buffer[position : position + 16 * MIB]], position)
        if got <= 0:
            raise OSError(f"short read at byte {position}")
        position += got


def _parallel_copy(target: bytearray, source: bytearray) -> None:
    to = ctypes.addressof(ctypes.c_char.from_buffer(target))
    base = ctypes.addressof(ctypes.c_char.from_buffer(source))
    size = len(source)

    def copy(start: int) -> None:
        ctypes.memmove(to + start, base + start, min(CHUNK, size - start))  # drops the GIL

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(copy, range(0, size, CHUNK)))


def _best(passes: int, setup: Callable[[], None], work: Callable[[], None], nbytes: int) -> float:
    best = 0.0
    for _ in range(passes):
        setup()
        started = time.perf_counter()
        work()
        best = max(best, nbytes / (time.perf_counter() - started))
    return best


def measure_floor(blob: Path, tensor_bytes: int, *, evicted: bool = True) -> Floor:
    """The bandwidths that bound any loader here, measured on the snapshot's blob (without
    `evicted`, the reads right after eviction are not measured and left at 0)."""
    size = blob.stat().st_size
    source = bytearray(size)  # written once before timing, so its pages are all there
    view = memoryview(source)
    fd = os.open(blob, os.O_RDONLY)
    try:
        warm([blob])
        _parallel_read(fd, view)
        read_warm = _best(3, lambda: None, lambda: _parallel_read(fd, view), size)
        target = bytearray(size)
        memcpy = _best(3, lambda: None, lambda: _parallel_copy(target, source), size)
        sequential = parallel = 0.0
        if evicted:
            sequential = _best(2, lambda: drop(blob), lambda: _sequential_read(fd, view), size)
            parallel = _best(2, lambda: drop(blob), lambda: _parallel_read(fd, view), size)
    finally:
        os.close(fd)
    return Floor(tensor_bytes, read_warm, memcpy, sequential, parallel)


@dataclass(frozen=True)
class CudaFloor:
    """What bounds a load onto the GPU: the host's reads (page cache, or the disk right after
    eviction) and the pinned host-to-device copy, which a perfect loader overlaps."""

    host: Floor
    read_pinned: float  # page cache to pinned memory, the best of the reads `floor` measured
    h2d: float  # pinned memory to the GPU, the best of one large copy and chunked copies
    detail: dict[str, Any]

    def read(self, cache: str) -> float:
        if cache == "warm":
            return max(self.host.read_warm, self.read_pinned)
        return max(self.host.read_evicted_sequential, self.host.read_evicted_parallel)

    def seconds(self, cache: str) -> float:
        return self.host.nbytes / min(self.read(cache), self.h2d)

    def h2d_seconds(self) -> float:
        return self.host.nbytes / self.h2d

    def describe(self) -> str:
        gib = 1024**3
        reads = ", ".join(f"{k} {v / gib:.2f}" for k, v in self.detail["reads"].items())
        text = (f"bandwidth here: pinned host-to-device copy {self.h2d / gib:.2f} GiB/s (one "
                f"copy {self.detail['h2d_one'] / gib:.2f}, 16 MiB chunks on 4 streams "
                f"{self.detail['h2d_chunked'] / gib:.2f}); page cache to pinned memory "
                f"{self.read_pinned / gib:.2f} GiB/s (preadv threads x chunk: {reads} GiB/s), "
                f"to pageable memory {self.host.read_warm / gib:.2f} GiB/s")  # fmt: skip
        if self.host.read_evicted_parallel:
            text += (f"; right after eviction: sequential read "
                     f"{self.host.read_evicted_sequential / gib:.2f} GiB/s, parallel "
                     f"{self.host.read_evicted_parallel / gib:.2f} GiB/s")  # fmt: skip
        return text


def measure_cuda_floor(built: Built, states: list[str]) -> CudaFloor:
    blob = built.snapshot / "cuda.safetensors"
    host = measure_floor(blob, built.tensor_bytes, evicted="evicted" in states)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "floor", "-", str(blob), "cuda"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    found = _result(proc)
    if "error" in found:
        raise SystemExit(f"the GPU bandwidths could not be measured: {found['error']}")
    return CudaFloor(
        host=host,
        read_pinned=max(found["reads"].values()),
        h2d=max(found["h2d_one"], found["h2d_chunked"]),
        detail=found,
    )


def import_costs(python: str) -> str:
    """What a standby spares a request: spawn until the imports are done (as `total` counts
    them; the interpreter's exit is not included), in fresh interpreters."""
    costs = []
    for modules in ("torch", "torch, transformers.models.gpt2.modeling_gpt2"):
        seconds = []
        for _ in range(3):
            started = time.monotonic()
            done = subprocess.run(
                [python, "-c", f"import {modules}, time; print(time.monotonic())"],
                check=True,
                capture_output=True,
                text=True,
            )
            seconds.append(float(done.stdout.split()[-1]) - started)
        costs.append(f"import {modules}: {statistics.median(seconds):.2f} s")
    return "imports a standby pays before a request (spawn to imported, median of 3): " + (
        "; ".join(costs)
    )


def cuda_costs(python: str) -> str:
    """What a GPU standby also spares a request: the CUDA context, and the rest of `prepare`."""
    costs = []
    for label, code in (
        ("import torch + CUDA context", "import torch; torch.zeros(1, device='cuda')"),
        ("import torch, kiln.snapshots.restore + kiln.snapshots.cuda.prepare()",
         "import torch, kiln.snapshots.restore, kiln.snapshots.cuda as c; c.prepare()"),
    ):  # fmt: skip
        seconds = []
        for _ in range(3):
            started = time.monotonic()
            done = subprocess.run(
                [python, "-c", f"{code}; import time; print(time.monotonic())"],
                check=True,
                capture_output=True,
                text=True,
            )
            seconds.append(float(done.stdout.split()[-1]) - started)
        costs.append(f"{label}: {statistics.median(seconds):.2f} s")
    return "and on the GPU (spawn to ready, median of 3): " + "; ".join(costs)


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def ensure_built(size: str, workdir: Path) -> Built:
    directory = workdir / size
    marker = directory / "built.json"
    key = snapshot_key(size)
    if marker.exists():
        built = json.loads(marker.read_text())
        if Path(built["snapshot"]).name == key and built.get("versions") == versions():
            return _built(built, directory)
    for stale in ("hf", "model.tensors", "kiln", "built.json", "kiln-cuda", "built-cuda.json"):
        path = directory / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    print(f"building {size} in {directory} (once; later runs reuse it)", file=sys.stderr)
    subprocess.run(
        [sys.executable, str(WORKER), "build", size, str(directory)],
        env=child_env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return _built(json.loads(marker.read_text()), directory)


def ensure_built_cuda(built: Built) -> Built:
    """`built` with its snapshot baked from the model on the GPU (built once, then reused)."""
    directory = built.directory
    marker = directory / "built-cuda.json"
    key = snapshot_key(built.size, "cuda")
    if marker.exists():
        raw = json.loads(marker.read_text())
        if Path(raw["snapshot"]).name == key and raw.get("versions") == versions():
            return dataclasses.replace(_built(raw, directory), device="cuda")
    if (directory / "kiln-cuda").is_dir():
        shutil.rmtree(directory / "kiln-cuda")
    print(f"baking {built.size}'s snapshot on the GPU (once)", file=sys.stderr)
    subprocess.run(
        [sys.executable, str(WORKER), "build", built.size, str(directory), "cuda"],
        env=child_env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return dataclasses.replace(_built(json.loads(marker.read_text()), directory), device="cuda")


def _built(raw: dict[str, Any], directory: Path) -> Built:
    return Built(
        size=str(raw["size"]),
        directory=directory,
        parameters=int(raw["parameters"]),
        tensor_bytes=int(raw["tensor_bytes"]),
        snapshot=Path(str(raw["snapshot"])),
        checksum=list(raw["checksum"]),
    )


def _result(proc: subprocess.Popen[str], stdin: str | None = None) -> dict[str, Any]:
    try:
        out, err = proc.communicate(stdin, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"failed: no result in {CHILD_TIMEOUT_S} s"}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    tail = " | ".join(err.strip().splitlines()[-3:])
    return {"error": f"failed: exit status {proc.returncode}: {tail[-300:]}"}


def prepare(paths: list[Path], cache: str, evictions: Evictions) -> None:
    if cache == "warm":
        warm(paths)
    else:
        evictions.evict(paths)


def run_once(method: str, built: Built, cache: str, evictions: Evictions) -> Run | str:
    paths = built.files(method)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    if method in STANDBY:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "standby", method, "-", built.device],
            stdin=subprocess.PIPE,
            env=child_env(),
            **pipes,
        )
        assert proc.stdout is not None
        # The standby's imports, before any request.
        readable, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT_S)
        if not readable:
            proc.kill()
            proc.communicate()
            return f"failed: the standby was not ready in {CHILD_TIMEOUT_S} s"
        said = proc.stdout.readline().strip()
        if said != "ready":
            return str(_result(proc).get("error", said))
        prepare(paths, cache, evictions)
        started = time.monotonic()
        result = _result(proc, f"{built.snapshot}\n")
    else:
        prepare(paths, cache, evictions)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "load", method, str(built.directory), built.device],
            stdin=subprocess.DEVNULL,
            env=child_env(),
            **pipes,
        )
        result = _result(proc)
    if "error" in result:
        return str(result["error"])
    return Run(
        total=float(result["usable"]) - started,
        load=float(result["load"]),
        first=float(result["first"]),
        baseline_rss=int(result["baseline_rss"]),
        peak_rss_loaded=int(result["peak_rss_loaded"]),
        peak_rss=int(result["peak_rss"]),
        checksum=list(result["checksum"]),
        gpu_peak=int(result.get("gpu_peak", 0)),
    )


def measure(
    built: Built, methods: list[str], cache: str, runs: int
) -> tuple[dict[str, Row], list[str]]:
    """Every method `runs` times, alternating; and what was known about the conditions."""
    rows = {method: Row(method) for method in methods}
    evictions = Evictions()
    load = 0.0
    for number in range(1, runs + 1):
        load = max(load, os.getloadavg()[0])
        progress = []
        for method in methods:
            row = rows[method]
            if row.error:
                continue
            outcome = run_once(method, built, cache, evictions)
            if isinstance(outcome, str):
                row.error = outcome
                progress.append(f"{method} {outcome[:60]}")
            else:
                row.runs.append(outcome)
                progress.append(f"{method} {outcome.total:.2f}s")
        print(f"  [{built.size} {cache}] run {number}/{runs}: " + ", ".join(progress),
              file=sys.stderr)  # fmt: skip
    # The benchmark keeps about one CPU busy; much more means something else ran beside it.
    notes = [f"machine load during the runs (1-minute average, sampled per round): up to "
             f"{load:.1f} on {os.cpu_count()} CPUs"]  # fmt: skip
    if cache == "evicted":
        notes.append(evictions.describe())
    return rows, notes


def _s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.2f}"


def table(
    built: Built,
    cache: str,
    rows: dict[str, Row],
    floor_s: float,
    runs: int,
    h2d_floor_s: float | None = None,
) -> None:
    cuda = built.device == "cuda"
    print(f"\n{built.size}: {built.parameters / 1e6:.1f}M parameters, "
          f"{built.tensor_bytes / MIB:.1f} MiB of bf16 weights; "
          + ("loaded onto the GPU; " if cuda else "") + f"page cache {cache}; "
          f"{runs} runs each; seconds, medians unless marked")  # fmt: skip
    head = ("method", "total", "total p90", "load", "1st fwd", "total+1st", "peak RSS",
            "base RSS", "vs from_pretrained")  # fmt: skip
    width = 19 if cuda else 17
    print(f"{head[0]:<{width}}" + "".join(f"{h:>11}" for h in head[1:6])
          + f"{head[6] + ' MiB':>14}{head[7] + ' MiB':>14}{head[8]:>20}"
          + (f"{'peak GPU MiB':>14}" if cuda else ""))  # fmt: skip
    reference = rows.get("from_pretrained")
    base = reference.median("total") if reference and reference.runs else None
    for row in rows.values():
        name = row.method + (" *" if row.method in STANDBY else "")
        if row.error or not row.runs:
            print(f"{name:<{width}}  {row.error or 'no runs'}")
            continue
        cells = [row.median("total"), row.p90("total"), row.median("load"), row.median("first"),
                 row.ready_first()]  # fmt: skip
        speedup = f"{base / row.median('total'):.1f}x" if base else "-"
        flag = "  WRONG OUTPUT" if row.wrong(built.checksum) else ""
        gpu = f"{row.median('gpu_peak') / MIB:>14.1f}" if cuda else ""
        print(f"{name:<{width}}" + "".join(f"{_s(c):>11}" for c in cells)
              + f"{row.median('peak_rss') / MIB:>14.1f}{row.median('baseline_rss') / MIB:>14.1f}"
              + f"{speedup:>20}{gpu}{flag}")  # fmt: skip
    print(f"{'floor':<{width}}{'-':>11}{'-':>11}{_s(floor_s):>11}")
    if h2d_floor_s is not None:
        print(f"{'floor (H2D alone)':<{width}}{'-':>11}{'-':>11}{_s(h2d_floor_s):>11}")
    ready = "; CUDA context, cuBLAS, staging ring made" if cuda else ""
    print(f"  * total = snapshot assigned to a standby (torch, kiln.snapshots imported{ready}) "
          "until usable; other rows: process spawn until usable")  # fmt: skip


def targets(
    built: Built,
    rows: dict[str, Row],
    working: int | None,
    floors: dict[str, float] | None = None,
) -> None:
    others = [r for r in rows.values() if r.method not in STANDBY and r.runs and not r.error]
    reference = rows.get("from_pretrained")
    for kiln in (rows.get(m) for m in STANDBY):
        if kiln is None or not kiln.runs:
            continue
        print(f"  {kiln.method}:")
        for name, label in (("load", "load"), ("total", "total")):
            mine = kiln.median(name)
            if others:
                best = min(others, key=lambda r, n=name: r.median(n))
                verdict = "met" if mine < best.median(name) else "missed"
                print(f"    ahead of every other loader ({label}): {_s(mine)} s against "
                      f"{_s(best.median(name))} s ({best.method}): {verdict}")  # fmt: skip
        if reference and reference.runs:
            ratio = reference.median("total") / kiln.median("total")
            print(f"    >= 20x faster than from_pretrained (total): {ratio:.1f}x: "
                  f"{'met' if ratio >= 20 else 'missed'}")  # fmt: skip
        for label, floor_s in (floors or {}).items():
            limit = 1.5 * floor_s + 0.1
            for name, mine in (("total", kiln.median("total")), ("total+1st", kiln.ready_first())):
                print(f"    within 1.5x the {label} floor + 100 ms ({name}): {_s(mine)} s against "
                      f"1.5 x {_s(floor_s)} + 0.1 = {_s(limit)} s "
                      f"({mine / floor_s:.1f}x the floor): "
                      f"{'met' if mine <= limit else 'missed'}")  # fmt: skip
        if built.device == "cuda":
            continue  # the RSS target is a CPU restore's
        peak = max(run.peak_rss for run in kiln.runs)
        loaded = max(run.peak_rss_loaded for run in kiln.runs)
        limit = built.snapshot_bytes + kiln.median("baseline_rss")
        print(f"    peak RSS <= snapshot + baseline: worst run {peak / MIB:.1f} MiB after the "
              f"first forward ({loaded / MIB:.1f} right after the restore) against "
              f"{built.snapshot_bytes / MIB:.1f} + {kiln.median('baseline_rss') / MIB:.1f} = "
              f"{limit / MIB:.1f} MiB: {'met' if peak <= limit else 'missed'}")  # fmt: skip
        if working is not None and peak > limit:
            verdict = "met" if peak - working <= limit else "missed"
            print(
                f"      less the forward's own working memory ({working / MIB:.1f} MiB, "
                f"measured on a warmed-up model): {(peak - working) / MIB:.1f} MiB: {verdict}"
            )


def steady_forward(built: Built) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "steady", "-", str(built.directory), built.device],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return _result(proc)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", choices=("warm", "evicted", "both"), default="both")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache/kiln-bench/coldstart")
    parser.add_argument("--methods", default=None, help="default: every method of --device")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--no-import-costs",
        action="store_true",
        help="skip the lines on what imports cost (each spawns a few interpreters)",
    )
    parser.add_argument(
        "--e2e",
        choices=("on", "off"),
        default="on",
        help="the end-to-end cold starts through a running platform (CPU only)",
    )
    parser.add_argument(
        "--e2e-call",
        choices=("touch", "forward"),
        default="touch",
        help="the timed end-to-end call: read every weight page (touch) or a forward pass",
    )
    args = parser.parse_args()
    if args.methods is None:
        args.methods = ",".join(loaders(args.device))
    for option, allowed in (("sizes", SIZES), ("methods", loaders(args.device))):
        chosen = [x.strip() for x in getattr(args, option).split(",") if x.strip()]
        unknown = [x for x in chosen if x not in allowed]
        if unknown or not chosen:
            parser.error(f"--{option} {getattr(args, option)!r}: unknown {unknown}; "
                         f"choose from {', '.join(allowed)}")  # fmt: skip
        setattr(args, option, chosen)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: run each method at least once (5 for the issue)")
    return args


def gpu_name() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "a GPU nvidia-smi could not name"
    return done.stdout.strip().splitlines()[0]


def other_loaders() -> str:
    from importlib import metadata

    found = []
    for name in ("runai-model-streamer", "tensorizer", "fastsafetensors"):
        try:
            found.append(f"{name} {metadata.version(name)} (installed)")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "no CUDA rows yet for " + ", ".join(found)


def main_cuda(args: argparse.Namespace, states: list[str], workdir: Path) -> None:
    print(f"machine: {os.cpu_count()} CPUs, {memory_gib():.0f} GiB RAM, GPU {gpu_name()}, "
          f"Python {sys.version.split()[0]}; work directory {workdir}")  # fmt: skip
    if not args.no_import_costs:
        print(import_costs(sys.executable))
        print(cuda_costs(sys.executable))
    print(other_loaders())
    for size in args.sizes:
        built = ensure_built_cuda(ensure_built(size, workdir))
        floor = measure_cuda_floor(built, states)
        print(f"\n== {size} on the GPU: {floor.describe()}")
        steady = steady_forward(built)
        if "forward" in steady:
            print(f"   a warmed-up forward on 1x8 tokens takes {_s(steady['forward'])} s and "
                  f"{steady['working_memory'] / MIB:.1f} MiB of GPU working memory here: of "
                  "`1st fwd`, only the excess over it is cold-start cost")  # fmt: skip
        else:
            print(f"   the warmed-up forward could not be measured: {steady.get('error')}")
        for cache in states:
            rows, notes = measure(built, args.methods, cache, args.runs)
            table(built, cache, rows, floor.seconds(cache), args.runs, floor.h2d_seconds())
            for note in notes:
                print(f"  {note}")
            print("  targets:")
            floors = {"read+H2D": floor.seconds(cache), "H2D-alone": floor.h2d_seconds()}
            targets(built, rows, None, floors)
    print("\nthe end-to-end cold start through the router is measured on CPU only "
          "(--device cpu)")  # fmt: skip


def main() -> None:
    args = parse_args()
    states = ["warm", "evicted"] if args.cache == "both" else [args.cache]
    workdir = args.workdir.expanduser()
    if args.device == "cuda":
        main_cuda(args, states, workdir)
        return
    print(f"machine: {os.cpu_count()} CPUs, {memory_gib():.0f} GiB RAM, "
          f"Python {sys.version.split()[0]}; work directory {workdir}")  # fmt: skip
    if not args.no_import_costs:
        print(import_costs(sys.executable))
    # For the end-to-end section: each size's floors and the naive path's startup, by cache.
    floors: dict[str, dict[str, float]] = {}
    naive: dict[str, dict[str, float]] = {}
    for size in args.sizes:
        built = ensure_built(size, workdir)
        floor = measure_floor(built.snapshot / "cpu.safetensors", built.tensor_bytes)
        floors[size] = {cache: floor.seconds(cache) for cache in ("warm", "evicted")}
        print(f"\n== {size}: {floor.describe()}")
        steady = steady_forward(built)
        working = steady.get("working_memory")
        if "forward" in steady:
            print(f"   a warmed-up forward on 1x8 tokens takes {_s(steady['forward'])} s and "
                  f"{working / MIB:.1f} MiB of working memory here: of `1st fwd`, only the "
                  "excess over it is cold-start cost")  # fmt: skip
        else:
            print(f"   the warmed-up forward could not be measured: {steady.get('error')}")
        for cache in states:
            rows, notes = measure(built, args.methods, cache, args.runs)
            usual = rows.get("from_pretrained")
            if usual and usual.runs and "forward" in steady:
                # What the naive path adds before its first answer: all but the forward itself.
                naive.setdefault(size, {})[cache] = usual.ready_first() - steady["forward"]
            table(built, cache, rows, floor.seconds(cache), args.runs)
            for note in notes:
                print(f"  {note}")
            print("  targets:")
            targets(built, rows, working)
    if args.e2e == "on":
        from _coldstart_e2e import end_to_end

        evictions = Evictions()
        end_to_end(args, floors, naive, evictions.evict)
        if args.cache != "warm":
            print(f"  {evictions.describe()}")


if __name__ == "__main__":
    main()
