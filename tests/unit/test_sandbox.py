"""The sandbox's pieces that need no process: the code and snapshot shown as hard links, the
cgroup files written and read, the seccomp filter compiled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.errors import SnapshotError
from kiln.invoker.node_snapshots import _take_over
from kiln.invoker.sandbox import Box, _compile_seccomp, gpu_devices, link_tree


def test_a_tree_is_shown_as_hard_links_readable_by_all_and_without_symlinks(
    tmp_path: Path,
) -> None:
    source = tmp_path / "code"
    (source / "pkg").mkdir(parents=True)
    (source / "app.py").write_text("print('hi')")
    (source / "pkg" / "mod.py").write_text("x = 1")
    (source / "pkg" / "mod.py").chmod(0o600)
    (source / "escape").symlink_to("/etc/hostname")
    target = tmp_path / "box" / "ro" / "code"
    link_tree(source, target)
    assert (target / "app.py").stat().st_ino == (source / "app.py").stat().st_ino
    assert (target / "pkg" / "mod.py").stat().st_mode & 0o004  # the sandbox's uid reads it
    assert not (target / "escape").exists()  # a link could point anywhere on the host


def _v2_group(tmp_path: Path) -> Path:
    group = tmp_path / "kiln" / "replica-1"
    group.mkdir(parents=True)
    for name in ("memory.max", "memory.swap.max", "memory.current", "cgroup.procs"):
        (group / name).write_text("max\n" if name.endswith("max") else "")
    return group


def test_the_memory_cap_is_written_and_an_oom_kill_is_read_back_cgroup_v2(
    tmp_path: Path,
) -> None:
    group = _v2_group(tmp_path)
    box = Box("replica-1", 200_001, tmp_path / "box", cgroups=[group])
    box.limit_memory(256)
    assert (group / "memory.max").read_text() == str(256 * 2**20)
    assert (group / "memory.swap.max").read_text() == "0"
    box.limit_memory(None)
    assert (group / "memory.max").read_text() == "max"
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert not box.out_of_memory()
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n")
    assert box.out_of_memory()
    (group / "memory.current").write_text("123456\n")
    assert box.memory_bytes() == 123456
    (group / "cgroup.procs").write_text("42\n7\n")
    assert box.pids() == [7, 42]


def test_the_memory_cap_and_oom_kills_with_cgroup_v1(tmp_path: Path) -> None:
    memory = tmp_path / "memory" / "kiln" / "replica-2"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    box = Box("replica-2", 200_002, tmp_path / "box", cgroups=[memory])
    box.limit_memory(512)
    assert (memory / "memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert not box.out_of_memory()
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert box.out_of_memory()


def test_a_cpu_slot_gets_no_device_files() -> None:
    assert gpu_devices("") == []
    if not os.path.exists("/dev/nvidiactl"):
        assert gpu_devices("0") == []  # only files that exist are bound


def test_the_seccomp_filter_compiles_to_a_bpf_program() -> None:
    try:
        import pyseccomp  # noqa: F401 - loads the system's libseccomp
    except (ImportError, OSError) as exc:
        pytest.skip(
            f"needs pyseccomp (kiln[worker]) and libseccomp (apt-get install libseccomp2): {exc}"
        )
    program = _compile_seccomp()
    assert program
    assert len(program) % 8 == 0  # sock_filter instructions, 8 bytes each


def test_a_bake_is_taken_over_only_as_plain_files(tmp_path: Path) -> None:
    """A hostile bake that leaves a link to a host file must not have the agent read, sign and
    share that file."""
    good, target = tmp_path / "bake", tmp_path / "cache" / "staging"
    good.mkdir()
    target.mkdir(parents=True)
    (good / "graph.pkl").write_bytes(b"state")
    _take_over(good, target)
    assert (target / "graph.pkl").read_bytes() == b"state"
    assert (target / "graph.pkl").stat().st_mode & 0o777 == 0o644

    for planted in ("symlink", "hardlink"):
        bad, into = tmp_path / f"bad-{planted}", tmp_path / "cache" / f"staging-{planted}"
        bad.mkdir()
        into.mkdir()
        secret = tmp_path / f"secret-{planted}"
        secret.write_text("host secret")
        if planted == "symlink":
            (bad / "graph.pkl").symlink_to(secret)
        else:
            os.link(secret, bad / "graph.pkl")
        with pytest.raises(SnapshotError, match="not a plain file"):
            _take_over(bad, into)
