"""Snapshots: bake real torch objects, seal and sign them, restore them mapped and copied, and
compare every tensor bit for bit; damaged, tampered and foreign snapshots are refused."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from kiln.errors import SnapshotError, SnapshotTampered
from kiln.invoker.sandbox import link_tree
from kiln.snapshots.bake import bake
from kiln.snapshots.blob import ALIGN, BlobEntry, read_index
from kiln.snapshots.cuda import plan_chunks
from kiln.snapshots.manifest import GRAPH, Runtime, blob_name, snapshot_key
from kiln.snapshots.restore import restore_state
from kiln.snapshots.store import STAMP, Snapshot, SnapshotCache
from kiln.wire import affinity_id

RUNTIME = Runtime(python="3.11.7-x86_64", torch="2.13.0+cpu", kiln="0.1.0")


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two places
        self.register_buffer("positions", torch.arange(8))
        self.register_buffer("mask", torch.ones(8, 8, dtype=torch.bool).tril())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(self.embed(ids)))
        return out


class Holder:
    """A class instance after its snap hooks ran: modules, loose tensors, plain state."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only for the type checker: attributes are dynamic
        raise AttributeError(name)


def make_holder() -> Holder:
    torch.manual_seed(0)
    holder = Holder()
    holder.model = Tied()
    base = torch.randn(6, 10)
    holder.tensors = {
        "fp32": torch.randn(3, 5),
        "bf16": torch.randn(7, 3).to(torch.bfloat16),
        "fp16": torch.randn(2, 9).to(torch.float16),
        "int8": torch.randint(-128, 127, (33,), dtype=torch.int8),
        "bool": torch.rand(13) > 0.5,
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # non-contiguous
        "slice": base[2:4, 3:],  # a view into the same storage, at an offset
        "base": base,
    }
    holder.nested = [(torch.tensor([1.5, 2.5]), {"deep": [torch.zeros(2, 2, dtype=torch.int64)]})]
    holder.config = {"name": "tied", "layers": 2}
    holder.label = "hello"
    return holder


@pytest.fixture
def cache(tmp_path: Path) -> SnapshotCache:
    return SnapshotCache(tmp_path / "snapshots", secrets.token_urlsafe(32))


def bake_and_seal(cache: SnapshotCache, instance: Any, function: str = "Fn") -> Snapshot:
    key = snapshot_key("digest", function, RUNTIME)
    staging = cache.staging(key)
    bake(instance, staging)
    return cache.seal(staging, key=key, function=function, code_digest="digest", runtime=RUNTIME)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so comparisons are bit for bit whatever the dtype."""
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b)
    assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (
        b.dtype, b.shape, b.stride(), b.requires_grad,
    )  # fmt: skip
    assert torch.equal(bits(a), bits(b))


def assert_same(original: Any, restored: Any) -> None:
    if isinstance(original, torch.Tensor):
        assert_same_tensor(original, restored)
    elif isinstance(original, torch.nn.Module):
        assert type(original) is type(restored)
        a, b = original.state_dict(keep_vars=True), restored.state_dict(keep_vars=True)
        assert list(a) == list(b)
        for name in a:
            assert_same_tensor(a[name], b[name])
    elif isinstance(original, dict):
        assert list(original) == list(restored)
        for key in original:
            assert_same(original[key], restored[key])
    elif isinstance(original, list | tuple):
        assert type(original) is type(restored)
        assert len(original) == len(restored)
        for x, y in zip(original, restored, strict=True):
            assert_same(x, y)
    else:
        assert original == restored


@pytest.mark.parametrize("private", [False, True], ids=["mapped", "copied"])
def test_everything_comes_back_bit_for_bit(cache: SnapshotCache, private: bool) -> None:
    holder = make_holder()
    snapshot = bake_and_seal(cache, holder)
    restored = restore_state(snapshot, private=private)
    assert list(restored.state) == list(vars(holder))
    for name, value in vars(holder).items():
        assert_same(value, restored.state[name])
    model = restored.state["model"]
    assert model.head.weight is model.embed.weight  # tied weights stay tied
    assert isinstance(model.head.weight, torch.nn.Parameter)
    tensors = restored.state["tensors"]
    # Views of one storage still share it: a write through one shows through the other.
    assert (
        tensors["slice"].untyped_storage().data_ptr()
        == tensors["base"].untyped_storage().data_ptr()
    )
    tensors["base"][2, 3] = 42.0
    assert tensors["slice"][0, 0].item() == 42.0
    assert tensors["transposed"][3, 2].item() == 42.0
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), holder.model(ids))
    # Each step of a CPU restore timed, in order; together no longer than the whole.
    assert list(restored.steps) == ["graph_read", "cpu_pages", "unpickle"]
    assert all(seconds >= 0 for seconds in restored.steps.values())
    assert sum(restored.steps.values()) <= restored.seconds


@pytest.mark.parametrize("private", [False, True], ids=["mapped", "copied"])
def test_a_restore_inside_inference_mode_gives_plain_tensors(
    cache: SnapshotCache, private: bool
) -> None:
    holder = make_holder()
    snapshot = bake_and_seal(cache, holder)
    with torch.inference_mode():
        state = restore_state(snapshot, private=private).state
    weight = state["model"].body[0].weight
    assert not weight.is_inference()
    with torch.no_grad():
        weight.mul_(2)  # an inference tensor would refuse this outside inference mode
    assert_same(holder.tensors, state["tensors"])


def test_the_blob_is_valid_safetensors_with_aligned_storages(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    path = snapshot.file(blob_name("cpu"))
    index, metadata = read_index(path)
    assert metadata["kiln.device"] == "cpu"
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + header_length) % ALIGN == 0
    assert all(entry.offset % ALIGN == 0 for entry in index.entries)
    # Stored once each: the tied embedding, and `base` under its two views.
    assert len(index.entries) == snapshot.manifest.storages
    with safe_open(str(path), framework="pt") as blob:
        names = set(blob.keys())
        assert {e.name for e in index.entries} <= names
        embed = next(e for e in index.entries if e.nbytes == 50 * 16 * 4)
        loaded = blob.get_tensor(embed.name)
    holder = make_holder()
    assert torch.equal(loaded.view(50, 16), holder.model.embed.weight.detach())


def test_a_transformers_model_gives_the_same_logits(cache: SnapshotCache) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    holder = Holder()
    model = GPT2LMHeadModel(config)
    model.train(False)
    holder.model = model
    snapshot = bake_and_seal(cache, holder)
    restored = restore_state(snapshot).state["model"]
    assert restored.lm_head.weight is restored.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, holder.model(ids).logits)
    assert_same(holder.model, restored)


def test_writing_to_a_mapped_weight_never_changes_the_snapshot(cache: SnapshotCache) -> None:
    holder = make_holder()
    snapshot = bake_and_seal(cache, holder)
    first = restore_state(snapshot).state
    with torch.no_grad():
        first["model"].embed.weight.fill_(7.0)
    second = restore_state(snapshot).state
    assert torch.equal(second["model"].embed.weight, holder.model.embed.weight)
    cache.open(snapshot.manifest.key, full=True)  # the file is untouched


def _mapping_of(address: int) -> dict[str, int]:
    """The kB fields of /proc/self/smaps for the mapping that holds `address`."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_a_mapped_restore_is_resident_before_the_first_touch_and_copies_nothing(
    cache: SnapshotCache,
) -> None:
    holder = Holder()
    holder.weight = torch.arange(4 * 1024 * 1024, dtype=torch.int32)  # 16 MiB
    snapshot = bake_and_seal(cache, holder)
    weight = restore_state(snapshot).state["weight"]
    region = _mapping_of(weight.data_ptr())
    assert region["Rss"] >= 16 * 1024  # populated: no page fault waits for the first call
    assert region["Anonymous"] == 0  # read in from the page cache, not copied
    assert region["Private_Dirty"] == 0
    assert torch.equal(weight, holder.weight)


def test_the_cache_names_its_snapshots_for_placement_newest_first(cache: SnapshotCache) -> None:
    assert cache.affinities(10) == []
    bake_and_seal(cache, make_holder(), function="A")
    bake_and_seal(cache, make_holder(), function="B")
    cache.staging(snapshot_key("digest", "C", RUNTIME))  # unsealed: not advertised
    assert cache.affinities(10) == [affinity_id("digest", "B"), affinity_id("digest", "A")]
    assert cache.affinities(1) == [affinity_id("digest", "B")]


def test_the_manifest_records_versions_sizes_and_checksums(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    manifest = snapshot.manifest
    assert manifest.runtime == RUNTIME
    assert manifest.code_digest == "digest"
    assert set(manifest.files) == {GRAPH, blob_name("cpu"), "bake.json"}
    for name, entry in manifest.files.items():
        assert (snapshot.directory / name).stat().st_size == entry.size
        assert len(entry.sha256) == 64
    assert manifest.tensor_bytes > 0


def test_sealing_the_same_key_twice_keeps_the_first(cache: SnapshotCache) -> None:
    first = bake_and_seal(cache, make_holder())
    second = bake_and_seal(cache, make_holder())
    assert second.manifest.created_at == first.manifest.created_at
    assert not list((cache.root / ".staging").iterdir())


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_changed_byte_in_the_blob_is_caught_by_the_full_check(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    blob = snapshot.file(blob_name("cpu"))
    flip_byte(blob, blob.stat().st_size - ALIGN + 1)
    with pytest.raises(SnapshotTampered, match=r"cpu\.safetensors does not match its checksum"):
        cache.open(snapshot.manifest.key, full=True)


def test_a_changed_byte_is_caught_by_a_plain_open_too(cache: SnapshotCache) -> None:
    """An open hashes nothing for an untouched snapshot, but any write changes a file's mtime,
    which its signed stamp records, and a file that differs from its stamp is hashed."""
    snapshot = bake_and_seal(cache, make_holder())
    blob = snapshot.file(blob_name("cpu"))
    assert blob.stat().st_mode & 0o222 == 0  # sealed files are read-only
    flip_byte(blob, blob.stat().st_size - ALIGN + 1)
    with pytest.raises(SnapshotTampered, match=r"cpu\.safetensors does not match its checksum"):
        cache.open(snapshot.manifest.key)


def test_a_touched_but_intact_snapshot_is_accepted_and_restamped(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    stamp = snapshot.file(STAMP)
    before = stamp.read_text()
    graph = snapshot.file(GRAPH)
    mtime = graph.stat().st_mtime_ns
    os.utime(graph, ns=(mtime, mtime + 1_000_000))  # changes the mtime, not the bytes
    cache.open(snapshot.manifest.key)
    assert stamp.read_text() != before
    forged = json.loads(stamp.read_text())
    forged["stats"][GRAPH][2] += 1  # a stamp not signed with the key counts for nothing
    stamp.write_text(json.dumps(forged))
    cache.open(snapshot.manifest.key)  # hashes every file, all intact, and stamps them anew
    assert json.loads(stamp.read_text())["stats"][GRAPH] != forged["stats"][GRAPH]


def test_a_fetched_copy_is_adopted_only_when_every_checksum_matches(
    cache: SnapshotCache, tmp_path: Path
) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    key = snapshot.manifest.key
    node = SnapshotCache(tmp_path / "other-node", cache.signing_key)

    def copy() -> Path:
        staging = node.staging(key)
        for path in snapshot.directory.iterdir():
            if path.name != STAMP:
                (staging / path.name).write_bytes(path.read_bytes())
        return staging

    bad = copy()
    flip_byte(bad / blob_name("cpu"), (bad / blob_name("cpu")).stat().st_size - ALIGN + 1)
    with pytest.raises(SnapshotTampered, match=r"cpu\.safetensors does not match its checksum"):
        node.adopt(bad, key)
    assert not bad.exists()
    assert not node.has(key)
    adopted = node.adopt(copy(), key)
    assert adopted.manifest == snapshot.manifest
    assert_same(make_holder().__dict__, restore_state(adopted).state)
    foreign = SnapshotCache(tmp_path / "third-node", secrets.token_urlsafe(32))
    with pytest.raises(SnapshotTampered, match="signature does not match"):
        foreign.adopt(copy(), key)


def test_an_edited_manifest_fails_its_signature(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    path = snapshot.file("manifest.json")
    manifest = json.loads(path.read_text())
    manifest["files"][GRAPH]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotTampered, match="signature does not match"):
        cache.open(snapshot.manifest.key)


def test_a_truncated_file_is_refused_without_reading_it(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    blob = snapshot.file(blob_name("cpu"))
    blob.write_bytes(blob.read_bytes()[:-ALIGN])
    with pytest.raises(SnapshotTampered, match=r"cpu\.safetensors has \d+ bytes; the manifest"):
        cache.open(snapshot.manifest.key)


def test_another_signing_key_refuses_the_snapshot(cache: SnapshotCache) -> None:
    snapshot = bake_and_seal(cache, make_holder())
    other = SnapshotCache(cache.root, secrets.token_urlsafe(32))
    with pytest.raises(SnapshotTampered):
        other.open(snapshot.manifest.key)


def test_other_runtime_versions_make_another_key() -> None:
    keys = {
        snapshot_key("d", "Fn", RUNTIME),
        snapshot_key("d", "Fn", Runtime(RUNTIME.python, "2.14.0+cpu", RUNTIME.kiln)),
        snapshot_key("d", "Fn", Runtime(RUNTIME.python, RUNTIME.torch, "0.2.0")),
        snapshot_key("d", "Fn", Runtime("3.12.1-x86_64", RUNTIME.torch, RUNTIME.kiln)),
        snapshot_key("other", "Fn", RUNTIME),
        snapshot_key("d", "Other", RUNTIME),
    }
    assert len(keys) == 6


def test_a_missing_snapshot_says_so(cache: SnapshotCache) -> None:
    with pytest.raises(SnapshotError, match="no snapshot"):
        cache.open(snapshot_key("d", "Fn", RUNTIME))


def test_state_that_cannot_be_pickled_names_its_attribute(cache: SnapshotCache) -> None:
    holder = make_holder()
    holder.lock = threading.Lock()
    staging = cache.staging(snapshot_key("d", "Fn", RUNTIME))
    with pytest.raises(SnapshotError, match=r"self\.lock cannot be captured in a snapshot"):
        bake(holder, staging)


def test_tensor_subclasses_and_sparse_tensors_are_refused(cache: SnapshotCache) -> None:
    holder = Holder()
    holder.sparse = torch.eye(3).to_sparse()
    with pytest.raises(SnapshotError, match="only dense"):
        bake(holder, cache.staging(snapshot_key("d", "Fn", RUNTIME)))


def test_chunks_never_cross_a_storage_and_cover_every_byte() -> None:
    entries = [
        BlobEntry("a", 4096, 10),
        BlobEntry("b", 8192, 3 * 4096 + 5),
        BlobEntry("c", 8192 + 4 * 4096, 4096),
    ]
    chunks = plan_chunks(entries, chunk_bytes=4096)
    assert [(c.entry, c.start, c.length) for c in chunks] == [
        ("a", 0, 10),
        ("b", 0, 4096), ("b", 4096, 4096), ("b", 8192, 4096), ("b", 12288, 5),
        ("c", 0, 4096),
    ]  # fmt: skip
    assert all(c.file_offset == next(e.offset for e in entries if e.name == c.entry) + c.start
               for c in chunks)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        plan_chunks(entries, 0)


def test_hard_links_to_a_snapshot_cost_no_rehash(cache: SnapshotCache, tmp_path: Path) -> None:
    """The node agent shows snapshots to sandboxes as hard links: making and removing them
    changes the files' ctime, which must not make every open hash the whole snapshot again."""
    snapshot = bake_and_seal(cache, make_holder())
    stamp = snapshot.file(STAMP)
    before = stamp.read_text()
    shown = tmp_path / "box" / "ro" / "snapshot"
    link_tree(snapshot.directory, shown)
    shutil.rmtree(shown)
    cache.open(snapshot.manifest.key)
    assert stamp.read_text() == before  # nothing was found changed, nothing restamped


async def test_a_fetch_refuses_a_manifest_that_names_a_file_outside_its_snapshot(
    cache: SnapshotCache, tmp_path: Path
) -> None:
    """The store is not trusted: a manifest (not yet verified while the files come down) that
    names `../x` writes nothing outside the staging directory, and nothing is left behind."""
    import json

    from kiln.blobs.file_blobs import FileBlobs
    from kiln.errors import SnapshotTampered
    from kiln.snapshots.shared import SharedSnapshots

    snapshot = bake_and_seal(cache, make_holder())
    blobs = FileBlobs(tmp_path / "store")
    shared = SharedSnapshots(blobs, None, "leases", replicas=1)  # type: ignore[arg-type]
    await shared.upload(snapshot)
    key = snapshot.manifest.key
    raw = json.loads(await blobs.get_bytes(f"{key}/manifest.json"))
    raw["files"]["../../escaped"] = next(iter(raw["files"].values()))
    await blobs.put_bytes(f"{key}/manifest.json", json.dumps(raw).encode())
    await blobs.put_bytes("escaped", b"not a weight")
    elsewhere = SnapshotCache(tmp_path / "other-node", secrets.token_urlsafe(32))
    with pytest.raises(SnapshotTampered, match=re.escape("names a file '../../escaped'")):
        await shared.fetch(key, elsewhere)
    assert not list((tmp_path / "other-node").rglob("escaped"))
    assert not list((tmp_path / "other-node" / ".staging").iterdir())  # no half copy left
