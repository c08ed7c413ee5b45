"""Sandboxes for customers' code: every replica and standby runs inside one.

A sandbox is a bubblewrap (`bwrap`) process started by the node agent under an unprivileged
uid of its own, with new user, mount, PID, IPC, UTS and cgroup namespaces. It sees the Python
environment, the system's libraries and a few files of `/etc` read-only, its own `ro/`
directory read-only (the agent puts the function's code and snapshot there, as hard links, at
assignment), its own `work/` directory writable, a private `/tmp`, its own `/proc` and a
minimal `/dev` with only the device files of its GPUs. Nothing else of the host: not other
replicas' directories, not the snapshot or code caches, not the agent's files or keys. A
seccomp filter (libseccomp, through `pyseccomp`) refuses the system calls a function has no
use for and that widen the kernel's attack surface (ptrace, mount, kernel modules, bpf,
keyrings, new namespaces...), and a cgroup caps its memory, CPU and process count.

Why bubblewrap: one small setuid-free binary (Debian's `bubblewrap`, Flatpak's sandbox) that
builds namespaces and binds from its command line, takes a compiled seccomp filter on a file
descriptor, starts in about a millisecond and exits with its child; crun would need an OCI
bundle written per process for the same result. bubblewrap does not manage cgroups: the agent
(root) makes one per sandbox and moves the process into it between fork and exec.

The sandbox shows host paths at the same absolute places (its `ro/` and `work/` directories
keep their host paths), so paths in launch files, snapshot answers and logs mean the same inside
and out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import ConfigError

__all__ = ["Box", "Sandboxes", "bwrap_path", "cgroup_root", "gpu_devices", "link_tree"]

_log = logging.getLogger("kiln.agent")
_PR_SET_PDEATHSIG = 1
# Files of /etc that programs read to resolve names, find certificates and tell the time.
_ETC = (
    "resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "localtime",
    "ssl", "ca-certificates", "ca-certificates.conf", "pki", "mime.types", "ld.so.cache",
    "ld.so.conf", "ld.so.conf.d", "alternatives",
)  # fmt: skip
# System calls a function is refused (EPERM): debugging and reading other processes, mounts and
# namespaces, kernel modules and keyrings, bpf and perf, reboots, swap and clock changes.
_DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "quotactl",
    "lookup_dcookie", "vhangup", "iopl", "ioperm",
)  # fmt: skip
_DEFAULT_PIDS_MAX = 1024
_USERNS_TIMEOUT_S = 5.0  # unshare(1) answers in about a millisecond


def gpu_devices(visible: str) -> list[str]:
    """The device files a process with CUDA_VISIBLE_DEVICES=`visible` needs: its GPUs' and the
    driver's shared ones (none for "")."""
    if not visible:
        return []
    wanted = [f"/dev/nvidia{index}" for index in visible.split(",")]
    wanted += ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    return [path for path in wanted if os.path.exists(path)]


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def cgroup_root() -> tuple[int, Path] | None:
    """(cgroup version, mount point) when this process may make cgroups there, else None."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return (2, base) if os.access(base, os.W_OK) else None
    if (base / "memory").is_dir():
        return (1, base) if os.access(base / "memory", os.W_OK) else None
    return None


@dataclass
class Box:
    """One sandbox: its uid, its directories and its cgroups."""

    id: str
    uid: int
    root: Path  # $KILN_HOME/sandboxes/<id>
    cgroups: list[Path] = field(default_factory=list)
    userns: int | None = None  # a descriptor of its user namespace, while the box lives

    @property
    def ro(self) -> Path:
        return self.root / "ro"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def pids(self) -> list[int]:
        """Every process in the sandbox (from its cgroup), bubblewrap's own first."""
        for group in self.cgroups:
            procs = group / "cgroup.procs"
            if procs.exists():
                with contextlib.suppress(OSError):
                    return sorted(int(p) for p in procs.read_text().split())
        return []

    def memory_bytes(self) -> int | None:
        for group in self.cgroups:
            for name in ("memory.current", "memory.usage_in_bytes"):
                with contextlib.suppress(OSError, ValueError):
                    return int((group / name).read_text())
        return None

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the sandbox for its memory limit."""
        for group in self.cgroups:
            for name in ("memory.events", "memory.oom_control"):
                with contextlib.suppress(OSError):
                    for line in (group / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and value.strip() not in ("", "0"):
                            return True
        return False

    def limit_memory(self, memory_mb: int | None) -> None:
        """Cap the sandbox's memory (None: no cap); swap counts too where the kernel lets it."""
        limit = "max" if memory_mb is None else str(memory_mb * 2**20)
        for group in self.cgroups:
            if (group / "memory.max").exists():
                _write(group / "memory.max", limit)
                if (group / "memory.swap.max").exists():
                    _write(group / "memory.swap.max", "0" if memory_mb else "max")
            elif (group / "memory.limit_in_bytes").exists():
                _write(group / "memory.limit_in_bytes", "-1" if memory_mb is None else limit)


@dataclass
class Sandboxes:
    """Makes and removes the node's sandboxes; builds the command that starts a process in one."""

    home: Path  # $KILN_HOME of the node agent
    uid_base: int
    uid_count: int
    cpus: float | None = None  # CPU cap per sandbox, in cores (None: no cap)
    pids_max: int = _DEFAULT_PIDS_MAX
    extra_ro: tuple[Path, ...] = ()  # more host paths to show read-only (KILN_SANDBOX_SHARE)
    bwrap: str = field(default_factory=lambda: bwrap_path() or "")
    setpriv: str = field(default_factory=lambda: shutil.which("setpriv") or "")
    unshare: str = field(default_factory=lambda: shutil.which("unshare") or "")
    cgroup: tuple[int, Path] | None = field(default_factory=cgroup_root)
    _taken: set[int] = field(default_factory=set)
    _seccomp: bytes | None = None

    def __post_init__(self) -> None:
        if not self.bwrap:
            raise ConfigError(
                [
                    "KILN_SANDBOX=bwrap needs bubblewrap: install it (Debian and Ubuntu: "
                    "`apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`), or set "
                    "KILN_SANDBOX=off on a trusted single-tenant node"
                ]
            )
        if not self.setpriv or not self.unshare:
            raise ConfigError(
                [
                    "KILN_SANDBOX=bwrap needs setpriv and unshare (util-linux) to give sandboxes "
                    "their user namespace and uid: install util-linux, or set KILN_SANDBOX=off on "
                    "a trusted single-tenant node"
                ]
            )
        if os.geteuid() != 0:
            raise ConfigError(
                [
                    "KILN_SANDBOX=bwrap needs the node agent to run as root (it gives each sandbox "
                    "an unprivileged uid of its own and a cgroup); run it as root, or set "
                    "KILN_SANDBOX=off on a trusted single-tenant node"
                ]
            )
        self.directory = self.home / "sandboxes"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o711)  # sandboxes cannot list each other's directories
        if self.cgroup is None:
            _log.warning("cgroups are not writable here: sandboxes run without memory, CPU and "
                         "process limits")  # fmt: skip

    # Making and removing ---------------------------------------------------------------------

    def make(self, box_id: str) -> Box:
        uid = self._free_uid()
        root = self.directory / box_id
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(mode=0o755)
        (root / "ro").mkdir(mode=0o755)
        work = root / "work"
        work.mkdir(mode=0o711)  # bubblewrap, without its capabilities, must enter it
        os.chown(work, uid, uid)
        box = Box(box_id, uid, root)
        try:
            box.cgroups = self._make_cgroups(box_id)
            box.userns = self._user_namespace(uid)
        except BaseException:
            self.remove(box)
            raise
        self._taken.add(uid)
        return box

    def remove(self, box: Box) -> None:
        """After its processes exited: its directories, cgroups and uid go."""
        for group in box.cgroups:
            with contextlib.suppress(OSError):
                group.rmdir()
        shutil.rmtree(box.root, ignore_errors=True)
        if box.userns is not None:
            os.close(box.userns)
            box.userns = None
        self._taken.discard(box.uid)

    def _user_namespace(self, uid: int) -> int:
        """A new user namespace in which the box's uid, and root, are themselves: its processes
        run in it as that uid, with no capabilities there or anywhere. Root is mapped because
        bubblewrap builds the sandbox inside the namespace as root (with its capabilities
        there), reaching host directories an unprivileged user could not (a Python under
        /root). A short-lived process makes it; the descriptor keeps it alive."""
        with subprocess.Popen(
            [self.unshare, "--user", "--", "/bin/sh", "-c", "echo; exec cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        ) as holder:  # fmt: skip
            try:
                assert holder.stdout is not None
                ready, _, _ = select.select([holder.stdout], [], [], _USERNS_TIMEOUT_S)
                if not ready or not holder.stdout.readline():  # in it once it speaks
                    raise ConfigError(["sandboxes need user namespaces; this kernel refused one"])
                for name in ("uid_map", "gid_map"):
                    _write(Path(f"/proc/{holder.pid}/{name}"), f"0 0 1\n{uid} {uid} 1\n")
                return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                holder.kill()

    def _free_uid(self) -> int:
        for uid in range(self.uid_base, self.uid_base + self.uid_count):
            if uid not in self._taken:
                return uid
        raise RuntimeError(f"all {self.uid_count} sandbox uids are in use")

    def _make_cgroups(self, box_id: str) -> list[Path]:
        if self.cgroup is None:
            return []
        version, base = self.cgroup
        if version == 2:
            parent = base / "kiln"
            if not parent.exists():
                parent.mkdir()
                controllers = (base / "cgroup.controllers").read_text().split()
                wanted = [c for c in ("memory", "pids", "cpu") if c in controllers]
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
                _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
            group = parent / box_id
            group.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                _write(group / "pids.max", str(self.pids_max))
            if self.cpus is not None:
                with contextlib.suppress(OSError):
                    _write(group / "cpu.max", f"{int(self.cpus * 100_000)} 100000")
            return [group]
        groups = []
        for controller in ("memory", "pids", "cpu"):
            if not (base / controller).is_dir():
                continue
            group = base / controller / "kiln" / box_id
            group.mkdir(parents=True, exist_ok=True)
            groups.append(group)
            with contextlib.suppress(OSError):
                if controller == "pids":
                    _write(group / "pids.max", str(self.pids_max))
                elif controller == "cpu" and self.cpus is not None:
                    _write(group / "cpu.cfs_period_us", "100000")
                    _write(group / "cpu.cfs_quota_us", str(int(self.cpus * 100_000)))
        return groups

    # Starting a process in a box -----------------------------------------------------------------

    def command(
        self,
        box: Box,
        argv: list[str],
        *,
        devices: Iterable[str] = (),
        writable: Iterable[Path] = (),
        readable: Iterable[Path] = (),
    ) -> tuple[list[str], list[int]]:
        """bubblewrap's command line running `argv` in `box`, and the descriptors the child must
        inherit (then the caller closes them): the seccomp filter, and every bound directory
        opened here, since the sandbox's uid may not be allowed to walk to it (a Python under
        /root, a home under a private /tmp directory)."""
        fds: list[int] = []
        made: set[Path] = {Path("/")}

        def bind(path: Path, *, writable: bool = False) -> list[str]:
            # Its parents are made searchable first: bubblewrap would copy the host's modes
            # (a Python under /root, which is 0700, could not be reached).
            parents = [p for p in reversed(path.parents) if p not in made]
            made.update(parents)
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            fds.append(fd)
            return [
                *(arg for p in parents for arg in ("--perms", "0755", "--dir", str(p))),
                "--bind-fd" if writable else "--ro-bind-fd", str(fd), str(path),
            ]  # fmt: skip

        try:
            userns: list[str] = []
            if box.userns is not None:
                fds.append(os.dup(box.userns))
                userns = ["--userns", str(fds[-1])]
            args = [
                self.bwrap, *userns, "--unshare-ipc", "--unshare-pid", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--hostname", "kiln",
                # the sandbox's own /tmp (and /var/tmp), not the host's, writable by its
                # programs as a /tmp is (sticky), not by root only
                "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--tmpfs", "/tmp",  # noqa: S108
                "--perms", "1777", "--dir", "/var/tmp",  # noqa: S108
                "--perms", "1777", "--tmpfs", "/dev/shm",  # noqa: S108 - semaphores, shared memory
            ]  # fmt: skip
            for path in self._system_paths():
                args += bind(path)
            for name in ("bin", "lib", "lib64", "sbin"):
                link = Path("/") / name
                if link.is_symlink():
                    args += ["--symlink", os.readlink(link), str(link)]
            for name in _ETC:
                path = Path("/etc") / name
                if path.exists():
                    args += bind(path)
            # Its user has a name (some libraries ask), and no other user of the host is shown.
            for name, text in (
                ("passwd", f"root:x:0:0::/:/usr/sbin/nologin\n"
                           f"kiln:x:{box.uid}:{box.uid}::{box.work}:/usr/sbin/nologin\n"),
                ("group", f"root:x:0:\nkiln:x:{box.uid}:\n"),
            ):  # fmt: skip
                fds.append(_data_fd(text.encode()))
                args += ["--perms", "0644", "--ro-bind-data", str(fds[-1]), f"/etc/{name}"]
            args += bind(box.ro) + bind(box.work, writable=True)
            for path in writable:  # a pod's volume, at its own path
                args += bind(path, writable=True)
            for path in readable:  # a pod's Python environment, built by the node
                args += bind(path)
            devices = list(devices)
            for device in devices:
                args += ["--dev-bind", device, device]
            if devices:  # the CUDA driver reads the PCI topology there
                args += ["--ro-bind", "/sys", "/sys"]
            fds.append(_data_fd(self.seccomp_filter()))
            args += [
                "--chdir", str(box.work), "--seccomp", str(fds[-1]),
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                "--cap-add", "CAP_SETPCAP", "--",
                # In the sandbox: the box's uid and gid, no groups, no capabilities left (not
                # even in the bounding set), and no way to gain any (no_new_privs).
                self.setpriv, f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv,
            ]  # fmt: skip
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds:
            os.set_inheritable(fd, True)
        return args, fds

    def seccomp_filter(self) -> bytes:
        """The compiled filter (BPF), made once."""
        if self._seccomp is None:
            self._seccomp = _compile_seccomp()
        return self._seccomp

    def preexec(self, box: Box, *, nice: int, parent_pid: int) -> Callable[[], None]:
        """Runs in the child between fork and exec: into the box's cgroups, the nice value, and
        death with the agent."""
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        procs = [str(group / "cgroup.procs") for group in box.cgroups]

        def setup() -> None:
            pid = str(os.getpid()).encode()
            for path in procs:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            if nice:
                os.nice(nice)
            prctl(_PR_SET_PDEATHSIG, 15, 0, 0, 0)
            if os.getppid() != parent_pid:
                os._exit(1)

        return setup

    def _system_paths(self) -> list[Path]:
        """The read-only part of the view: the system's programs and libraries and the Python
        environment (with the kiln package, wherever it is installed: only the package, not the
        checkout around an editable install)."""
        import kiln

        paths = [Path("/usr")]
        candidates: list[str | Path] = [
            sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"],
            sysconfig.get_paths()["platlib"], *site.getsitepackages(),
            Path(kiln.__file__).resolve().parent, *self.extra_ro,
        ]  # fmt: skip
        for candidate in candidates:
            path = Path(candidate).resolve()
            if path.exists() and not any(_within(path, kept) for kept in paths):
                paths = [p for p in paths if not _within(p, path)] + [path]
        for path in (Path("/opt"), Path("/usr/local")):  # GPU drivers and toolkits live here
            if path.is_dir() and not any(_within(path, kept) for kept in paths):
                paths.append(path)
        return [p for p in paths if p not in _NEVER]


_NEVER = {Path("/"), Path("/root"), Path("/home"), Path("/etc"), Path("/var")}


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _compile_seccomp() -> bytes:
    try:
        import pyseccomp as seccomp
    except ImportError as exc:  # pragma: no cover - a dependency of kiln[sandbox]
        raise ConfigError(["sandboxes need pyseccomp: pip install 'kiln[worker]'"]) from exc
    import errno

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in _DENIED_SYSCALLS:
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # unknown on this arch
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    # clone3 can make namespaces and its flags cannot be checked (they are in memory): "not
    # implemented" makes the C library fall back to clone, whose flags are checked below.
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET: one rule per flag
    for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000):
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            rules.add_rule(
                seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
            )
    # TIOCSTI pushes characters into a terminal's input: refused (no sandbox has a terminal).
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "ioctl", seccomp.Arg(1, seccomp.EQ, 0x5412))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()


def _data_fd(data: bytes) -> int:
    """A descriptor bubblewrap reads `data` from: a pipe already written and closed at the
    other end when it fits the pipe's buffer, else a file."""
    read, write = os.pipe()
    if len(data) <= 65536:
        os.write(write, data)
        os.close(write)
        return read
    os.close(read)
    os.close(write)
    with tempfile.TemporaryFile() as out:
        out.write(data)
        out.seek(0)
        return os.dup(out.fileno())


def link_tree(source: Path, target: Path) -> None:
    """Hard links of every file under `source` at the same places under `target` (one file
    system: the node's home); directories are made, readable by all."""
    for directory, dirs, files in os.walk(source):
        here = target / Path(directory).relative_to(source)
        here.mkdir(parents=True, exist_ok=True, mode=0o755)
        for name in files:
            src = Path(directory) / name
            mode = src.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue  # a link could point anywhere on the host
            if not mode & stat.S_IROTH:
                src.chmod(mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.link(src, here / name)
        dirs.sort()
