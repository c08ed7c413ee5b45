"""The child processes of bench/coldstart.py; never run by hand.

    _coldstart_worker.py build <size> <dir>       build the model's files once (random weights)
    _coldstart_worker.py load <method> <dir>      a fresh process: import, load, first forward
    _coldstart_worker.py standby <method> <dir>   a Kiln standby: import, print "ready", wait for
                                                  the snapshot's directory on stdin, restore
    _coldstart_worker.py steady - <dir>           the warmed-up forward pass's time

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


def snapshot_key(size: str) -> str:
    from kiln.snapshots.manifest import Runtime
    from kiln.snapshots.manifest import snapshot_key as key_for

    return key_for(f"bench-{size}", "Model", Runtime.current())


def versions() -> dict[str, str]:
    """What the built files depend on beyond the snapshot key (which has Python, torch, Kiln)."""
    from importlib import metadata

    return {name: metadata.version(name) for name in ("transformers", "tensorizer", "safetensors")}


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


def _import(modules: tuple[str, ...]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def _first_forward(model: Any) -> tuple[float, list[float]]:
    import torch

    tokens = torch.arange(TOKENS).unsqueeze(0)
    started = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens).logits
    seconds = time.perf_counter() - started
    flat = logits.float()
    return seconds, [flat.sum().item(), flat.abs().sum().item(), flat[0, -1, :4].sum().item()]


def _measure(method: str, directory: Path) -> dict[str, Any]:
    """Load with `method` (its imports are done), run the first forward, report."""
    import importlib

    load = LOADERS[method][1]
    if method.startswith("kiln"):
        importlib.import_module(_GPT2)  # the function's import, as its replica would run it
    imported = time.monotonic()
    baseline = _rss()
    started = time.perf_counter()
    model = load(directory).eval()
    loaded = time.perf_counter()
    usable = time.monotonic()
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise RuntimeError(f"{len(on_meta)} weights were not loaded, e.g. {on_meta[0]}")
    peak_loaded = _peak_rss()
    first, checksum = _first_forward(model)
    return {
        "usable": usable,
        "imported": imported,
        "load": loaded - started,
        "first": first,
        "baseline_rss": baseline,
        "peak_rss_loaded": peak_loaded,
        "peak_rss": _peak_rss(),
        "checksum": checksum,
    }


def _result(payload: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def _run(method: str, directory: Path, *, standby: bool) -> None:
    modules = LOADERS[method][0]
    try:
        _import(modules)
    except (ImportError, OSError) as exc:
        _result({"error": f"unavailable: {type(exc).__name__}: {exc}"})
        return
    if standby:
        print("ready", flush=True)
        directory = Path(sys.stdin.readline().strip())
    try:
        _result(_measure(method, directory))
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a row, not a crash
        _result({"error": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})


def build(size: str, directory: Path) -> None:
    """The model with random bf16 weights, saved three ways: an HF directory (safetensors), a
    tensorizer file and a sealed Kiln snapshot; then `built.json`, which marks it complete."""
    import torch
    from tensorizer import TensorSerializer
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
    if command == "build":
        build(name, directory)
    elif command == "steady":
        steady(directory)
    else:
        _run(name, directory, standby=command == "standby")


if __name__ == "__main__":
    main()
