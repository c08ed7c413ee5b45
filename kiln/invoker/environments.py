"""Pods' Python environments: a pod that lists requirements gets a virtual environment with
them, built by its node under `$KILN_HOME/node/envs/<key>/` and shared by every pod on the
node that asks for the same list (the key is the list's and the interpreter's digest).

An environment layers the requirements over the platform's own packages (a `.pth` file puts
the platform's site-packages after its own), so a pod has what its function has plus what it
asked for, the asked-for versions first. It is built by the agent with pip and the host's pip
configuration (its index, its proxy), but from wheels only: a source distribution would run
its build code on the host, outside any sandbox, so pip is told `--only-binary :all:` and such
a requirement fails with pip's own words. The result belongs to root and is shown to pods
read-only.

A build runs in the background while the pod's replica starts: the replica waits for the
directory's `.kiln-ready` (or `.kiln-failed`, with the end of pip's output) before it says it
is ready (`wait_for_environment`). A failed build is tried again by the next pod that asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BUILD_TIMEOUT_S", "EnvironmentFailed", "Environments", "wait_for_environment"]

_log = logging.getLogger("kiln.agent.environments")
BUILD_TIMEOUT_S = 30 * 60.0
_READY = ".kiln-ready"
_FAILED = ".kiln-failed"
_TAIL_CHARS = 2000


class EnvironmentFailed(RuntimeError):
    """The pod's requirements could not be installed; the message ends with pip's output."""


class Environments:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._builds: dict[str, asyncio.Task[None]] = {}

    @staticmethod
    def key(requirements: list[str]) -> str:
        listed = json.dumps([sys.version, sorted(set(requirements))])
        return hashlib.sha256(listed.encode()).hexdigest()[:24]

    async def ensure(self, requirements: list[str]) -> Path:
        """The environment's directory, made now; its build started unless it is built or
        being built."""
        path = self.root / self.key(requirements)
        if path.name not in self._builds and not await asyncio.to_thread(_ready_or_fresh, path):
            task = asyncio.create_task(
                asyncio.to_thread(_build, path, requirements), name=f"kiln-env-{path.name}"
            )
            self._builds[path.name] = task
            task.add_done_callback(lambda _: self._builds.pop(path.name, None))
        return path

    async def close(self) -> None:
        """Stop the builds under way (their commands are killed; a build left unfinished is
        made again next time)."""
        for process in list(_RUNNING):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        if self._builds:
            await asyncio.wait(list(self._builds.values()), timeout=5.0)


def _ready_or_fresh(path: Path) -> bool:
    """True when `path` holds a built environment; else an empty directory is made there for
    a build (a failed one, or one whose agent did not live to finish it, is cleared)."""
    if (path / _READY).exists():
        return True
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return False


def _build(path: Path, requirements: list[str]) -> None:
    """Install, then mark the directory ready or failed (with why) for the pods waiting."""
    started = time.monotonic()
    try:
        output = _install(path, requirements)
    except Exception as exc:  # noqa: BLE001 - any failure is the pod's error, told in full
        message = exc.args[0] if isinstance(exc, EnvironmentFailed) else repr(exc)
        _log.warning("environment %s failed: %s", path.name, message)
        (path / _FAILED).write_text(message)
        return
    # Ready, and nothing of pip's output: the directory is shown to pods.
    (path / _READY).write_text(f"{len(output)} bytes of pip output\n")
    _log.info("environment %s built in %.1f s: %s", path.name,
              time.monotonic() - started, " ".join(requirements))  # fmt: skip


def _install(path: Path, requirements: list[str]) -> str:
    """Make the virtual environment and install `requirements` into it; pip's output."""
    env = _pip_env(path)
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], "python -m venv", env)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    packages = Path(_run([str(path / "bin" / "python"), "-c", where], "python", env).strip())
    # The platform's packages after the environment's own: `import kiln` works, and what the
    # pod asked for wins over the platform's version of it.
    platform = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # As site directories, so that their own .pth files (an editable install's) count too.
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in platform)
    (packages / "zz-kiln-platform.pth").write_text(lines)
    listed = path / "requirements.txt"
    listed.write_text("".join(f"{line}\n" for line in requirements))
    # The platform's pip, run by the new interpreter: installs into the environment.
    return _run(
        [str(path / "bin" / "python"), "-m", "pip", "install", "--no-input",
         "--disable-pip-version-check", "--only-binary", ":all:", "-r", str(listed)],
        "pip install",
        env,
    )  # fmt: skip


# What pip may see of the agent's environment: its configuration, proxies and certificates,
# never the platform's secrets (pip expands `${NAME}` in a requirements file, and what it
# prints reaches the pod).
_PASSED = ("PATH", "LANG", "LC_ALL", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
_PASSED_PREFIXES = ("PIP_",)
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def _pip_env(path: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name in _PASSED or name in _PROXIES or name.startswith(_PASSED_PREFIXES)
    }
    env["HOME"] = str(path)  # pip's cache and its user configuration are the build's own
    env["PIP_NO_CACHE_DIR"] = "1"
    return env


# The builds' commands under way, killed when their agent stops (a thread cannot be).
_RUNNING: set[subprocess.Popen[str]] = set()


def _run(argv: list[str], what: str, env: dict[str, str]) -> str:
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    _RUNNING.add(process)
    try:
        output, _ = process.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise EnvironmentFailed(f"{what} took more than {BUILD_TIMEOUT_S:.0f} s") from None
    finally:
        _RUNNING.discard(process)
    if process.returncode != 0:
        tail = output[-_TAIL_CHARS:]
        raise EnvironmentFailed(f"{what} failed (exit {process.returncode}):\n{tail}")
    return output


async def wait_for_environment(path: Path, *, poll_s: float = 0.2) -> None:
    """In a pod's replica: until its node has built its environment; EnvironmentFailed with
    pip's words if it could not (TimeoutError if its node never says)."""
    async with asyncio.timeout(BUILD_TIMEOUT_S + 60.0):
        await _until_built(path, poll_s)


async def _until_built(path: Path, poll_s: float) -> None:
    while True:
        if await asyncio.to_thread((path / _READY).exists):
            return
        if await asyncio.to_thread((path / _FAILED).exists):
            reason = await asyncio.to_thread((path / _FAILED).read_text)
            raise EnvironmentFailed(f"the pod's requirements could not be installed: {reason}")
        await asyncio.sleep(poll_s)
