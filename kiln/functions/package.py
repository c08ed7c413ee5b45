"""Package an app's source for deployment, and unpack it on a replica.

The package is the app file plus the local modules and packages that importing it pulled in (a
whole top-level package folder, data files included), as a deterministic tar.gz: the same source
always gives the same bytes and so the same sha256, which is what makes a redeploy of unchanged
source a no-op. Installed packages, virtual environments, tooling folders, hidden files and
secrets never go in.

`unpack` trusts nothing in the archive: it comes from a user, so links, absolute paths, `..`,
devices and oversized contents are refused before anything is written.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kiln.errors import InvalidPackage, PayloadTooLarge
from kiln.functions.app import App
from kiln.functions.loader import import_app, module_files
from kiln.functions.tree import is_local, is_secret, skip_dir

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PACKAGE_BYTES",
    "Package",
    "archive_of",
    "package",
    "unpack",
]

MiB = 1024 * 1024
MAX_FILE_BYTES = 50 * MiB
MAX_PACKAGE_BYTES = 100 * MiB
MAX_UNPACKED_BYTES = 1024 * MiB
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Package:
    """A packaged app: `archive` is what gets uploaded, `digest` its content address."""

    digest: str  # sha256 hex of `archive`
    archive: bytes = field(repr=False)
    files: tuple[str, ...]  # relative POSIX paths, sorted
    entrypoint: str  # the app file, relative to the archive root
    # The app as imported while packaging, so `kiln deploy` reads the spec without a second import.
    app: App = field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.archive)

    def deploy_body(self, *, reset_scaling: bool = False) -> dict[str, Any]:
        """The JSON body of `POST /v1/apps` that deploys this package; `reset_scaling` replaces
        the operator's live scaling changes with the code's values."""
        return {
            "app": self.app.name,
            "digest": self.digest,
            "entrypoint": self.entrypoint,
            "functions": [spec.to_dict() for spec in self.app.spec()],
            "archive": base64.b64encode(self.archive).decode(),
            "reset_scaling": reset_scaling,
        }


def package(path: Path, *, max_bytes: int = MAX_PACKAGE_BYTES) -> Package:
    """Import the app file at `path` and package its source; raises `PayloadTooLarge` when a
    file or the archive is over its limit."""
    loaded = import_app(path)
    root = loaded.root
    files = {loaded.path}
    for module in loaded.local_modules:
        for place in module_files(module):
            top = root / place.relative_to(root).parts[0]
            files.update(_walk(top, root) if top.is_dir() else [top])
    entries = sorted((file.relative_to(root).as_posix(), file) for file in files)
    for relative, file in entries:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PayloadTooLarge(
                f"{relative} is {_mib(size)}, over the limit of {_mib(MAX_FILE_BYTES)} for one "
                "source file; keep model weights and data sets out of the app's folder and load "
                "them in a @kiln.enter(snap=True) method instead."
            )
    archive = _archive(entries)
    if len(archive) > max_bytes:
        largest = sorted(entries, key=lambda e: e[1].stat().st_size, reverse=True)[:3]
        shown = ", ".join(f"{rel} ({_mib(file.stat().st_size)})" for rel, file in largest)
        raise PayloadTooLarge(
            f"the package of {path} is {_mib(len(archive))}, over the limit of "
            f"{_mib(max_bytes)}; its largest files are {shown}."
        )
    return Package(
        digest=hashlib.sha256(archive).hexdigest(),
        archive=archive,
        files=tuple(relative for relative, _ in entries),
        entrypoint=loaded.path.relative_to(root).as_posix(),
        app=loaded.app,
    )


def _walk(top: Path, root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, dirs, names in os.walk(top):
        here = Path(folder)
        # Pruning in place stops os.walk from descending; symlinked folders are never followed.
        dirs[:] = [d for d in dirs if not skip_dir(here / d) and not (here / d).is_symlink()]
        for name in names:
            file = here / name
            if name.endswith((".pyc", ".pyo")) or is_secret(name) or name.startswith("."):
                continue
            # A link may point anywhere (~/.ssh); take it only when its target is local too.
            if file.is_symlink() and not is_local(file.resolve(), root):
                continue
            if file.is_file():
                found.append(file)
    return found


def _archive(entries: list[tuple[str, Path]]) -> bytes:
    return archive_of(
        [
            (relative, file.read_bytes(), 0o755 if file.stat().st_mode & stat.S_IXUSR else 0o644)
            for relative, file in entries
        ]
    )


def archive_of(files: list[tuple[str, bytes, int]]) -> bytes:
    """The deterministic tar.gz of `(relative path, content, mode)` entries, in their order."""
    buffer = io.BytesIO()
    # The gzip header holds a timestamp and a file name; both fixed, or the digest would vary.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for relative, data, mode in files:
            info = tarfile.TarInfo(relative)
            info.size = len(data)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack(
    archive: bytes,
    dest: Path,
    *,
    digest: str | None = None,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> list[str]:
    """Extract a package into `dest` (created if missing) and return the files written.

    With `digest`, the archive must hash to it. Raises `InvalidPackage` for a malformed or
    unsafe archive; the checks run on every entry before the first byte is written.
    """
    if digest is not None and hashlib.sha256(archive).hexdigest() != digest:
        raise InvalidPackage(
            f"the package's sha256 is {hashlib.sha256(archive).hexdigest()}, expected {digest}; "
            "it was damaged or replaced in transit."
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            # Reading every header decompresses the whole stream, so a truncated or corrupt
            # archive fails here, before anything is written.
            members = tar.getmembers()
            _check_members(members, max_bytes)
            return _extract(tar, members, dest)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InvalidPackage(f"the package is not a valid tar.gz archive: {exc}.") from None


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> None:
    if len(members) > MAX_ENTRIES:
        raise InvalidPackage(
            f"the package has {len(members)} entries; app source is limited to {MAX_ENTRIES}."
        )
    seen: set[PurePosixPath] = set()
    total = 0
    for member in members:
        path = PurePosixPath(member.name)
        problem = _member_problem(member) or ("it appears twice" if path in seen else None)
        if problem is not None:
            raise InvalidPackage(f"the package entry {member.name!r} is refused: {problem}.")
        seen.add(path)
        total += member.size
        if total > max_bytes:
            raise InvalidPackage(
                f"the package unpacks to more than {_mib(max_bytes)}, the limit for app source."
            )
    folders = {parent for path in seen for parent in path.parents}
    for member in members:
        if member.isreg() and PurePosixPath(member.name) in folders:
            raise InvalidPackage(
                f"the package entry {member.name!r} is refused: it is a file, but other entries "
                "use it as a folder."
            )


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name).parts
    if (not parts and not member.isdir()) or "\\" in name or "\0" in name:
        return "the path is empty or has backslashes or NUL characters"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "absolute paths are not allowed"
    if ".." in parts:
        return "'..' is not allowed in paths"
    if member.issym() or member.islnk():
        return "links are not allowed"
    if not (member.isreg() or member.isdir()):
        return "only regular files and folders are allowed"
    return None


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for member in members:
        target = dest.joinpath(*PurePosixPath(member.name).parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # regular files always have contents
        mode = 0o755 if member.mode & stat.S_IXUSR else 0o644
        # O_EXCL and O_NOFOLLOW: never write through a link or over a file already there.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(target, flags, mode), "wb") as out:
            out.write(source.read())
        os.chmod(target, mode)  # the umask may have narrowed the mode os.open asked for
        written.append(PurePosixPath(member.name).as_posix())
    return written


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"
