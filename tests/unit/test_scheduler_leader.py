"""Leader election on a fake clock, one lease attempt at a time, against an in-memory bucket
with the semantics the lease relies on (create fails when the key exists, update is a
compare-and-set on the revision, entries expire `ttl` after their last write): the holder stops
acting before its lease can run out, a standby takes over once it has, the old leader learns it
was replaced, and the new leader adopts before it starts anything (tests/integration/
test_leader.py and test_failover.py run the same on real NATS)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, cast

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from scheduler_fakes import Records, function_row, make_scheduler, node_beat, replica_beat

from kiln._clock import FakeClock
from kiln.scheduler.leader import Leadership
from kiln.scheduler.reconcile import TAKEOVER_SETTLE_S
from kiln.seal import Seals

TTL_S = 4.0


@dataclass
class Entry:
    value: bytes
    revision: int
    written_at: float


class Bucket:
    """A NATS key-value bucket whose entries expire `ttl_s` after their last write."""

    def __init__(self, clock: FakeClock, ttl_s: float) -> None:
        self.clock, self.ttl_s = clock, ttl_s
        self.entries: dict[str, Entry] = {}
        self.revision = 0

    def _live(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None and self.clock.monotonic() - entry.written_at >= self.ttl_s:
            del self.entries[key]
            return None
        return entry

    def _write(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.entries[key] = Entry(value, self.revision, self.clock.monotonic())
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        if self._live(key) is not None:
            raise KeyWrongLastSequenceError("key exists")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        entry = self._live(key)
        if entry is None or entry.revision != last:
            raise KeyWrongLastSequenceError("wrong last sequence")
        return self._write(key, value)

    async def get(self, key: str) -> Entry:
        entry = self._live(key)
        if entry is None:
            raise KeyNotFoundError
        return entry

    async def delete(self, key: str, last: int) -> None:
        entry = self._live(key)
        if entry is not None and entry.revision == last:
            del self.entries[key]


def leads(lease: Leadership) -> bool:
    return lease.is_leader  # read anew each time (mypy would take two reads for one)


def candidate(name: str, clock: FakeClock, bucket: Bucket, changes: list[str]) -> Leadership:
    return Leadership(
        cast(Any, None), "lease", name, ttl_s=TTL_S, clock=clock, kv=cast(Any, bucket),
        seals=Seals("k" * 40), on_change=lambda: changes.append(name), replicas=1,
    )  # fmt: skip


async def test_a_standby_takes_over_once_the_leader_stops_renewing() -> None:
    clock = FakeClock()
    bucket = Bucket(clock, TTL_S)
    changes: list[str] = []
    a, b = candidate("a", clock, bucket, changes), candidate("b", clock, bucket, changes)
    await a.step()
    await b.step()
    assert (a.is_leader, b.is_leader, changes) == (True, False, ["a"])
    assert b.contested
    assert not a.contested

    for _ in range(8):  # two leases of renewals every quarter lease: a keeps it
        clock.advance(TTL_S / 4)
        await a.step()
        await b.step()
        assert (a.is_leader, b.is_leader) == (True, False)

    # a stalls (or is killed): it stops acting a quarter lease before its lease could end...
    clock.advance(TTL_S * 0.75 - 0.01)
    assert leads(a)
    clock.advance(0.01)
    assert not leads(a)
    await b.step()  # ...while the lease still holds b off, so never two act at once
    assert not leads(b)
    clock.advance(TTL_S * 0.25)  # the entry expires
    await b.step()
    assert leads(b)
    assert changes == ["a", "b"]

    await a.step()  # a comes back: its compare-and-set fails, and it learns so
    assert not leads(a)
    assert changes == ["a", "b", "a"]  # told it does not lead (its lease had aged out)
    clock.advance(TTL_S / 4)
    await b.step()
    assert leads(b)


async def test_a_clean_shutdown_hands_over_at_the_next_attempt() -> None:
    clock = FakeClock()
    bucket = Bucket(clock, TTL_S)
    changes: list[str] = []
    a, b = candidate("a", clock, bucket, changes), candidate("b", clock, bucket, changes)
    await a.step()
    await b.step()
    stop = asyncio.Event()
    stop.set()
    await a.run(stop)  # stopped at once: gives the lease up (only if it is still its own)
    assert not a.is_leader
    await b.step()  # no waiting for the lease to run out
    assert b.is_leader


async def test_an_entry_without_the_platforms_seal_is_taken_over() -> None:
    clock = FakeClock()
    bucket = Bucket(clock, TTL_S)
    await bucket.create("scheduler", b"intruder")  # a replica had the server write it
    changes: list[str] = []
    a = candidate("a", clock, bucket, changes)
    await a.step()
    assert a.is_leader
    assert a.contested  # maybe an older scheduler still acting: a takeover's care applies


async def test_a_new_leader_adopts_and_waits_for_the_old_leaders_last_orders() -> None:
    """Two schedulers on one cluster; the leader dies. The standby heard every heartbeat all
    along: once it leads it starts nothing for what the old leader started, and for the first
    heartbeats nothing at all, in case an order of the old leader's is still starting."""
    clock = FakeClock()
    bucket = Bucket(clock, TTL_S)
    steady = function_row(min_replicas=1)
    records = Records(functions={steady.id: steady})
    old, old_nc = make_scheduler(clock, records, lease_s=TTL_S)
    new, new_nc = make_scheduler(clock, records, lease_s=TTL_S)
    for scheduler in (old, new):
        assert scheduler.leadership is not None
        scheduler.leadership = Leadership(
            cast(Any, None), "lease", str(id(scheduler)), ttl_s=TTL_S, clock=clock,
            kv=cast(Any, bucket), on_change=scheduler._on_leadership, replicas=1,
        )  # fmt: skip

    async def beat(replicas: list[str]) -> None:
        for scheduler in (old, new):
            await scheduler.observer.on_node(node_beat("n1"))
            for replica_id in replicas:
                await scheduler.observer.on_replica(replica_beat(replica_id, steady))

    assert old.leadership is not None
    assert new.leadership is not None
    await old.leadership.step()
    await new.leadership.step()
    assert (old.acting, new.acting) == (True, False)
    await beat([])
    await old.reconcile()
    [start] = old_nc.ops("start")
    running = start["replica_id"]
    for _ in range(4):
        clock.advance(1)
        await beat([running])
        await old.leadership.step()
        await new.leadership.step()
        await old.reconcile()
    assert running in new.cluster.replicas  # adopted while standing by

    # The old leader dies: no more renewals. The standby leads once the lease has run out.
    later = function_row(min_replicas=1)  # deployed meanwhile: wants a replica at once
    records.functions[later.id] = later
    waited = 0.0
    while not new.acting:
        clock.advance(TTL_S / 4)
        waited += TTL_S / 4
        await beat([running])
        await new.leadership.step()
    assert TTL_S / 2 <= waited <= TTL_S + TTL_S / 4
    assert new.settle_until == clock.monotonic() + TAKEOVER_SETTLE_S
    await new.reconcile()
    assert new_nc.ops("start") == []  # settling: not even the new function's replica
    clock.advance(TAKEOVER_SETTLE_S)
    await beat([running])
    await new.reconcile()
    started = new_nc.ops("start")
    assert [uuid.UUID(c["function_id"]) for c in started] == [later.id]  # steady: adopted
