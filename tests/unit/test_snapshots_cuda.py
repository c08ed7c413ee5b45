"""The CUDA restore path on a real GPU: skipped where there is none (CI), run on a lent GPU.

`KILN_TEST_RESTORE_MB` (default 64) sets the size of the large model, and the test prints the
restore throughput next to a plain pinned host-to-device copy of the same bytes.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest
import torch

from kiln.snapshots.bake import bake
from kiln.snapshots.cuda import StagingRing
from kiln.snapshots.manifest import Runtime, blob_name, snapshot_key
from kiln.snapshots.restore import restore_state
from kiln.snapshots.store import SnapshotCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Holder:
    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def seal(tmp_path: Path, holder: Holder) -> SnapshotCache:
    cache = SnapshotCache(tmp_path / "snapshots", secrets.token_urlsafe(32))
    runtime = Runtime.current()
    key = snapshot_key("digest", "Fn", runtime)
    staging = cache.staging(key)
    bake(holder, staging)
    cache.seal(staging, key=key, function="Fn", code_digest="digest", runtime=runtime)
    return cache


def test_cuda_tensors_come_back_on_the_gpu_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    base = torch.randn(16, 16, device="cuda")
    holder = Holder(
        model=model,
        cpu_table=torch.arange(10),
        mixed={
            "view": base[3:],
            "t": base.t(),
            "base": base,
            "flags": torch.ones(5, 1).bool().cuda(),
        },
    )
    cache = seal(tmp_path, holder)
    snapshot = cache.open(snapshot_key("digest", "Fn", Runtime.current()), full=True)
    assert blob_name("cuda") in snapshot.manifest.files
    assert blob_name("cpu") in snapshot.manifest.files
    ring = StagingRing(slots=3, chunk_bytes=4096, streams=2)  # tiny chunks: many ring turns
    from kiln.snapshots import cuda as cuda_module

    cuda_module._ring = ring
    state = restore_state(snapshot).state
    restored = state["model"]
    for (name, a), (_, b) in zip(
        model.state_dict().items(), restored.state_dict().items(), strict=True
    ):
        assert b.device.type == "cuda", name
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    assert state["cpu_table"].device.type == "cpu"
    mixed = state["mixed"]
    assert mixed["view"].untyped_storage().data_ptr() == mixed["base"].untyped_storage().data_ptr()
    for key in ("view", "t", "base", "flags"):
        assert torch.equal(mixed[key], holder.mixed[key]), key  # type: ignore[attr-defined]
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(restored(x), model(x))


def test_a_ring_is_reused_and_restores_a_transformers_model(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.snapshots import cuda as cuda_module

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000)
    model = GPT2LMHeadModel(config)
    torch.nn.Module.to(model, device="cuda", dtype=torch.bfloat16)  # in place
    model.train(False)
    cache = seal(tmp_path, Holder(model=model))
    snapshot = cache.open(snapshot_key("digest", "Fn", Runtime.current()))
    cuda_module._ring = StagingRing(slots=4, chunk_bytes=64 * 1024, streams=3)
    tokens = torch.arange(8, device="cuda").unsqueeze(0)
    with torch.inference_mode():
        want = model(tokens).logits
        for _ in range(3):  # the same ring, its buffers and events, again and again
            restored = restore_state(snapshot).state["model"]
            assert restored.lm_head.weight is restored.transformer.wte.weight
            assert torch.equal(restored(tokens).logits, want)


def test_prepare_makes_the_ring_ahead_of_the_restore(tmp_path: Path) -> None:
    from kiln.snapshots import cuda as cuda_module

    cuda_module._ring = None
    ring = cuda_module.prepare()
    assert cuda_module.staging_ring() is ring
    assert all(buffer.is_pinned() for buffer in ring.buffers)
    assert len({t.ident for t in ring.readers._threads}) == len(ring.buffers)


def _read_rate(path: Path, nbytes: int, threads: int, chunk: int) -> float:
    """Page cache to pinned memory with parallel preadv: the host half of the pipeline."""
    from concurrent.futures import ThreadPoolExecutor

    from kiln.snapshots.blob import read_index
    from kiln.snapshots.cuda import Chunk, _read

    index, _ = read_index(path)
    start = min(e.offset for e in index.entries)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    jobs = [
        (Chunk("x", start + at, at, min(chunk, nbytes - at)), at) for at in range(0, nbytes, chunk)
    ]
    fd = os.open(path, os.O_RDONLY)
    try:
        best = 0.0
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(3):
                started = time.perf_counter()
                list(pool.map(lambda job: _read(fd, pinned[job[1] :], job[0]), jobs))
                best = max(best, nbytes / (time.perf_counter() - started))
        return best
    finally:
        os.close(fd)


def test_restore_throughput_against_a_plain_pinned_copy(tmp_path: Path) -> None:
    megabytes = int(os.environ.get("KILN_TEST_RESTORE_MB", "64"))
    layers = max(1, megabytes // 32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4096, 4096, bias=False) for _ in range(layers)))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = seal(tmp_path, Holder(model=model))
    snapshot = cache.open(snapshot_key("digest", "Fn", Runtime.current()))
    from kiln.snapshots import cuda as cuda_module

    cuda_module._ring = StagingRing()
    restore_state(snapshot)  # warm the page cache and the allocator
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        state = restore_state(snapshot).state
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        del state
    restore_s = min(times)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    floor_s = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        device.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        floor_s = min(floor_s, time.perf_counter() - started)
    del pinned, device
    read = _read_rate(snapshot.file(blob_name("cuda")), nbytes, 16, 16 * 1024 * 1024)
    gib = 2**30
    print(
        f"\nCUDA restore of {nbytes / 2**20:.0f} MiB (page cache warm, best of 3): "
        f"{restore_s * 1000:.1f} ms = {nbytes / restore_s / gib:.2f} GiB/s; pinned "
        f"host-to-device copy floor {floor_s * 1000:.1f} ms = {nbytes / floor_s / gib:.2f} "
        f"GiB/s; page cache to pinned memory (16 preadv threads) {read / gib:.2f} GiB/s"
    )
    state = restore_state(snapshot).state
    for a, b in zip(model.parameters(), state["model"].parameters(), strict=True):
        assert b.device.type == "cuda"
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
