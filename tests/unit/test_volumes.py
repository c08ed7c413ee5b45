"""Pods' volumes on a node (kiln.invoker.volumes): an image of the pod's size where the agent may
mount one, parked in a store as a sparse tar and restored on another node, bytes and all."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kiln.blobs import BlobMissing
from kiln.blobs.file_blobs import FileBlobs
from kiln.invoker.volumes import Volumes

POD = "0b0f6a3e-8d3c-4f5e-9a41-2f8b7f3c1d20"
MOUNTS = os.geteuid() == 0 and Path("/dev/loop-control").exists()


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[Volumes, Volumes]]:
    first, second = Volumes(tmp_path / "a" / "volumes"), Volumes(tmp_path / "b" / "volumes")
    yield first, second
    await first.close()
    await second.close()


async def test_a_parked_volume_is_restored_on_another_node_with_its_files(
    nodes: tuple[Volumes, Volumes], tmp_path: Path
) -> None:
    first, second = nodes
    store = FileBlobs(tmp_path / "store")
    volume = await first.prepare(POD, 1, uid=None, holder="r1")
    assert volume.is_mount() == MOUNTS
    (volume / "notes").mkdir()
    (volume / "notes" / "a.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="is in use here: not parked"):
        await first.park(POD, f"{POD}/1.tar", store)  # its replica still runs
    first.release(POD, "r1")
    await first.park(POD, f"{POD}/1.tar", store)
    if MOUNTS:  # a sparse tar: the blocks written travel, not the image's 1 GB
        assert (store.root / POD / "1.tar").stat().st_size < 64 * 2**20

    await second.restore(POD, f"{POD}/1.tar", store)
    moved = await second.prepare(POD, 1, uid=None, holder="r2")
    assert (moved / "notes" / "a.txt").read_text() == "kept"
    assert moved.is_mount() == MOUNTS
    second.release(POD, "r2")
    # The parking node keeps its copy as a cache of that parked copy: restoring it there again
    # reads nothing from the store.
    await store.delete(f"{POD}/1.tar")
    await first.restore(POD, f"{POD}/1.tar", store)
    again = await first.prepare(POD, 1, uid=None, holder="r1")
    assert (again / "notes" / "a.txt").read_text() == "kept"
    first.release(POD, "r1")
    # Used since, the node's copy is not the parked one any more: a restore of it fetches.
    with pytest.raises(BlobMissing):
        await first.restore(POD, f"{POD}/1.tar", store)

    await second.drop(POD)
    assert not moved.exists()
    assert list(second.root.iterdir()) == []


@pytest.mark.skipif(not MOUNTS, reason="needs root and loop devices (a volume of its size)")
async def test_a_volume_holds_its_size_and_no_more(nodes: tuple[Volumes, Volumes]) -> None:
    first, _ = nodes
    volume = await first.prepare(POD, 1, uid=None, holder="r1")
    stats = os.statvfs(volume)
    assert 900 * 2**20 < stats.f_blocks * stats.f_frsize <= 2**30
    with pytest.raises(OSError, match="No space left"):
        _fill(volume / "big", 2 * 2**30)
    assert list(volume.iterdir()) == [volume / "big"]  # a fresh one was empty: no lost+found


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, size)
