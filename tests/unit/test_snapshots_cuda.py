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
    started = time.perf_counter()
    state = restore_state(snapshot).state
    torch.cuda.synchronize()
    restore_s = time.perf_counter() - started
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    device.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    floor_s = time.perf_counter() - started
    print(
        f"\nCUDA restore of {nbytes / 2**20:.0f} MiB (page cache warm): {restore_s * 1000:.1f} ms "
        f"= {nbytes / restore_s / 2**30:.2f} GiB/s; pinned host-to-device copy floor "
        f"{floor_s * 1000:.1f} ms = {nbytes / floor_s / 2**30:.2f} GiB/s"
    )
    first = next(iter(state["model"].parameters()))
    assert first.device.type == "cuda"
    assert torch.equal(first.view(torch.int16), next(iter(model.parameters())).view(torch.int16))
