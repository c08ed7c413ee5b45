"""A replica's cold start once its code is loaded: build the class's instance, then run its
plain `@enter()` hooks, and account for every phase.

The instance's `@enter(snap=True)` state comes, in order of preference, from:

1. its snapshot, which the node agent hands over verified (`restore`);
2. running the hooks, after which the state is baked into a staging directory the agent gave
   out and sealed by the agent (`snap_hooks`, `bake`), so the next replica restores it. The
   seal is asked for once the plain hooks ran too, with the modules the function needed
   (`kiln.snapshots.imports`): the manifest carries them, and standbys import them ahead;
3. running the hooks only: snapshots off, nothing to snapshot, or another replica baking.

A snapshot that fails (tampered, unreadable, refusing to restore) never fails the replica: the
hooks run the slow way, the agent discards the snapshot and lets this replica bake it again,
and the report says `fallback` with the reason.

The replica holds no signing key: the agent verifies; the replica only reads what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from kiln.functions.hooks import lifecycle
from kiln.functions.spec import UnitKind
from kiln.invoker.target import Target
from kiln.seal import FunctionSealer
from kiln.wire import Origin, ProcessOrigin

__all__ = ["ColdStart", "SnapshotLink", "build_instance", "classify_process"]

_log = logging.getLogger("kiln.replica")
# Opening may wait for the agent to fetch a snapshot from the shared store.
_OPEN_TIMEOUT_S = 600.0
_REQUEST_TIMEOUT_S = 30.0


@dataclass
class ColdStart:
    """How this replica's cold start went: where its state came from and each phase's time."""

    origin: Origin = Origin.HOOKS
    phases: dict[str, float] = field(default_factory=dict)
    snapshot_bytes: int = 0
    fallback_reason: str | None = None
    sealing: asyncio.Future[Any] | None = None  # the agent sealing what this replica baked
    on_phase: Callable[[str], None] = lambda name: None  # told as each phase begins
    # What the process had imported when it became this replica, and where the function's own
    # code lives: what it imported since is what a standby could have imported for it.
    preloaded: frozenset[str] = frozenset()
    code_root: Path | None = None
    baked: Path | None = None  # the staging directory this replica baked into, until sealed
    process: ProcessOrigin = ProcessOrigin.FRESH
    late_imports: tuple[str, ...] = ()  # imported after assignment (leaves)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.on_phase(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def summary(self) -> str:
        parts = [f"origin={self.origin.value}", f"process={self.process.value}"]
        if self.late_imports:
            shown = ",".join(self.late_imports[:5])
            more = f",+{len(self.late_imports) - 5}" if len(self.late_imports) > 5 else ""
            parts.append(f"late_imports={len(self.late_imports)}[{shown}{more}]")
        parts += [f"{name}={seconds * 1000:.0f}ms" for name, seconds in self.phases.items()]
        if self.snapshot_bytes:
            parts.append(f"snapshot={self.snapshot_bytes / 2**20:.0f}MiB")
        if self.fallback_reason:
            parts.append(f"fallback_reason={self.fallback_reason!r}")
        return " ".join(parts)


class SnapshotLink:
    """The replica's requests to its node agent about its snapshot."""

    def __init__(self, nc: NATS, subject: str, replica_id: str, *, sealer: FunctionSealer) -> None:
        self.nc = nc
        self.subject = subject
        self.replica_id = replica_id
        self.sealer = sealer

    async def ask(self, op: str, timeout_s: float = _REQUEST_TIMEOUT_S, **fields: Any) -> Any:
        body = json.dumps({"op": op, "replica_id": self.replica_id, **fields}).encode()
        headers = self.sealer.headers(self.subject, body)
        reply = await self.nc.request(self.subject, body, timeout=timeout_s, headers=headers)
        return json.loads(reply.data)


def classify_process(record: ColdStart, from_standby: bool, loaded: frozenset[str]) -> None:
    """Say what kind of process this cold start ran in: a standby that had imported all the
    function needed, one that had not (`late_imports` says what it had to import), or a fresh
    interpreter (no standby was ready). `loaded`: the modules imported by the time it was
    ready."""
    from kiln.snapshots.imports import imported_since, leaves

    record.late_imports = leaves(imported_since(record.preloaded, record.code_root, loaded))
    if not from_standby:
        record.process = ProcessOrigin.FRESH
    elif record.late_imports:
        record.process = ProcessOrigin.PARTIAL
    else:
        record.process = ProcessOrigin.STANDBY


async def build_instance(
    target: Target, link: SnapshotLink | None, record: ColdStart, *, private: bool
) -> None:
    """Instantiate the class and give it its state; then run the plain `@enter()` hooks.
    A plain function has nothing to build."""
    if target.spec.kind is not UnitKind.CLASS:
        return
    hooks = lifecycle(target.obj)
    await target.instantiate()
    if hooks.enter_snap:
        await _snap_state(target, hooks.enter_snap, link, record, private=private)
    with record.phase("enter"):
        await target.run_hooks(hooks.enter)
    if record.baked is not None and link is not None:
        # The agent hashes and signs the files; the replica serves meanwhile.
        imports = await asyncio.to_thread(_needs, record, record.baked)
        record.sealing = asyncio.ensure_future(_ask_quietly(link, "seal", imports=list(imports)))


async def _snap_state(
    target: Target,
    snap_hooks: tuple[str, ...],
    link: SnapshotLink | None,
    record: ColdStart,
    *,
    private: bool,
) -> None:
    answer: dict[str, Any] = {}
    if link is not None:
        answer = await _ask_quietly(link, "open", _OPEN_TIMEOUT_S)
    if answer.get("fallback"):  # the agent refused a snapshot it had (tampered, unreadable)
        record.origin, record.fallback_reason = Origin.FALLBACK, str(answer["fallback"])
    if "path" in answer:
        try:
            with record.phase("restore"):
                state, size, steps = await asyncio.to_thread(
                    _restore, Path(answer["path"]), private
                )
            record.phases.update({f"restore_{step}": seconds for step, seconds in steps.items()})
            target.adopt(state)
            record.origin, record.snapshot_bytes = Origin.SNAPSHOT, size
            return
        except Exception as exc:  # noqa: BLE001 - any failure to restore falls back to the hooks
            reason = f"{type(exc).__name__}: {exc}"
            _log.error(
                "restoring the snapshot failed (%s); running the setup hooks instead", reason
            )
            record.origin, record.fallback_reason = Origin.FALLBACK, reason
            assert link is not None
            answer = await _ask_quietly(link, "failed", error=reason)
    with record.phase("snap_hooks"):
        await target.run_hooks(snap_hooks)
    if "bake" in answer and link is not None:
        await _bake(target, link, Path(answer["bake"]), record)


async def _bake(target: Target, link: SnapshotLink, staging: Path, record: ColdStart) -> None:
    try:
        with record.phase("bake"):
            await asyncio.to_thread(_bake_into, target.instance, staging)
    except Exception as exc:  # noqa: BLE001 - a state that cannot be kept must not stop the replica
        reason = f"{type(exc).__name__}: {exc}"
        _log.error("this class's state cannot be snapshotted, so every replica runs its "
                   "setup hooks: %s", reason)  # fmt: skip
        await _ask_quietly(link, "abandon", error=reason)
        return
    if record.origin is not Origin.FALLBACK:
        record.origin = Origin.BAKED
    record.baked = staging


async def _ask_quietly(
    link: SnapshotLink, op: str, timeout_s: float = _REQUEST_TIMEOUT_S, **fields: Any
) -> dict[str, Any]:
    """The agent's answer, or none (run the hooks, bake nothing) when it cannot be reached."""
    try:
        answer = await link.ask(op, timeout_s, **fields)
    except Exception as exc:  # noqa: BLE001 - snapshots are an optimisation, never a failure
        _log.warning("the node agent did not answer the snapshot request %r: %s", op, exc)
        return {}
    if not isinstance(answer, dict):
        return {}
    if answer.get("error"):
        _log.warning("snapshot request %r: %s", op, answer["error"])
    return answer


def _restore(directory: Path, private: bool) -> tuple[dict[str, Any], int, dict[str, float]]:
    from kiln.snapshots.restore import restore_state
    from kiln.snapshots.store import Snapshot

    restored = restore_state(Snapshot.at(directory), private=private)
    return restored.state, restored.tensor_bytes, restored.steps


def _needs(record: ColdStart, staging: Path) -> tuple[str, ...]:
    from kiln.snapshots.imports import function_needs
    from kiln.snapshots.manifest import GRAPH

    try:
        graph = (staging / GRAPH).read_bytes()
    except OSError as exc:  # the seal will say what is wrong with the staging directory
        _log.warning("could not read the baked object graph for its imports: %s", exc)
        graph = None
    return function_needs(record.preloaded, record.code_root, graph)


def _bake_into(instance: Any, staging: Path) -> None:
    from kiln.snapshots.bake import bake

    bake(instance, staging)
