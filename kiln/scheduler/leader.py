"""Leader election: several scheduler processes may run; exactly one acts.

The lease is one key in a NATS key-value bucket whose entries expire `ttl_s` after their last
write. A candidate takes the lease by creating the key (JetStream refuses a create when the key
exists); the leader renews it every `ttl_s / 4` with a compare-and-set on the revision it last
wrote, so a leader that was replaced (it stalled, or lost NATS for longer than the TTL) finds
out on its next renewal instead of overwriting its successor. A leader stops acting as soon as
its lease may have run out (its last successful renewal is older than the TTL less a margin),
whether or not it can reach NATS to hear so. A clean shutdown deletes the key, so a standby
takes over at its next try rather than after the TTL; a crashed leader is replaced within
`ttl_s` plus one retry interval.

A lease's value is its holder's name under the platform's seal (kiln.seal): a replica can have
the server write into the bucket, and an entry without the seal is taken over at once instead
of keeping every scheduler standing by.

Time is read through a `Clock` (kiln._clock) and one attempt is `step()`, so a unit test walks
a takeover with a fake clock and a stand-in bucket; `run` only repeats `step` until stopped.

Standbys observe everything the leader observes (heartbeats, demand) all along, so a new leader
starts with a current view of the cluster and adopts the replicas it finds instead of starting
duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kiln._clock import SYSTEM_CLOCK, Clock
from kiln._trouble import Trouble
from kiln.seal import SEAL, Seals
from kiln.streams import SCHEDULER_LEASE, key_value

__all__ = ["Leadership"]

_log = logging.getLogger("kiln.scheduler")
_KEY = "scheduler"
_MARGIN = 0.25  # of the TTL: stop acting this much before the lease could expire


class Leadership:
    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        holder: str,
        *,
        ttl_s: float,
        on_change: Callable[[], None] = lambda: None,
        seals: Seals | None = None,
        replicas: int,
        clock: Clock = SYSTEM_CLOCK,
        kv: KeyValue | None = None,
    ) -> None:
        """`kv`: the lease's bucket, already open (by default it is opened, or made, in
        `js` on the first attempt)."""
        self.js = js
        self.clock = clock
        self.replicas = replicas  # copies of the lease bucket on a cluster
        self.seals = seals or Seals(None)
        self.bucket = bucket
        self.holder = holder
        self.ttl_s = ttl_s
        self.on_change = on_change  # called whenever this process gains or loses the lead
        self._kv = kv
        self._revision: int | None = None  # of our last write, while we hold the lease
        self._renewed_at = 0.0  # monotonic time of that write
        # Another scheduler held the lease at some point since this one started: taking it
        # now is a takeover, and that leader's last orders may still be in flight.
        self.contested = False
        self._trouble = Trouble(_log, "scheduler lease")
        self._announced = False  # whether on_change last said this process leads

    @property
    def is_leader(self) -> bool:
        fresh = self.clock.monotonic() - self._renewed_at < self.ttl_s * (1 - _MARGIN)
        return self._revision is not None and fresh

    async def run(self, stop: asyncio.Event) -> None:
        """Take or keep the lease until `stop`; then give it up."""
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ttl_s / 4)
        finally:
            await self._give_up()

    async def step(self) -> None:
        """One attempt to take or renew the lease, bounded by a quarter lease; `on_change` is
        called when it changed who leads. NATS trouble is logged (once per run of failures),
        not raised: the next attempt retries, and meanwhile `is_leader` ages out on its own."""
        try:
            await asyncio.wait_for(self._try(), self.ttl_s / 4)
            self._trouble.ok()
        except Exception as exc:  # noqa: BLE001 - NATS trouble: retry; is_leader ages out
            self._trouble.failed(exc)
        self._announce()

    def _announce(self) -> None:
        """Call `on_change` if who leads changed since it was last called, a lease that aged
        out between two attempts (a stall, a partition) included."""
        leading = self.is_leader
        if leading != self._announced:
            self._announced = leading
            _log.info("this scheduler %s", "leads" if leading else "stands by")
            self.on_change()

    async def _try(self) -> None:
        kv = await self._bucket()
        value = self._value()
        started = self.clock.monotonic()  # the lease runs from before the write, to be safe
        try:
            if self._revision is not None:
                self._revision = await kv.update(_KEY, value, last=self._revision)
            else:
                self._revision = await kv.create(_KEY, value)
            self._renewed_at = started
            return
        except KeyWrongLastSequenceError:
            held = self._revision is not None
            self._revision = None
        entry = await kv.get(_KEY)
        if entry.value is not None and not self._sealed(entry.value):
            _log.warning("scheduler lease: replacing an entry without the platform's seal")
            self.contested = True  # maybe a scheduler of an older version, still acting
            self._revision = await kv.update(_KEY, value, last=entry.revision)
            self._renewed_at = started
        elif held:
            _log.warning("scheduler lease lost to another scheduler")
        else:
            self.contested = True  # held by another scheduler

    def _value(self) -> bytes:
        name = self.holder.encode()
        sealed = self.seals.platform(self.bucket, name)
        return name if sealed is None else name + b" " + sealed[SEAL].encode()

    def _sealed(self, value: bytes) -> bool:
        name, _, seal = value.rpartition(b" ")
        if not self.seals.enabled:
            return True
        return self.seals.from_platform(self.bucket, name, {SEAL: seal.decode(errors="replace")})

    async def _give_up(self) -> None:
        revision, self._revision = self._revision, None
        self._announce()
        if revision is None:
            return
        # Only if it is still ours (compare-and-set on our revision): never a successor's.
        with contextlib.suppress(Exception):
            kv = await self._bucket()
            await asyncio.wait_for(kv.delete(_KEY, last=revision), self.ttl_s)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await key_value(
                self.js, SCHEDULER_LEASE, self.bucket, ttl_s=self.ttl_s, replicas=self.replicas
            )
        return self._kv
