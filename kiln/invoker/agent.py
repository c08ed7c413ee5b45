"""The node agent: one per host. It owns the host's GPU (or CPU) slots, starts replica processes
when the scheduler says so, stops them (drain first, then signals), reports the host's free
slots every second and tells the scheduler when a replica process exits.

Replicas get a minimal environment: the NATS URL and namespace, never database or Stripe
credentials (nor the snapshot signing key), plus the function's own `env`. The agent keeps the
node's snapshot cache and answers its replicas' snapshot requests (`node_snapshots`).

It also keeps the node's standby processes (`standby_pool`): it learns what each function
needs imported (its snapshot's manifest, and what its replicas still imported late, as their
cold-start reports say), plans flavours and depths from the node's recent cold starts
(`flavours`), gives each cold start the standby that fits it best, and refills a take once
that cold start's first call is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry

from kiln._proc import die_with_parent
from kiln._tasks import cancel_and_wait
from kiln.blobs import Area, BlobStore, open_blob_store
from kiln.codestore import CodeStore, code_store
from kiln.errors import ConfigError
from kiln.functions.gpu import gpu_request
from kiln.functions.package import unpack
from kiln.invoker.containers import Containers, docker_support
from kiln.invoker.credentials import ReplicaCredentials
from kiln.invoker.egress import Egress
from kiln.invoker.environments import Environments
from kiln.invoker.flavours import Flavour
from kiln.invoker.inventory import node_slots
from kiln.invoker.node_snapshots import NodeSnapshots
from kiln.invoker.node_standbys import NodeStandbys, function_env
from kiln.invoker.sandbox import Box, Sandboxes, bwrap_path, gpu_devices, link_tree
from kiln.invoker.standby import Assignment
from kiln.invoker.standby_pool import Standby, StandbyPool, memory_info
from kiln.invoker.usage import NodeMeter
from kiln.invoker.volumes import Volumes
from kiln.observability.gpu import GpuTelemetry
from kiln.seal import Seals
from kiln.settings import EgressMode, SandboxMode, Settings
from kiln.snapshots.manifest import Manifest
from kiln.streams import ensure_function_buckets
from kiln.wire import (
    HEARTBEAT_INTERVAL_S,
    ColdStartReport,
    NodeHeartbeat,
    ReplicaHeartbeat,
    StartReplica,
    Subjects,
    decode_own,
    encode,
)

__all__ = ["NodeAgent"]

_log = logging.getLogger("kiln.agent")
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
# How often the standby plan is looked at again without an event (rates decay, memory frees).
_REPLAN_EVERY_S = 5.0


@dataclass
class _Running:
    launch: StartReplica
    process: asyncio.subprocess.Process
    gpu_type: str
    indices: list[int]
    waiter: asyncio.Task[None] | None = None
    stopping: bool = False
    box: Box | None = None  # its sandbox
    beats: Subscription | None = None  # its heartbeats (the calls it took, for usage)


@dataclass
class _Slots:
    total: dict[str, int]
    free: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = {kind: list(range(count)) for kind, count in self.total.items()}

    def take(
        self, gpu: str, prefer: Callable[[int], int] = lambda _: 0
    ) -> tuple[str, list[int]] | None:
        """Free slots for `gpu`; a single GPU is the one `prefer` scores highest (a ready
        standby that fits)."""
        kind, count = gpu_request(gpu)
        candidates = [k for k in self.free if k != "none"] if kind == "any" else [kind]
        for candidate in candidates:
            free = self.free.get(candidate, [])
            if len(free) >= count:
                if count == 1 and candidate != "none":
                    free.sort(key=lambda index: -prefer(index))
                taken, self.free[candidate] = free[:count], sorted(free[count:])
                return candidate, taken
        return None

    def give_back(self, kind: str, indices: list[int]) -> None:
        self.free.setdefault(kind, []).extend(indices)
        self.free[kind].sort()


class NodeAgent:
    def __init__(self, settings: Settings, nc: NATS, *, shares_host: bool = False) -> None:
        self.settings = settings
        # Whether the platform's own processes (router, NATS, PostgreSQL...) run on this host
        # too, as under `kiln dev`: replicas' thread pools then leave them a core.
        self.shares_host = shares_host
        self.nc = nc
        self.subjects = Subjects(settings.namespace)
        self.node_id = settings.node_id or socket.gethostname().split(".")[0]
        self.slots = _Slots(node_slots(settings))
        self.replicas: dict[str, _Running] = {}
        self.workdir = settings.home / "replicas"
        self._tasks: set[asyncio.Task[None]] = set()
        self.sandboxes = _sandboxes(settings)
        self.credentials = ReplicaCredentials.from_settings(settings, node_id=self.node_id)
        self.egress = _egress(settings, self.sandboxes, self.node_id)
        self._code_fetches: dict[str, asyncio.Task[Path]] = {}
        self._stores_made: set[str] = set()  # functions whose buckets are known to exist
        self._code_store: CodeStore | None = None
        self.usage = NodeMeter(nc, self.subjects, secret=settings.snapshot_signing_key)
        self.seals = Seals(settings.snapshot_signing_key)
        self.snapshots = (
            NodeSnapshots(
                settings,
                nc,
                self.node_id,
                self._launch_of,
                on_manifest=self._learn_manifest,
                box_of=self._box_of,
            )
            if NodeSnapshots.enabled(settings)
            else None
        )
        # What this agent exports (the node agent service serves it; `kiln dev` adds it to the
        # router's /metrics).
        self.metrics_registry = CollectorRegistry()
        self.volumes = Volumes(settings.home / "node" / "volumes")
        self.containers = Containers(node_id=self.node_id, on_exit=self._container_exited)
        self.docker = (False, False)  # runs containers, GPU containers: found at the start
        self._starting: set[str] = set()  # replicas whose start is under way
        self._volumes_store: BlobStore | None = None  # where stopped pods' volumes are parked
        self.environments = Environments(settings.home / "node" / "envs")
        self.standbys = StandbyPool(
            env_for=self._standby_env,
            directory=self.workdir / ".standby",
            memory_budget=_memory_budget(settings),
            registry=self.metrics_registry,
            sandboxes=self.sandboxes,
        )
        self.needs = NodeStandbys(
            self.standbys,
            directory=self.workdir,
            generic=settings.standby_processes,
            max_flavours=settings.standby_flavours,
            cache=lambda: self.snapshots.cache if self.snapshots is not None else None,
        )
        self.gpu_telemetry = GpuTelemetry(
            self.node_id,
            self._gpu_holders,
            interval_s=settings.gpu_sample_interval_s,
            registry=self.metrics_registry,
        )

    def _gpu_holders(self) -> dict[int, str]:
        """GPU index -> the replica holding it, for the GPU metrics' `replica` label. Slot
        indices are what a replica gets as CUDA_VISIBLE_DEVICES (device indices on a host of
        one GPU type: slots are numbered per type)."""
        return {
            index: replica_id
            for replica_id, running in self.replicas.items()
            if running.gpu_type != "none"
            for index in running.indices
        }

    def _launch_of(self, replica_id: str) -> StartReplica | None:
        running = self.replicas.get(replica_id)
        return running.launch if running is not None else None

    def _box_of(self, replica_id: str) -> Box | None:
        running = self.replicas.get(replica_id)
        return running.box if running is not None else None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then stop every replica (drain first) and return."""
        if self.egress is not None:  # before the first sandbox (a standby) starts
            await self._install_egress(self.egress)
        if self.snapshots is not None:
            await self.snapshots.start()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.docker = await asyncio.to_thread(docker_support)
        if self.docker[0]:  # what a crashed predecessor left running holds GPUs and volumes
            await self.containers.remove_stale()
        self.needs.load()
        self._plan_standbys()
        sub = await self.nc.subscribe(self.subjects.node_command(self.node_id), cb=self._on_command)
        reports = await self.nc.subscribe(self.subjects.all_cold_starts, cb=self._on_cold_start)
        beat = asyncio.create_task(self._heartbeat(), name="kiln-agent-heartbeat")
        closing = asyncio.create_task(self.usage.run(), name="kiln-agent-usage")
        telemetry = asyncio.create_task(self.gpu_telemetry.run(), name="kiln-agent-gpu-telemetry")
        try:
            await stop.wait()
        finally:
            await cancel_and_wait(telemetry)
            # NATS may be gone already: the replicas are stopped all the same.
            for subscription in (sub, reports):
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()
            await asyncio.gather(
                *(self.stop_replica(rid, grace_s=10) for rid in list(self.replicas)),
                return_exceptions=True,
            )
            await self.standbys.close()
            await self.containers.close()
            await self.volumes.close()  # their replicas are gone: nothing holds them now
            await self.environments.close()
            if self.snapshots is not None:
                await self.snapshots.close()
            await cancel_and_wait(closing)
            await self.usage.drain(within_s=5.0)
            await cancel_and_wait(beat)
            if self.egress is not None:
                await asyncio.to_thread(self.egress.remove)

    async def _install_egress(self, egress: Egress) -> None:
        try:
            await asyncio.to_thread(egress.install)
        except OSError as exc:  # iptables is there, but this node may not change the rules
            if self.settings.sandbox is SandboxMode.AUTO and egress.mode is EgressMode.ALLOW:
                await asyncio.to_thread(egress.remove)  # what part of it was installed
                _log.warning("no egress policy for sandboxes (%s); replicas reach every port "
                             "the host reaches", exc)  # fmt: skip
                self.egress = None
                return
            raise ConfigError([f"the sandboxes' egress policy cannot be set: {exc}"]) from None

    async def _on_command(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a node command"):
            return
        try:
            command = json.loads(msg.data)
            op = command.pop("op")
            if op == "start":
                reply: dict[str, Any] = await self.start_replica(StartReplica(**command))
            elif op == "delete_parked":
                await self._volume_store().delete(str(command["blob"]))
                reply = {"ok": True}
            elif op in ("park_volume", "restore_volume", "drop_volume"):
                # Minutes for a large volume: answered when done, other commands meanwhile.
                task = asyncio.create_task(self._move_volume(msg, op, command))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            elif op == "stop":
                task = asyncio.create_task(
                    self.stop_replica(command["replica_id"], command["grace_s"])
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown command {op!r}"}
        except Exception as exc:  # noqa: BLE001 - a bad command must not kill the agent
            _log.exception("node command failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if msg.reply:
            await self.nc.publish(msg.reply, json.dumps(reply).encode())

    async def start_replica(self, launch: StartReplica) -> dict[str, Any]:
        if launch.replica_id in self.replicas or launch.replica_id in self._starting:
            # A retried order whose first answer was late: that replica is on its way.
            return {"ok": False, "error": f"replica {launch.replica_id} is here already"}
        if launch.pod_id is not None and self.volumes.busy(launch.pod_id):
            return {"ok": False, "error": f"the volume of pod {launch.pod_id} is being moved "
                    f"on {self.node_id}: the start is tried again"}  # fmt: skip
        self._starting.add(launch.replica_id)
        try:
            return await self._start_replica(launch)
        finally:
            self._starting.discard(launch.replica_id)

    async def _start_replica(self, launch: StartReplica) -> dict[str, Any]:
        # A pod's replica builds no instance: no snapshot to fetch for it.
        key = (
            self.snapshots.key_for(launch)
            if self.snapshots is not None and launch.pod_id is None
            else None
        )
        launch = replace(launch, received_at=time.time(), snapshot_key=key)
        if launch.pod_id is not None and launch.requirements:
            # Built while the replica starts (it waits for it), for every pod that asks alike.
            built = await self.environments.ensure(launch.requirements)
            launch = replace(launch, environment=str(built))
        gpu = launch.spec["resources"]["gpu"]
        need = self.needs.started(launch, key)
        slot = self.slots.take(gpu, prefer=lambda index: self.needs.prefer_gpu(str(index), need))
        if slot is None:
            return {"ok": False, "error": f"no free slot for gpu={gpu!r} on {self.node_id}"}
        kind, indices = slot
        try:
            process, box = await self._spawn(launch, kind, indices, need)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the slot goes back
            self.slots.give_back(kind, indices)
            if launch.pod_id is not None:
                self.volumes.release(launch.pod_id, launch.replica_id)
            return {"ok": False, "error": f"could not start the replica: {exc}"}
        self.usage.start(launch)  # its time runs from its slot (received_at), not its process
        running = _Running(launch, process, kind, indices, box=box)
        with contextlib.suppress(nats.errors.Error):
            running.beats = await self.nc.subscribe(
                self.subjects.replica_heartbeat(uuid.UUID(launch.replica_id)),
                cb=self._on_replica_beat,
            )
        self.replicas[launch.replica_id] = running
        running.waiter = asyncio.create_task(self._watch(running))
        self._plan_standbys()
        if key is not None and self.snapshots is not None:
            self.snapshots.prefetch(key)  # overlaps with the replica loading its code
        return {"ok": True, "node_id": self.node_id, "gpu_type": kind, "gpu_indices": indices,
                "billable_since": launch.received_at}  # fmt: skip

    async def _spawn(
        self, launch: StartReplica, kind: str, indices: list[int], need: Flavour | None
    ) -> tuple[asyncio.subprocess.Process, Box | None]:
        device = "" if kind == "none" else ",".join(map(str, indices))
        # The agent unpacks the code and makes the function's buckets: the replica's
        # credentials reach neither the code store nor the JetStream API that creates buckets.
        code, _, _ = await asyncio.gather(
            self._code(launch.artifact_digest),
            self._function_stores(launch.function_id),
            self._function_account(launch.function_id),
        )
        # A pod's volume is its home and its environment is the node's: both are bound into a
        # box made for it (a standby's box was made without them), so no standby takes it.
        own_box = self._has_volume(launch) or bool(launch.environment) or bool(launch.image)
        volume = (
            await self.volumes.prepare(
                str(launch.pod_id), launch.volume_gb, uid=None, holder=launch.replica_id
            )
            if self._has_volume(launch) and self.sandboxes is None
            else None
        )
        if self.sandboxes is None:
            directory = self.workdir / launch.replica_id
            directory.mkdir(parents=True, exist_ok=True)
            launch_file = directory / "launch.json"
            self._write_launch(launch_file, launch)
            env = self._replica_env(launch, directory, kind, indices, volume=volume)
            standby = (
                None if own_box else self.standbys.take(device, need, holder=launch.replica_id)
            )
            if standby is not None and await self._assign(standby, launch_file, directory, env):
                return standby.process, None
            if launch.image:
                await self._container(launch, directory, None, kind, indices, volume)
            try:
                return await self._start_process(launch_file, directory, env), None
            except BaseException:
                await self.containers.stop(launch.replica_id)
                raise
        # Sandboxed: the code is shown to the replica read-only in its box, with its launch
        # file; it writes only in its own work directory.
        standby = None if own_box else self.standbys.take(device, need, holder=launch.replica_id)
        box = standby.box if standby is not None and standby.box is not None else None
        if box is None:
            box = self.sandboxes.make(f"replica-{launch.replica_id}")
        try:
            launch_file = self._fill_box(box, launch, code)
            if self._has_volume(launch):  # each replica has a uid of its own: the volume is its
                volume = await self.volumes.prepare(
                    str(launch.pod_id), launch.volume_gb, uid=box.uid, holder=launch.replica_id
                )
            env = self._replica_env(launch, box.work, kind, indices, home=box.ro, volume=volume)
            box.limit_memory(launch.spec["resources"].get("memory_mb"))
            if standby is not None and await self._assign(standby, launch_file, box.work, env):
                return standby.process, box
            if box is (standby.box if standby is not None else None):  # it died: a new box
                self.sandboxes.remove(box)
                box = self.sandboxes.make(f"replica-{launch.replica_id}")
                launch_file = self._fill_box(box, launch, code)
                box.limit_memory(launch.spec["resources"].get("memory_mb"))
            if launch.image:
                await self._container(launch, box.work, box.uid, kind, indices, volume)
            process = await self._start_process(
                launch_file,
                box.work,
                env,
                box,
                device,
                volumes=(volume,) if volume else (),
                environment=Path(launch.environment) if launch.environment else None,
            )
            return process, box
        except BaseException:
            await self.containers.stop(launch.replica_id)
            self.sandboxes.remove(box)
            raise

    async def _container(
        self,
        launch: StartReplica,
        gateway_dir: Path,
        uid: int | None,
        kind: str,
        indices: list[int],
        volume: Path | None,
    ) -> None:
        """A container pod's container, run beside its replica (kiln.invoker.containers)."""
        await self.containers.start(
            launch.replica_id, launch.image, gateway_dir=gateway_dir, gateway_uid=uid,
            gpus=indices if kind != "none" else [], volume=volume, env=function_env(launch),
            memory_mb=launch.spec["resources"].get("memory_mb"),
        )  # fmt: skip

    def _container_exited(self, replica_id: str) -> None:
        """A container pod's container ended by itself: its replica goes (the pod restarts)."""
        task = asyncio.create_task(self.stop_replica(replica_id, grace_s=0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _assign(
        self, standby: Standby, launch_file: Path, directory: Path, env: dict[str, str]
    ) -> bool:
        try:
            await standby.assign(
                Assignment(str(launch_file), str(directory), env, str(directory / "replica.log"))
            )
        except (OSError, RuntimeError) as exc:  # it died meanwhile: start the slow way
            _log.warning("standby process lost before its assignment: %s", exc)
            return False
        return True

    async def _start_process(
        self,
        launch_file: Path,
        directory: Path,
        env: dict[str, str],
        box: Box | None = None,
        device: str = "",
        *,
        volumes: tuple[Path, ...] = (),
        environment: Path | None = None,
    ) -> asyncio.subprocess.Process:
        command = [sys.executable, "-m", "kiln.invoker.replica", str(launch_file)]
        fds: list[int] = []
        if box is not None and self.sandboxes is not None:
            command, fds = self.sandboxes.command(
                box,
                command,
                devices=gpu_devices(device),
                writable=volumes,
                readable=(environment,) if environment is not None else (),
            )
            preexec = self.sandboxes.preexec(box, nice=0, parent_pid=os.getpid())
        else:
            # Its agent died (a crash, a SIGKILL): nobody meters it or can stop it any more, so
            # it goes at once, as a sandboxed one does (bwrap --die-with-parent), and its
            # callers hear worker_lost.
            preexec = die_with_parent(signal.SIGKILL, os.getpid())
        # A local file opens at once; the child inherits it as stdout and stderr.
        log = open(directory / "replica.log", "ab")  # noqa: SIM115, ASYNC230
        try:
            return await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=directory,
                env=env,
                start_new_session=True,
                pass_fds=fds,
                preexec_fn=preexec,
            )
        finally:
            log.close()
            for fd in fds:
                os.close(fd)

    def _fill_box(self, box: Box, launch: StartReplica, code: Path) -> Path:
        """The function's code (hard links to the agent's unpacked copy) and launch file, in the
        box's read-only directory, where the replica's KILN_HOME points."""
        shown = box.ro / "code" / launch.artifact_digest
        if not shown.exists():
            link_tree(code, shown)
        launch_file = box.ro / "launch.json"
        self._write_launch(launch_file, launch)
        os.chown(launch_file, box.uid, box.uid)  # its credentials: for this replica's eyes
        return launch_file

    def _write_launch(self, path: Path, launch: StartReplica) -> None:
        """The replica's launch file: the order, this node, its own NATS credentials and
        the key it seals its messages with."""
        data: dict[str, Any] = {**asdict(launch), "node_id": self.node_id}
        key = self.seals.function_key(uuid.UUID(launch.function_id))
        if key is not None:
            data["function_key"] = key.hex()
        if self.credentials is not None:
            data["nats_creds"] = self.credentials.issue(
                function_id=uuid.UUID(launch.function_id),
                replica_id=uuid.UUID(launch.replica_id),
            )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(data, file)

    def on_nats_reconnected(self) -> None:
        """NATS may have come back empty (a replaced host): make again, at the next start, the
        buckets this agent made once, and push the running functions' accounts again now, so
        their replicas log back in."""
        self._stores_made.clear()
        if self.credentials is None:
            return
        self.credentials.forget_pushed()
        for function_id in {running.launch.function_id for running in self.replicas.values()}:
            task = asyncio.create_task(self._push_again(function_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _push_again(self, function_id: str) -> None:
        try:
            await self._function_account(function_id)
        except Exception as exc:  # noqa: BLE001 - the next start of the function tries again
            _log.warning("could not push function %s's NATS account again: %s", function_id, exc)

    async def _function_account(self, function_id: str) -> None:
        """The function's NATS account, which its replicas' credentials belong to, known to the
        servers before a replica connects."""
        if self.credentials is not None:
            await self.credentials.prepare(uuid.UUID(function_id))

    async def _code(self, digest: str) -> Path:
        """The function's code, unpacked once per node by the agent (one fetch per digest at a
        time, shared by the cold starts that wait for it)."""
        directory = self.settings.home / "node" / "code" / digest
        if (directory / ".complete").exists():
            return directory
        task = self._code_fetches.get(digest)
        if task is None:
            task = asyncio.create_task(self._fetch_code(digest, directory))
            self._code_fetches[digest] = task
            task.add_done_callback(lambda _: self._code_fetches.pop(digest, None))
        return await asyncio.shield(task)

    async def _function_stores(self, function_id: str) -> None:
        """The function's payload and job result buckets exist (checked once per agent)."""
        if function_id in self._stores_made:
            return
        await ensure_function_buckets(
            self.nc.jetstream(), self.subjects.ns, uuid.UUID(function_id).hex,
            replicas=self.settings.stream_replicas, result_ttl_s=self.settings.job_result_ttl_s,
        )  # fmt: skip
        self._stores_made.add(function_id)

    async def _fetch_code(self, digest: str, directory: Path) -> Path:
        if self._code_store is None:
            self._code_store = code_store(self.settings, self.nc.jetstream())
        archive = await self._code_store.get(digest)
        staging = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}")
        await asyncio.to_thread(unpack, archive, staging)
        (staging / ".complete").touch()
        try:
            staging.rename(directory)
        except OSError:  # another agent process won the race: theirs is the same code
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return directory

    def _plan_standbys(self) -> None:
        free = sorted(i for kind, indices in self.slots.free.items() if kind != "none"
                      for i in indices)  # fmt: skip
        self.needs.plan(cpu_slots=bool(self.slots.total.get("none")), free_gpus=free)

    def _learn_manifest(self, manifest: Manifest) -> None:
        if self.needs.learn_manifest(manifest):
            self._plan_standbys()

    async def _on_replica_beat(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            beat = decode_own(ReplicaHeartbeat, msg.subject, msg.data)
            running = self.replicas.get(beat.replica_id)
            if running is not None and self._sealed(msg, running, "a replica heartbeat"):
                self.usage.count_calls(beat.replica_id, int(beat.calls))

    def _sealed(self, msg: Msg, running: _Running, what: str) -> bool:
        """Whether a replica of `running`'s function sent `msg` (kiln.seal)."""
        return self.seals.function_sent(msg, uuid.UUID(running.launch.function_id), what)

    async def _on_cold_start(self, msg: Msg) -> None:
        """A replica of this node is ready (what it imported late is learned) or past its
        first call (the standby it took is replaced)."""
        try:
            report = decode_own(ColdStartReport, msg.subject, msg.data)
            running = self.replicas.get(report.replica_id)
            if running is None:
                return  # another node's replica
            if not self._sealed(msg, running, "a cold-start report"):
                return
            if self.needs.learn_report(report, running.launch):
                self._plan_standbys()
        except (ValueError, TypeError):
            _log.warning("ignoring an unreadable cold-start report")
            return
        if "first_call" in report.phases:
            self.standbys.release(report.replica_id)

    def _ready_standbys(self) -> dict[str, int]:
        """Ready standbys by slot kind, for placement. A GPU standby sits on one free GPU,
        whose kind is the one that lists the index as free."""
        counts: dict[str, int] = {}
        for device in {device for device, _ in self.standbys.ready}:
            ready = self.standbys.ready_count(device)
            if not ready:
                continue
            kind = "none" if device == "" else next(
                (k for k, free in self.slots.free.items()
                 if k != "none" and int(device) in free),
                None,
            )  # fmt: skip
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + ready
        return counts

    def _standby_env(self, device: str, flavour: Flavour) -> dict[str, str]:
        """What a standby starts with: a replica's environment, with the env of the functions
        its flavour is for (modules may read it as they are imported)."""
        home = self.workdir / ".standby"
        home.mkdir(parents=True, exist_ok=True)
        return {**self._threads_env(), **dict(flavour.env), **self._platform_env(home, device)}

    def _threads_env(self) -> dict[str, str]:
        """How a replica's CPU thread pools behave unless its function's env says otherwise.
        Idle OpenMP threads (torch's, NumPy's) sleep instead of spinning: a replica shares its
        cores with the router, NATS, standbys and other replicas, and spinning threads took
        most of a CPU replica's time while it streamed (bench/openai.py). Under a CPU cap
        (KILN_SANDBOX_CPUS) the pools are as wide as the cap, not as the node. On a host the
        platform shares (`kiln dev`) they leave it one core: a pool as wide as the machine
        waits at every step for whichever of its threads the router or NATS preempted, which
        cost a CPU replica a quarter of its tokens per second on 2 cores (bench/openai.py)."""
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        cpus = self.sandboxes.cpus if self.sandboxes is not None else None
        width = math.ceil(cpus) if cpus is not None else None
        if self.shares_host:
            spare = len(os.sched_getaffinity(0)) - 1
            width = spare if width is None else min(width, spare)
        if width is not None:
            env["OMP_NUM_THREADS"] = str(max(1, width))
        return env

    def _replica_env(
        self,
        launch: StartReplica,
        directory: Path,
        kind: str,
        indices: list[int],
        home: Path | None = None,
        volume: Path | None = None,
    ) -> dict[str, str]:
        env = {**self._threads_env(), **function_env(launch)}
        devices = "" if kind == "none" else ",".join(map(str, indices))
        env.update(self._platform_env(volume or directory, devices, kiln_home=home))
        if volume is not None:
            env["POD_VOLUME"] = str(volume)
        if launch.environment:  # the pod's own Python first: `python`, `pip`, its programs
            env["VIRTUAL_ENV"] = launch.environment
            env["PATH"] = f"{launch.environment}/bin:{env['PATH']}"
        return env

    @staticmethod
    def _has_volume(launch: StartReplica) -> bool:
        return launch.pod_id is not None and launch.volume_gb > 0

    async def drop_volume(self, pod_id: str, parked: str | None = None) -> None:
        """An ended pod's volume goes, and its parked copy `parked` from the store."""
        await self.volumes.drop(pod_id)
        if parked:
            await self._volume_store().delete(parked)

    async def _move_volume(self, msg: Msg, op: str, command: dict[str, Any]) -> None:
        """`park_volume`: a stopped pod's volume to the store as `blob`; `restore_volume`: the
        parked copy `blob` onto this node; `drop_volume`: an ended pod's, here and its parked
        copy `parked`."""
        pod_id, blob = str(command["pod_id"]), str(command.get("blob") or "")
        try:
            if op == "drop_volume":
                await self.drop_volume(pod_id, command.get("parked"))
            elif op == "park_volume":
                if any(r.launch.pod_id == pod_id for r in self.replicas.values()):
                    raise RuntimeError(f"pod {pod_id} has a replica here: it is not stopped")
                await self.volumes.park(pod_id, blob, self._volume_store())
            else:
                await self.volumes.restore(pod_id, blob, self._volume_store())
            reply: dict[str, Any] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - the scheduler hears why, and tries again
            _log.exception("%s of pod %s failed", op, pod_id)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(msg.reply, json.dumps(reply).encode())

    def _volume_store(self) -> BlobStore:
        if self._volumes_store is None:
            self._volumes_store = open_blob_store(self.settings, Area.VOLUMES, None)
        return self._volumes_store

    def _platform_env(
        self, home: Path, devices: str, kiln_home: Path | None = None
    ) -> dict[str, str]:
        return dict(
            PATH=f"{Path(sys.executable).parent}:{_BASE_PATH}",
            HOME=str(home),
            PYTHONUNBUFFERED="1",
            KILN_NATS_URL=",".join(self.settings.nats_servers),
            KILN_NAMESPACE=self.settings.namespace,
            # Replicas run customers' code: they get their own home (the code cache lives
            # there), never the platform's, which holds config.toml and the dev secrets. In a
            # sandbox it is the box's read-only directory, where the agent put the code.
            KILN_HOME=str(kiln_home or self.settings.home / "node"),
            KILN_LOG_LEVEL=self.settings.log_level.value,
            KILN_STANDBY_IMPORTS=",".join(self.settings.standby_imports),
            CUDA_VISIBLE_DEVICES=devices,
        )

    async def _watch(self, running: _Running) -> None:
        code = await running.process.wait()
        launch = running.launch
        try:
            await self.containers.stop(launch.replica_id)
        except Exception:  # noqa: BLE001 - the rest of the clean-up (usage, slots) goes on
            _log.exception("removing the container of replica %s failed", launch.replica_id)
        if launch.pod_id is not None:
            self.volumes.release(launch.pod_id, launch.replica_id)
        # The replica's time ends with its process, before the clean-up of its box.
        self.usage.stopped(running.launch.replica_id, time.time())
        error = self._close_box(running)
        if running.beats is not None:
            with contextlib.suppress(nats.errors.Error):
                await running.beats.unsubscribe()
        self.replicas.pop(running.launch.replica_id, None)
        self.standbys.release(running.launch.replica_id)
        if self.snapshots is not None:
            self.snapshots.forget(running.launch.replica_id)
        self.slots.give_back(running.gpu_type, running.indices)
        self._plan_standbys()
        # The freed slot is placeable now, not at the next periodic beat: say so first.
        await self._beat()
        event = {
            "replica_id": running.launch.replica_id,
            "function_id": running.launch.function_id,
            "node_id": self.node_id,
            "exit_code": code,
            "requested": running.stopping,
            **({"error": error} if error else {}),
        }
        with contextlib.suppress(Exception):
            await self._publish(self.subjects.replica_events, json.dumps(event).encode())

    def _close_box(self, running: _Running) -> str | None:
        """After the replica exited: why the kernel stopped it, if its memory cap did; its log
        kept beside the other replicas' and its box removed."""
        box = running.box
        if box is None or self.sandboxes is None:
            return None
        error = None
        if box.out_of_memory():
            memory_mb = running.launch.spec["resources"].get("memory_mb")
            error = f"out of memory: the replica used more than its memory_mb={memory_mb}"
            _log.warning("replica %s was stopped: %s", running.launch.replica_id, error)
        kept = self.workdir / running.launch.replica_id
        with contextlib.suppress(OSError):
            kept.mkdir(parents=True, exist_ok=True)
            shutil.move(box.work / "replica.log", kept / "replica.log")
        self.sandboxes.remove(box)
        return error

    async def stop_replica(self, replica_id: str, grace_s: float) -> None:
        """Ask the replica to drain; signal it if it has not exited after `grace_s`."""
        running = self.replicas.get(replica_id)
        if running is None:
            return
        running.stopping = True
        try:
            await self.nc.publish(self.subjects.drain(uuid.UUID(replica_id)), b"")
        except nats.errors.Error as exc:  # it cannot drain; the signals below still stop it
            _log.warning("could not ask replica %s to drain: %s", replica_id, exc)
        for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None and running.process.returncode is None:
                # The whole process group: what the user's code started goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(running.process.pid, sig)
            if running.waiter is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(running.waiter), wait_s)
            if running.process.returncode is not None:
                return

    async def _heartbeat(self) -> None:
        while True:
            if time.monotonic() - self.needs.planned_at >= _REPLAN_EVERY_S:
                self._plan_standbys()
            await self._beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _beat(self) -> None:
        beat = NodeHeartbeat(
            node_id=self.node_id,
            hostname=socket.gethostname(),
            slots=dict(self.slots.total),
            free={kind: len(free) for kind, free in self.slots.free.items()},
            replicas=list(self.replicas),
            standbys=self._ready_standbys(),
            ready_for=self.needs.ready_for(),
            snapshots=self.snapshots.affinities() if self.snapshots is not None else [],
            containers=self.docker[0],
            gpu_containers=self.docker[1],
        )
        with contextlib.suppress(Exception):
            await self._publish(self.subjects.node_heartbeat(self.node_id), encode(beat))

    async def _publish(self, subject: str, body: bytes) -> None:
        await self.nc.publish(subject, body, headers=self.seals.platform(subject, body))


def _sandboxes(settings: Settings) -> Sandboxes | None:
    """The node's sandboxes, as KILN_SANDBOX says (auto: where this agent can make them)."""
    if settings.sandbox is SandboxMode.OFF:
        return None
    if settings.sandbox is SandboxMode.AUTO:
        missing = [
            what for what, present in (
                ("bubblewrap (apt-get install bubblewrap)", bwrap_path()),
                ("setpriv (util-linux)", shutil.which("setpriv")),
                ("root (the agent gives each sandbox its own uid)", os.geteuid() == 0),
                ("pyseccomp and libseccomp (pip install 'kiln[worker]'; apt-get install "
                 "libseccomp2)", _importable("pyseccomp")),
            ) if not present
        ]  # fmt: skip
        if missing:
            _log.warning("replicas run without sandboxes (KILN_SANDBOX=auto), for want of: %s; "
                         "run only trusted code on this node", "; ".join(missing))  # fmt: skip
            return None
    return Sandboxes(
        settings.home,
        uid_base=settings.sandbox_uid_base,
        uid_count=65_536,
        cpus=settings.sandbox_cpus or None,
        extra_ro=settings.sandbox_share,
    )


def _egress(settings: Settings, sandboxes: Sandboxes | None, node_id: str) -> Egress | None:
    """The sandboxes' egress policy (none without sandboxes: their uids are what it matches).
    Under KILN_SANDBOX=auto a node without iptables warns and goes on; asked for explicitly
    (KILN_SANDBOX=bwrap, or KILN_SANDBOX_EGRESS=deny) it refuses to start."""
    if sandboxes is None:
        if settings.sandbox_egress is EgressMode.DENY:
            raise ConfigError([
                "KILN_SANDBOX_EGRESS=deny needs sandboxes (their uids are what the firewall "
                "matches), and this node runs replicas without them (KILN_SANDBOX)"
            ])  # fmt: skip
        return None
    try:
        return Egress.for_node(
            settings,
            first_uid=sandboxes.uid_base,
            last_uid=sandboxes.uid_base + sandboxes.uid_count - 1,
            tag=f"{settings.namespace}/{node_id}/{settings.home}",
        )
    except ConfigError as exc:
        if settings.sandbox is SandboxMode.AUTO and settings.sandbox_egress is EgressMode.ALLOW:
            _log.warning("%s; until then replicas reach every port the host reaches", exc.message)
            return None
        raise


def _importable(name: str) -> bool:
    """Whether `name` imports (pyseccomp also loads the system's libseccomp as it does)."""
    import importlib

    try:
        importlib.import_module(name)
    except (ImportError, OSError):
        return False
    return True


def _memory_budget(settings: Settings) -> int:
    if settings.standby_memory_mb:
        return settings.standby_memory_mb * 2**20
    total, _ = memory_info()
    return total // 4 if total else 8 * 2**30
