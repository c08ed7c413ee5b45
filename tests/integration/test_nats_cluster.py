"""The platform on a real 3-node NATS cluster (streams kept in three copies,
`KILN_STREAM_REPLICAS=3`): the leader of the calls stream is SIGKILLed under sync, job and
usage load, then the leader of the job events stream. No accepted call, job or usage second
is lost; sync calls fail only with answers a client may retry, and only while the stream
elects a new leader."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import nats
import pytest
import sqlalchemy as sa
from eventually import eventually
from nats.aio.client import Client as NATS
from nats_cluster import NatsCluster
from stack import Platform, finished_jobs, running_platform

from kiln._nats import connect_options
from kiln.db.models import App, Function, UsageEvent
from kiln.db.session import create_engine
from kiln.settings import Settings
from kiln.streams import CALL_ACK_WAIT_S
from kiln.wire import Subjects

pytestmark = pytest.mark.integration

CLIENTS = 4
RETRYABLE = {502, 503, 504}
APP = """
import time

import kiln

app = kiln.App("clustered")


@app.function(min_replicas=2, concurrency=4, idle_timeout=600)
def echo(x: int) -> int:
    return x


@app.function(min_replicas=1, concurrency=4, idle_timeout=600)
def job(x: int) -> int:
    time.sleep(0.1)
    return x
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    members = NatsCluster(tmp_path_factory.mktemp("cluster"))
    members.start_all()
    try:
        yield members
    finally:
        members.stop_all()


@pytest.fixture(scope="module", name="platform")
async def clustered_platform(
    settings: Settings, cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    on_cluster = settings.replace(
        nats_url=cluster.url, nats_creds=None, nats_signing_key=None,
        nats_operator_signing_key=None, nats_system_creds=None, stream_replicas=3,
    )  # fmt: skip
    home = tmp_path_factory.mktemp("clustered")
    async with running_platform(on_cluster, home, stop_apps=True) as running:
        await running.deploy_source(tmp_path_factory.mktemp("app"), "clustered.py", APP)
        yield running


@dataclass
class Load:
    """Sync callers that retry what the platform says may be retried, and a job spawner."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    served: int = 0
    hung: int = 0  # calls a client stopped waiting for, and sent again
    lost: list[str] = field(default_factory=list)  # calls given up on, or answered wrongly
    # How long each call took to be answered, retries included.
    waits: list[float] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)

    async def caller(self, platform: Platform, numbers: Iterator[int]) -> None:
        async with platform.client() as client:
            while not self.stop.is_set():
                x = next(numbers)
                failing_since = None
                began = time.monotonic()
                while True:
                    try:
                        response = await client.post(
                            "/v1/run/clustered/echo", json={"x": x}, timeout=15
                        )
                    except httpx.TimeoutException:
                        # Known gap (issue 20's closing note): an answer lost with a dying
                        # server can leave a call waiting; the client gives up and retries.
                        self.hung += 1
                        failing_since = failing_since or time.monotonic()
                        continue
                    except httpx.HTTPError as exc:
                        self.lost.append(f"call {x}: {exc!r}")
                        break
                    status = response.status_code
                    if status == 200 and response.json() == x:
                        break
                    if status not in RETRYABLE or (
                        failing_since is not None and time.monotonic() - failing_since > 30
                    ):
                        self.lost.append(f"call {x}: {status} {response.text[:200]}")
                        break
                    failing_since = failing_since or time.monotonic()
                    await asyncio.sleep(0.05)
                self.waits.append(time.monotonic() - began)
                self.served += 1

    async def spawner(self, platform: Platform, numbers: Iterator[int]) -> None:
        async with platform.client() as client:
            while not self.stop.is_set():
                x = next(numbers)
                key = {"Idempotency-Key": f"job-{x}"}  # a retried spawn is the same job
                for _ in range(60):
                    response = await client.post(
                        "/v1/spawn/clustered/job", json={"x": x}, headers=key, timeout=30
                    )
                    if response.status_code == 202:
                        self.jobs[response.json()["call_id"]] = x
                        break
                    assert response.status_code in RETRYABLE, response.text
                    await asyncio.sleep(0.2)
                else:
                    self.lost.append(f"job {x} was never accepted")
                await asyncio.sleep(0.1)


async def stream_leader(nc: NATS, stream: str) -> str | None:
    try:
        info = await nc.jetstream(timeout=1).stream_info(stream)
    except Exception:  # noqa: BLE001 - no leader just now
        return None
    return info.cluster.leader if info.cluster else None


async def kill_leader(nc: NATS, cluster: NatsCluster, stream: str) -> tuple[str, float]:
    """SIGKILL the member leading `stream`; the seconds until another leads it."""
    leader = await stream_leader(nc, stream)
    assert leader is not None, f"{stream} has no leader"
    cluster.kill(leader)
    killed = time.monotonic()

    async def elected() -> bool:
        assert (now := await stream_leader(nc, stream)) not in (None, leader), now
        return True

    await eventually(elected, within_s=30, every_s=0.1, what=f"a new leader of {stream}")
    return leader, time.monotonic() - killed


async def test_killing_stream_leaders_loses_no_call_job_or_usage_second(
    platform: Platform, cluster: NatsCluster
) -> None:
    async def serving() -> bool:  # the app's replicas serve
        return (await platform.call("clustered/echo", json={"x": 0})).status_code == 200

    subjects = Subjects(platform.settings.namespace)
    load = Load()
    numbers = itertools.count()
    nc = await nats.connect(**connect_options(platform.settings))
    engine = create_engine(platform.settings, application_name="kiln-test")
    try:
        await eventually(serving, within_s=60, every_s=0.1)
        workers = [
            *(asyncio.create_task(load.caller(platform, numbers)) for _ in range(CLIENTS)),
            asyncio.create_task(load.spawner(platform, numbers)),
        ]
        elections = {}
        for stream in (subjects.calls_stream, subjects.job_events_stream):
            await asyncio.sleep(2)  # load before the kill
            killed, elections[stream] = await kill_leader(nc, cluster, stream)
            await asyncio.sleep(2)  # load on the remaining two
            cluster.start(int(killed.removeprefix("n")))
            await asyncio.to_thread(cluster.wait_healthy, int(killed.removeprefix("n")))
        await asyncio.sleep(1)  # load on the whole cluster again
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)

        longest = max(load.waits)
        slow = sum(wait > 1.0 for wait in load.waits)
        print(f"elections {elections}; served {load.served} calls, {len(load.jobs)} jobs; "
              f"{slow} over 1 s, the longest {longest:.2f} s; {load.hung} hung")  # fmt: skip
        assert not load.lost, load.lost[:5]
        assert load.served > 100
        # Only while a stream had no leader: its election, then (for a call whose delivery
        # died with the leader) the queue's ack wait before it is delivered again. The known
        # gap (an answer lost with the dying server) can hang at most the calls in flight when
        # a leader died: one per client per kill.
        assert load.hung <= CLIENTS * len(elections), load.hung
        if not load.hung:
            assert longest <= max(elections.values()) + CALL_ACK_WAIT_S + 2.0, (longest, elections)

        # Every job accepted ran, and its result is its own.
        views = await finished_jobs(platform, list(load.jobs), within_s=60)
        async with platform.client() as client:
            for view, (call_id, x) in zip(views, load.jobs.items(), strict=True):
                assert view["status"] == "succeeded", str(view)
                assert (await client.get(f"/v1/calls/{call_id}/result")).json() == x

        # Usage: each replica's intervals chain without a gap or an overlap.
        async with engine.connect() as conn:
            ours = sa.select(Function.id).join(App).where(App.name == "clustered")
            rows = (await conn.execute(
                sa.select(UsageEvent.id, UsageEvent.replica_id, UsageEvent.period_start,
                          UsageEvent.period_end).where(UsageEvent.function_id.in_(ours))
            )).all()  # fmt: skip
        by_replica: dict[uuid.UUID, list[tuple[datetime, datetime, str]]] = {}
        for event_id, replica_id, start, end in rows:
            by_replica.setdefault(replica_id, []).append((start, end, event_id))
        assert by_replica
        for mine in by_replica.values():
            mine.sort()
            for earlier, later in itertools.pairwise(mine):
                assert later[0] == earlier[1], (earlier, later)
    finally:
        await nc.close()
        await engine.dispose()
