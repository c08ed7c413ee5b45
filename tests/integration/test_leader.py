"""Leader election on real NATS: one scheduler acts; a killed leader is replaced within about a
lease; a leader that shuts down hands over at once; a replaced leader stops acting."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import pytest
from eventually import eventually
from nats.aio.client import Client as NATS

from kiln._nats import connect_options
from kiln._tasks import cancel_and_wait
from kiln.scheduler.leader import Leadership
from kiln.seal import Seals
from kiln.settings import Settings
from kiln.streams import SCHEDULER_LEASE, key_value

pytestmark = pytest.mark.integration

TTL_S = 1.5

# A scheduler's lease in a process of its own, so it can die without giving the lease up.
HOLDER = """
import asyncio, sys
import nats
from kiln.scheduler.leader import Leadership

async def main() -> None:
    creds = sys.argv[4] or None
    nc = await nats.connect(servers=sys.argv[1].split(","), user_credentials=creds)
    lead = Leadership(nc.jetstream(), sys.argv[2], "doomed", ttl_s=float(sys.argv[3]),
                      on_change=lambda: print("leads", flush=True), replicas=1)
    await lead.run(asyncio.Event())

asyncio.run(main())
"""


@asynccontextmanager
async def candidate(
    nc: NATS, bucket: str, name: str, seals: Seals | None = None
) -> AsyncIterator[Leadership]:
    lead = Leadership(nc.jetstream(), bucket, name, ttl_s=TTL_S, seals=seals, replicas=1)
    stop = asyncio.Event()
    task = asyncio.create_task(lead.run(stop))
    try:
        yield lead
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[NATS]:
    client = await nats.connect(**connect_options(settings))
    yield client
    await client.close()


@pytest.fixture
def bucket(settings: Settings) -> str:
    return f"{settings.namespace}_lead_{secrets.token_hex(3)}"


async def test_one_leads_and_a_clean_shutdown_hands_over_at_once(nc: NATS, bucket: str) -> None:
    async with candidate(nc, bucket, "a") as a:
        await eventually(lambda: a.is_leader, within_s=5)
        async with candidate(nc, bucket, "b") as b:
            for _ in range(20):  # over two lease renewals: never both, never neither
                assert a.is_leader != b.is_leader
                await asyncio.sleep(TTL_S / 10)
            assert a.is_leader
            assert b.contested
        async with candidate(nc, bucket, "c") as c:
            await eventually(lambda: c.contested, within_s=TTL_S)  # it found a's lease
            assert a.is_leader  # "b" left without ever leading: nothing changes
            assert not c.is_leader
    async with candidate(nc, bucket, "d") as d:
        # "a" deleted its lease on the way out: no waiting for it to expire.
        began = time.monotonic()
        await eventually(lambda: d.is_leader, within_s=TTL_S)
        assert time.monotonic() - began < TTL_S / 2


async def test_a_killed_leader_is_replaced_within_about_a_lease(
    nc: NATS, bucket: str, settings: Settings
) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, ",".join(settings.nats_servers), bucket, str(TTL_S),
        str(settings.nats_creds or ""),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert line.strip() == b"leads"
        async with candidate(nc, bucket, "standby") as standby:
            await eventually(lambda: standby.contested, within_s=TTL_S)  # it found the lease
            assert not standby.is_leader
            holder.send_signal(signal.SIGKILL)  # no goodbye: the lease must run out
            await asyncio.wait_for(holder.wait(), 10)
            began = time.monotonic()
            await eventually(lambda: standby.is_leader, within_s=15)
            assert time.monotonic() - began < 2 * TTL_S + 1
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_a_replaced_leader_stops_acting_even_without_nats(
    nc: NATS, bucket: str, settings: Settings
) -> None:
    async with candidate(nc, bucket, "a") as a:
        await eventually(lambda: a.is_leader, within_s=5)
        # Its renewals stop reaching NATS (a partition): it must not go on acting.
        await nc.close()
        await eventually(lambda: not a.is_leader, within_s=2 * TTL_S)  # a stops acting
        other = await nats.connect(**connect_options(settings))
        try:
            async with candidate(other, bucket, "b") as b:
                await eventually(lambda: b.is_leader, within_s=3 * TTL_S)
                assert not a.is_leader
        finally:
            await other.close()


async def test_a_lease_written_without_the_platforms_seal_does_not_hold_anyone_off(
    nc: NATS, bucket: str
) -> None:
    """A replica can have the server write into the lease's bucket (kiln.seal). Rewritten
    faster than it expires, an entry without the platform's seal would keep every scheduler
    standing by; it is taken over instead, while sealed leases are respected."""
    seals = Seals("k" * 40)
    kv = await key_value(nc.jetstream(), SCHEDULER_LEASE, bucket, ttl_s=TTL_S, replicas=1)
    forging = asyncio.Event()

    async def forge() -> None:
        while True:
            await kv.put("scheduler", b"intruder")
            forging.set()
            await asyncio.sleep(TTL_S / 5)

    forger = asyncio.create_task(forge())
    try:
        await forging.wait()
        async with candidate(nc, bucket, "a", seals) as a:
            await eventually(lambda: a.is_leader, within_s=5 * TTL_S)
            await cancel_and_wait(forger)
            async with candidate(nc, bucket, "b", seals) as b:
                for _ in range(20):  # over two renewals: b respects a's sealed lease
                    assert a.is_leader
                    assert not b.is_leader
                    await asyncio.sleep(TTL_S / 10)
    finally:
        await cancel_and_wait(forger)
