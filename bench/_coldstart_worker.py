"""The child processes of bench/coldstart.py; never run by hand.

    _coldstart_worker.py build <size> <dir>       build the model's files once (random weights)
    _coldstart_worker.py build <size> <dir> cuda  and its snapshot baked on the GPU, once
    _coldstart_worker.py load <method> <dir> [cuda]      a fresh process: import, load, first
                                                         forward (on the GPU with `cuda`)
    _coldstart_worker.py standby <method> <dir> [cuda]   a Kiln standby: import (on a GPU: CUDA
                                                         context, cuBLAS, staging ring), print
                                                         "ready", read the snapshot's directory
                                                         on stdin, restore
    _coldstart_worker.py steady - <dir> [cuda]    the warmed-up forward pass's time
    _coldstart_worker.py floor - <blob> cuda      pinned host-to-device and page-cache-to-pinned
                                                  bandwidth, measured on the blob's bytes

A loading child prints one line, `RESULT {json}`: the monotonic clock when the model became usable
(CLOCK_MONOTONIC is system-wide, so the parent subtracts its own spawn or assignment time), the
load and first-forward seconds, RSS figures and a checksum of the first forward's logits, or
`{"error": ...}` when the loader cannot run here. Every import a method needs happens before its
load is timed, so `load` is the loading step alone.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SIZES = {"125m": (768, 12, 12), "355m": (1024, 24, 16), "1.5b": (1600, 48, 25)}
SIGNING_KEY = "kiln-bench-coldstart-snapshot-signing"  # a local cache; nothing secret
TOKENS = 8


def snapshot_key(size: str, device: str = "cpu") -> str:
    from kiln.snapshots.manifest import Runtime
    from kiln.snapshots.manifest import snapshot_key as key_for

    return key_for(f"bench-{size}", "Model", Runtime.current(), device=device)


def versions() -> dict[str, str | None]:
    """What the built files depend on beyond the snapshot key (which has Python, torch, Kiln);
    None for a package that is not installed (no tensorizer file is built without it)."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in ("transformers", "tensorizer", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries the spawning parent's high-water
    mark into it across fork (vfork here) and exec, so a child spawned by a parent that once
    held a large buffer reports the parent's peak as its own."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _shards(directory: Path) -> list[str]:
    return sorted(str(p) for p in (directory / "hf").glob("*.safetensors"))


def _skeleton(directory: Path) -> Any:
    """The model with no storage behind any weight: a loader assigns the loaded tensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(directory / "hf")
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def _assign(model: Any, state: dict[str, Any]) -> Any:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return _tied(model)


def _tied(model: Any) -> Any:
    # GPT-2 ties its output projection to the token embedding; files store the weight once.
    model.lm_head.weight = model.transformer.wte.weight
    return model


def _from_pretrained(directory: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory / "hf", dtype=torch.bfloat16)


def _safetensors(directory: Path) -> Any:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in _shards(directory):
        state.update(load_file(shard))
    return _assign(_skeleton(directory), state)


def _runai(directory: Path) -> Any:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        streamer.stream_files(_shards(directory), device="cpu")
        state = dict(streamer.get_tensors())
    return _assign(_skeleton(directory), state)


def _tensorizer(directory: Path) -> Any:
    from tensorizer import TensorDeserializer

    model = _skeleton(directory)
    deserializer = TensorDeserializer(str(directory / "model.tensors"), device="cpu")
    deserializer.load_into_module(model)
    deserializer.close()
    return _tied(model)


def _fastsafetensors(directory: Path) -> Any:
    from fastsafetensors import fastsafe_open

    with fastsafe_open(_shards(directory), device="cpu", nogds=True) as opened:
        state = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    return _assign(_skeleton(directory), state)


def _from_pretrained_cuda(directory: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory / "hf", dtype=torch.bfloat16, device_map="cuda"
    )


def _from_pretrained_to_cuda(directory: Path) -> Any:
    return _from_pretrained(directory).to("cuda")


def _safetensors_cuda(directory: Path) -> Any:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in _shards(directory):
        state.update(load_file(shard, device="cuda"))
    return _assign(_skeleton(directory), state)


def _kiln(private: bool) -> Callable[[Path], Any]:
    def load(snapshot_dir: Path) -> Any:
        from kiln.snapshots.restore import restore_state
        from kiln.snapshots.store import SnapshotCache

        snapshot = SnapshotCache(snapshot_dir.parent, SIGNING_KEY).open(snapshot_dir.name)
        return restore_state(snapshot, private=private).state["model"]

    return load


# method -> (modules imported before the load is timed, the load)
_GPT2 = "transformers.models.gpt2.modeling_gpt2"
LOADERS: dict[str, tuple[tuple[str, ...], Callable[[Path], Any]]] = {
    "from_pretrained": (("torch", "transformers", _GPT2), _from_pretrained),
    "safetensors": (("torch", "safetensors.torch", _GPT2), _safetensors),
    "runai": (("torch", "runai_model_streamer", _GPT2), _runai),
    "tensorizer": (("torch", "tensorizer", _GPT2), _tensorizer),
    "fastsafetensors": (("torch", "fastsafetensors", _GPT2), _fastsafetensors),
    # A standby imports torch and kiln.snapshots before any request; the function's own imports
    # (transformers, here) come after the assignment, unless its standby made them too.
    "kiln-mapped": (("torch", "kiln.snapshots.restore"), _kiln(private=False)),
    "kiln-private": (("torch", "kiln.snapshots.restore"), _kiln(private=True)),
    "kiln-mapped-tf": (("torch", "kiln.snapshots.restore", _GPT2), _kiln(private=False)),
}


# The same with CUDA as the target. Every process creates its CUDA context before the load is
# timed (a Kiln standby before it is assigned, with its cuBLAS handle and staging ring too).
_CUDA = "kiln.snapshots.cuda"
CUDA_LOADERS: dict[str, tuple[tuple[str, ...], Callable[[Path], Any]]] = {
    "from_pretrained": (("torch", "transformers", _GPT2), _from_pretrained_cuda),
    "from_pretrained-to": (("torch", "transformers", _GPT2), _from_pretrained_to_cuda),
    "safetensors": (("torch", "safetensors.torch", _GPT2), _safetensors_cuda),
    "kiln-cuda": (("torch", "kiln.snapshots.restore", _CUDA), _kiln(private=False)),
    "kiln-cuda-tf": (("torch", "kiln.snapshots.restore", _CUDA, _GPT2), _kiln(private=False)),
}


def loaders(device: str) -> dict[str, tuple[tuple[str, ...], Callable[[Path], Any]]]:
    return CUDA_LOADERS if device == "cuda" else LOADERS


def _import(modules: tuple[str, ...]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def _first_forward(model: Any, device: str = "cpu") -> tuple[float, list[float]]:
    import torch

    tokens = torch.arange(TOKENS, device=device).unsqueeze(0)
    started = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens).logits
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    flat = logits.float()
    return seconds, [flat.sum().item(), flat.abs().sum().item(), flat[0, -1, :4].sum().item()]


def _measure(method: str, directory: Path, device: str = "cpu") -> dict[str, Any]:
    """Load with `method` (its imports are done), run the first forward, report."""
    import importlib

    import torch

    load = loaders(device)[method][1]
    if method.startswith("kiln"):
        importlib.import_module(_GPT2)  # the function's import, as its replica would run it
    imported = time.monotonic()
    baseline = _rss()
    started = time.perf_counter()
    model = load(directory).eval()
    if device == "cuda":
        torch.cuda.synchronize()  # usable means the bytes are on the GPU
    loaded = time.perf_counter()
    usable = time.monotonic()
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise RuntimeError(f"{len(on_meta)} weights were not loaded, e.g. {on_meta[0]}")
    elsewhere = [name for name, p in model.named_parameters() if p.device.type != device]
    if elsewhere:
        raise RuntimeError(f"{len(elsewhere)} weights are not on {device}, e.g. {elsewhere[0]}")
    peak_loaded = _peak_rss()
    first, checksum = _first_forward(model, device)
    result = {
        "usable": usable,
        "imported": imported,
        "load": loaded - started,
        "first": first,
        "baseline_rss": baseline,
        "peak_rss_loaded": peak_loaded,
        "peak_rss": _peak_rss(),
        "checksum": checksum,
    }
    if device == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    return result


def _result(payload: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def _run(method: str, directory: Path, *, standby: bool, device: str = "cpu") -> None:
    modules = loaders(device)[method][0]
    try:
        _import(modules)
    except (ImportError, OSError) as exc:
        _result({"error": f"unavailable: {type(exc).__name__}: {exc}"})
        return
    if device == "cuda":
        _cuda_context(standby=standby)
    if standby:
        print("ready", flush=True)
        directory = Path(sys.stdin.readline().strip())
    try:
        _result(_measure(method, directory, device))
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a row, not a crash
        _result({"error": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})


def _cuda_context(*, standby: bool) -> None:
    """Before the clock: a fresh process creates its CUDA context (any GPU load must, and its
    cost is in `total`, not `load`); a Kiln standby does what a GPU standby does."""
    import torch

    if standby:
        from kiln.snapshots.cuda import prepare

        prepare()
    else:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()


def build(size: str, directory: Path) -> None:
    """The model with random bf16 weights, saved three ways: an HF directory (safetensors), a
    tensorizer file and a sealed Kiln snapshot; then `built.json`, which marks it complete."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.snapshots.bake import bake
    from kiln.snapshots.manifest import Runtime
    from kiln.snapshots.store import SnapshotCache

    n_embd, n_layer, n_head = SIZES[size]
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, dtype="bfloat16")
    # Built on meta and filled directly: the default init is minutes of float32 work on CPU.
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif "ln_" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model = _tied(model).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / "hf")
    if versions()["tensorizer"] is not None:  # else its row says it is not installed
        from tensorizer import TensorSerializer

        model.lm_head.weight = None  # tensorizer would store the tied weight twice
        serializer = TensorSerializer(str(directory / "model.tensors"))
        serializer.write_module(model)
        serializer.close()
        model = _tied(model)
    cache = SnapshotCache(directory / "kiln", SIGNING_KEY)
    key = snapshot_key(size)
    staging = cache.staging(key)
    bake(SimpleNamespace(model=model), staging)
    snapshot = cache.seal(
        staging, key=key, function="bench/Model", code_digest="bench", runtime=Runtime.current()
    )
    _, checksum = _first_forward(model)
    params = sum(p.numel() for p in model.parameters())
    built = {
        "size": size,
        "parameters": params,
        "tensor_bytes": snapshot.manifest.tensor_bytes,
        "snapshot": str(snapshot.directory),
        "checksum": checksum,
        "versions": versions(),
    }
    (directory / "built.json").write_text(json.dumps(built, indent=1))


def build_cuda(size: str, directory: Path) -> None:
    """The built model's snapshot baked from the model on the GPU (a `cuda.safetensors` blob),
    and the checksum of its first forward there; then `built-cuda.json`."""
    from kiln.snapshots.bake import bake
    from kiln.snapshots.manifest import Runtime
    from kiln.snapshots.store import SnapshotCache

    _import(CUDA_LOADERS["safetensors"][0])
    model = _safetensors_cuda(directory).eval()
    _, checksum = _first_forward(model, "cuda")
    cache = SnapshotCache(directory / "kiln-cuda", SIGNING_KEY)
    key = snapshot_key(size, "cuda")
    staging = cache.staging(key)
    bake(SimpleNamespace(model=model), staging)
    snapshot = cache.seal(
        staging, key=key, function="bench/Model", code_digest="bench", runtime=Runtime.current()
    )
    built = {
        "size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensor_bytes": snapshot.manifest.tensor_bytes,
        "snapshot": str(snapshot.directory),
        "checksum": checksum,
        "versions": versions(),
    }
    (directory / "built-cuda.json").write_text(json.dumps(built, indent=1))


def floor_cuda(blob: Path) -> None:
    """The two stages every loader to the GPU goes through, at their best here: reading the
    bytes from the page cache into pinned memory (parallel preadv, the file warm) and copying
    pinned memory to the GPU (one large copy, or 16 MiB copies on four streams)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from kiln.snapshots.blob import read_index
    from kiln.snapshots.cuda import Chunk, _read

    index, _ = read_index(blob)
    start = min(e.offset for e in index.entries)
    nbytes = index.size - start
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def best(passes: int, work: Callable[[], None]) -> float:
        work()
        torch.cuda.synchronize()
        fastest = float("inf")
        for _ in range(passes):
            started = time.perf_counter()
            work()
            torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - started)
        return nbytes / fastest

    def one_copy() -> None:
        device.copy_(pinned, non_blocking=True)

    streams = [torch.cuda.Stream() for _ in range(4)]  # type: ignore[no-untyped-call]
    step = 16 * 1024 * 1024

    def chunked() -> None:
        for number, at in enumerate(range(0, nbytes, step)):
            with torch.cuda.stream(streams[number % len(streams)]):
                device[at : at + step].copy_(pinned[at : at + step], non_blocking=True)
        for stream in streams:
            stream.synchronize()

    reads: dict[str, float] = {}
    fd = os.open(blob, os.O_RDONLY)
    try:
        for threads in (8, 16, 32):
            for chunk in (4 * 1024 * 1024, 16 * 1024 * 1024):
                jobs = [
                    (Chunk("x", start + at, at, min(chunk, nbytes - at)), at)
                    for at in range(0, nbytes, chunk)
                ]
                with ThreadPoolExecutor(threads) as pool:

                    def read(pool: ThreadPoolExecutor = pool, jobs: Any = jobs) -> None:
                        list(pool.map(lambda job: _read(fd, pinned[job[1] :], job[0]), jobs))

                    reads[f"{threads}x{chunk >> 20}MiB"] = best(3, read)
    finally:
        os.close(fd)
    _result(
        {
            "nbytes": nbytes,
            "h2d_one": best(5, one_copy),
            "h2d_chunked": best(5, chunked),
            "reads": reads,
        }
    )


def steady_cuda(directory: Path) -> None:
    """`steady` on the GPU: the warmed-up forward, and the GPU memory it works in."""
    import torch

    _import(CUDA_LOADERS["safetensors"][0])
    model = _safetensors_cuda(directory).eval()
    _first_forward(model, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = [_first_forward(model, "cuda")[0] for _ in range(3)]
    working = torch.cuda.max_memory_allocated() - before
    _result({"forward": min(seconds), "working_memory": working})


def steady(directory: Path) -> None:
    """The forward pass's own cost once warmed up, in time and in working memory: what a first
    forward costs beyond it is the cold start's."""
    _import(LOADERS["safetensors"][0])
    model = _safetensors(directory).eval()
    for param in model.parameters():
        param.detach().reshape(-1)[::1024].sum()  # one read per page: every weight resident
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    seconds = [_first_forward(model)[0] for _ in range(3)]
    _result({"forward": min(seconds[1:]), "working_memory": _peak_rss() - before})


def main() -> None:
    command, name, directory = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    if command == "build":
        (build_cuda if device == "cuda" else build)(name, directory)
    elif command == "steady":
        (steady_cuda if device == "cuda" else steady)(directory)
    elif command == "floor":
        floor_cuda(directory)
    else:
        _run(name, directory, standby=command == "standby", device=device)


if __name__ == "__main__":
    main()
