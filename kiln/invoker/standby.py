"""A standby process: a replica-to-be that did the slow part of starting before any call needs
it (the node agent's pool, `kiln.invoker.standby_pool`, keeps them ready).

A standby imports what `KILN_STANDBY_IMPORTS` lists (torch by default), the modules of its
flavour (what the functions it is kept for needed, learned at bake: `kiln.invoker.flavours`)
and the replica runtime, and, when it sees a GPU, creates its CUDA context and the pinned
staging ring that snapshot restores copy through. Then it says `ready` on stdout and waits for
one line on stdin: its assignment (launch file, working directory, environment, log file). From
there it is an ordinary replica (`replica.serve_launch`). A cold start that gets a standby of
its flavour skips the interpreter start, every import and CUDA initialisation: "assign, load
code, restore, serve".

Run as `python -P -m kiln.invoker.standby [FLAVOUR.json]` (by the node agent only). A module
that fails to import is reported on stderr and skipped: the replica imports it, late.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["READY", "Assignment", "main"]

READY = b"ready\n"


@dataclass(frozen=True)
class Assignment:
    launch_file: str
    cwd: str
    env: dict[str, str]
    log_file: str


def _prepare(flavour: Path | None) -> None:
    from kiln.settings import Settings

    settings = Settings.from_env(os.environ)
    names = list(settings.standby_imports)
    if flavour is not None:
        names += json.loads(flavour.read_text())["imports"]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import may fail; the replica retries it
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
    if failed:
        shown = "; ".join(failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else "")
        print(f"standby: could not import {len(failed)} modules: {shown}", file=sys.stderr)
    # What every replica loads after its assignment: the runtime, the signing of its NATS
    # credentials and its event loop (uvloop, where installed).
    for name in ("kiln.invoker.replica", "nkeys"):
        importlib.import_module(name)
    with contextlib.suppress(ImportError):
        importlib.import_module("uvloop")
    if "torch" in sys.modules:
        importlib.import_module("kiln.snapshots.restore")
        torch = sys.modules["torch"]
        if os.environ.get("CUDA_VISIBLE_DEVICES") and torch.cuda.is_available():
            from kiln.snapshots.cuda import prepare

            # CUDA context, cuBLAS handle, pinned staging ring and its reader threads: made
            # before any call waits for them.
            prepare()


def main() -> None:
    # stdout is the agent's line to us: a module that prints while it is imported must not
    # write there, so prints go to stderr (the standby log) until the word "ready".
    agent = os.dup(1)
    os.dup2(2, 1)
    _prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    sys.stdout.flush()
    os.write(agent, READY)
    os.close(agent)
    line = sys.stdin.readline()
    if not line:  # the agent went away without assigning us
        os._exit(0)
    assignment = Assignment(**json.loads(line))
    preloaded = frozenset(sys.modules)
    os.environ.clear()
    os.environ.update(assignment.env)
    os.chdir(assignment.cwd)
    log = os.open(assignment.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)

    from kiln.invoker.replica import serve_launch

    serve_launch(Path(assignment.launch_file), preloaded=preloaded, from_standby=True)


if __name__ == "__main__":
    main()
