"""The node agent's half of standbys: what each function started here needs imported, learned
from its snapshot's manifest and from its replicas' cold-start reports, and the plan the pool
keeps from it (`flavours` plans, `standby_pool` runs the processes).

What the node learned survives an agent restart in `$KILN_HOME/replicas/standby-needs.json`
(each function's needs, not the times of its cold starts).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kiln.invoker.flavours import BASE, Demand, Flavour
from kiln.invoker.standby_pool import StandbyPool
from kiln.snapshots.imports import module_names
from kiln.snapshots.manifest import Manifest
from kiln.snapshots.store import SnapshotCache
from kiln.wire import MAX_READY_FOR, ColdStartReport, StartReplica, affinity_id

__all__ = ["NodeStandbys", "function_env", "need_key"]

_log = logging.getLogger("kiln.agent")
_DEMAND_FILE = "standby-needs.json"
_MANIFESTS_REMEMBERED = 1024


def need_key(launch: StartReplica) -> str:
    """What the node's standby demand is kept by: the function's code and name."""
    return affinity_id(launch.artifact_digest, f"{launch.app}/{launch.function}")


def function_env(launch: StartReplica) -> dict[str, str]:
    return {str(k): str(v) for k, v in (launch.spec["resources"].get("env") or {}).items()}


class NodeStandbys:
    def __init__(
        self,
        pool: StandbyPool,
        *,
        directory: Path,
        generic: int,
        max_flavours: int,
        cache: Callable[[], SnapshotCache | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`generic`: standbys of no flavour kept on CPU slots (0: no standbys at all);
        `cache`: the node's snapshot cache, where manifests are read."""
        self.pool = pool
        self.path = directory / _DEMAND_FILE
        self.generic = generic
        self.max_flavours = max_flavours
        self.cache = cache
        self.clock = clock
        self.demand = Demand()
        self.planned_at = 0.0
        self._manifests_read: dict[str, None] = {}  # snapshot keys, least recently used first

    # Learning ----------------------------------------------------------------------------------

    def started(self, launch: StartReplica, snapshot_key: str | None) -> Flavour | None:
        """Count this cold start in the node's demand; what its function needs imported, as
        far as this node knows (its snapshot's manifest, its earlier replicas' reports)."""
        now = self.clock()
        key = need_key(launch)
        self.demand.started(key, function_env(launch), gpu=launch.gpu_type != "none", now=now)
        cache = self.cache()
        if snapshot_key is not None and cache is not None:
            # A manifest read once is enough (a new one, a re-bake, comes through `seal`),
            # unless the node forgot the function meanwhile.
            known = self.demand.need(key)
            read = self._manifests_read.pop(snapshot_key, "unread") is None
            if not read or known is None or not known.imports:
                imports = cache.imports(snapshot_key)
                if imports is not None and self.demand.learn(key, imports, now=now):
                    self.save()
            self._manifests_read[snapshot_key] = None
            while len(self._manifests_read) > _MANIFESTS_REMEMBERED:
                del self._manifests_read[next(iter(self._manifests_read))]
        return self.demand.need(key)

    def learn_manifest(self, manifest: Manifest) -> bool:
        """A snapshot was sealed, opened or fetched here: what its function needs. True when
        that changed the plan's input."""
        key = affinity_id(manifest.code_digest, manifest.function)
        if self.demand.learn(key, manifest.imports, now=self.clock()):
            self.save()
            return True
        return False

    def learn_report(self, report: ColdStartReport, launch: StartReplica) -> bool:
        """A replica of this node says what it imported after its assignment. True when that
        changed the plan's input. Raises ValueError for a list that names no modules."""
        late = module_names(report.late_imports)
        if not late or not self.demand.learn(need_key(launch), late, now=self.clock()):
            return False
        _log.info(
            "replica %s imported %d modules after its assignment (%s); standbys for its "
            "function will import them", report.replica_id, len(late), ", ".join(late[:3]),
        )  # fmt: skip
        self.save()
        return True

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            _log.warning("ignoring %s (%s): what functions need is learned again", self.path, exc)
            return
        if isinstance(raw, dict):
            self.demand.load(raw, now=self.clock())

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.demand.to_json()))
            temporary.replace(self.path)
        except OSError as exc:
            _log.warning("could not keep what functions need in %s: %s", self.path, exc)

    # Planning ----------------------------------------------------------------------------------

    def plan(self, *, cpu_slots: bool, free_gpus: list[int]) -> None:
        """Tell the pool what to keep: on CPU slots, the generic standbys and each learned
        flavour at its depth; on GPUs, one standby per free GPU, flavours in order of demand
        first."""
        now = self.clock()
        self.planned_at = now
        if not self.generic:
            self.pool.keep({})
            return
        plan: dict[str, list[tuple[Flavour, int]]] = {}
        if cpu_slots:
            learned = self._flavours(gpu=False, now=now)
            plan[""] = [(BASE, self.generic), *learned]
        if free_gpus:
            learned = self._flavours(gpu=True, now=now)
            wanted = [flavour for flavour, count in learned for _ in range(count)]
            wanted += [BASE] * max(0, self.generic - len(wanted))
            current = {device: flavour for (device, flavour), ready in self.pool.ready.items()
                       if device and ready}  # fmt: skip
            for device, flavour in _assign_devices(free_gpus, wanted, current).items():
                plan[device] = [(flavour, 1)]
        self.pool.keep(plan)

    def _flavours(self, *, gpu: bool, now: float) -> list[tuple[Flavour, int]]:
        return self.demand.plan(
            gpu=gpu, now=now, refill_s=self.pool.refill_seconds, max_flavours=self.max_flavours
        )

    def prefer_gpu(self, device: str, need: Flavour | None) -> int:
        """How good GPU `device` is for a function needing `need`: 2 with a standby that covers
        it, 1 with any standby, 0 with none."""
        if need is not None and self.pool.covering(device, need):
            return 2
        return 1 if self.pool.has_ready(device) else 0

    def ready_for(self) -> dict[str, int]:
        """Functions (affinity ids) that ready standbys here have imported everything for, and
        how many such standbys, so the scheduler can place their cold starts here."""
        gpus = sorted({device for (device, _), ready in self.pool.ready.items()
                       if device and ready})  # fmt: skip
        found = {}
        for key, need in self.demand.needs.items():
            devices = gpus if need.gpu else [""]
            count = sum(self.pool.covering(device, need.flavour) for device in devices)
            if count:
                found[key] = count
        return dict(list(found.items())[-MAX_READY_FOR:])


def _assign_devices(
    free: list[int], wanted: list[Flavour], current: dict[str, str]
) -> dict[str, Flavour]:
    """Free GPUs for the wanted flavours, one each: a GPU keeps the flavour its standby already
    has when that is still wanted (no restart), the others take the rest in order."""
    devices = [str(index) for index in free]
    left = list(wanted[: len(devices)])
    chosen: dict[str, Flavour] = {}
    for device in devices:
        match = next((f for f in left if f.id == current.get(device)), None)
        if match is not None:
            chosen[device] = match
            left.remove(match)
    for device in devices:
        if device not in chosen and left:
            chosen[device] = left.pop(0)
    return chosen
