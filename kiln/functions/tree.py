"""Which files are the user's own source: the rules shared by the loader (whose traceback
frames and modules are the user's) and the packager (what goes into the archive).

A file is *local* when it lies under the app's directory and no folder between the two is
someone else's code (an installed package, a virtual environment), tooling state (.git,
__pycache__, node_modules) or hidden. Secrets never count, whatever their folder.
"""

from __future__ import annotations

import fnmatch
import functools
import sys
import sysconfig
from pathlib import Path

__all__ = ["is_local", "is_secret", "skip_dir"]

SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    "*.p12",
    ".netrc",
    "credentials*",
)


@functools.cache
def _installed_roots() -> tuple[Path, ...]:
    """The interpreter's standard library and install locations, and Kiln itself: never user
    code, even when an app lives in a folder that contains them."""
    roots = {Path(__file__).resolve().parents[1]}  # the kiln package
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars)
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if key in paths:
                roots.add(Path(paths[key]).resolve())
    return tuple(roots)


def skip_dir(path: Path) -> bool:
    """Whether a folder inside the app's directory is not the user's source."""
    name = path.name
    return name.startswith(".") or name in SKIPPED_DIRS or (path / "pyvenv.cfg").exists()


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in SECRET_PATTERNS)


def is_local(path: Path, root: Path) -> bool:
    """Whether `path` (absolute, resolved) is the user's source under `root` (resolved)."""
    if not path.is_relative_to(root) or path == root:
        return False
    if any(path.is_relative_to(installed) for installed in _installed_roots()):
        return False
    folder = path.parent
    while folder != root:
        if skip_dir(folder):
            return False
        folder = folder.parent
    name = path.name
    return not (name.startswith(".") or is_secret(name))
