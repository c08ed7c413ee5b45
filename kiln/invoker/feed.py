"""A replica's supply of calls: JetStream pull requests kept outstanding for exactly its free
slots, so a call reaches an idle slot as soon as it is stored, with no fetch round trip per call.

The replica asks for `free` messages at once and, as calls finish, for more. `outstanding` counts
what the open requests may still deliver: each delivery takes one off, and when the server ends a
request early (408 expired, 409 refused) its status message says how many it leaves undelivered.
Each request has its own reply subject and an expiry the feed also tracks itself: should a status
message be lost (a reconnect), the count is reset once none of its requests can be open any
more. Calls that arrive after `close_intake()` (the replica is draining) go back with a NAK, at
once available to another replica.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["CallFeed"]

_log = logging.getLogger(__name__)

# Long enough that an idle replica sends few requests, short enough that a request the server
# forgot (it restarted, the consumer was recreated) is replaced soon.
_PULL_EXPIRES_S = 5.0
_PULL_GRACE_S = 1.0
_STATUS = "Status"


_PENDING = "Nats-Pending-Messages"


@dataclass
class _Pull:
    batch: int
    expires_at: float  # monotonic


class CallFeed:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        *,
        free_slots: Callable[[], int],
        on_call: Callable[[Msg], None],
        threshold: int = 1,
    ) -> None:
        self.nc = nc
        self.free_slots = free_slots
        self.on_call = on_call
        self.threshold = max(1, threshold)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()  # under the connection's prefix, which it may read
        self._pulls: dict[str, _Pull] = {}
        self._numbers = itertools.count(1)
        self._outstanding = 0
        self._open = True
        self._refused_at = 0.0
        self._sub: Subscription | None = None

    @property
    def outstanding(self) -> int:
        """Messages the server may still deliver on our open pull requests."""
        return self._outstanding

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    async def close(self) -> None:
        self._open = False
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def forget_requests(self) -> None:
        """The connection came back: the server forgot our pull requests (or we missed their
        end), so count none as open, and the next `top_up` asks again at once."""
        self._pulls.clear()
        self._outstanding = 0
        self._refused_at = 0.0

    def close_intake(self) -> None:
        """Ask for nothing more; whatever still arrives goes back to the queue."""
        self._open = False

    async def top_up(self) -> None:
        """Keep the free slots requested: ask for the difference once it reaches the threshold
        (or when nothing at all is outstanding). Called when a slot frees, when a request ends
        and periodically, which also forgets requests whose end the server never told."""
        if not self._open or self._sub is None:
            return
        now = time.monotonic()
        for subject, pull in list(self._pulls.items()):
            if now > pull.expires_at + _PULL_GRACE_S:
                del self._pulls[subject]
        if not self._pulls:
            self._outstanding = 0  # whatever was said or lost, no request of ours is open
        want = self.free_slots() - self._outstanding
        if want <= 0 or (want < self.threshold and self._outstanding > 0):
            return
        if now - self._refused_at < _PULL_GRACE_S:
            return  # the server just refused a request: do not hammer it
        subject = f"{self._inbox}.{next(self._numbers):x}"
        self._pulls[subject] = _Pull(want, now + _PULL_EXPIRES_S)
        self._outstanding += want
        request = {"batch": want, "expires": int(_PULL_EXPIRES_S * 1e9)}
        await self.nc.publish(self._next_subject, json.dumps(request).encode(), reply=subject)

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is not None:
            self._on_status(msg.subject, status, msg)
            await self.top_up()
            return
        # A delivery carries the call's own subject, not the request's: count it against all.
        self._outstanding = max(0, self._outstanding - 1)
        if not self._open:
            # Draining. (More than the free slots may come after a reconnect, when the server
            # still held requests from before it beside the ones asked again; they run: a NAK
            # would count as a delivery, and a job has only so many.)
            await msg.nak()
            return
        self.on_call(msg)

    def _on_status(self, subject: str, status: str, msg: Msg) -> None:
        if status == "100":
            return  # an idle heartbeat
        # 408: the request expired; 409: refused or ended (consumer deleted, too many waiting
        # requests, leadership change). Either way it delivers nothing more.
        pull = self._pulls.pop(subject, None)
        headers = msg.headers or {}
        if status != "408":
            _log.warning(
                "the call queue refused a pull request: %s %s", status, headers.get("Description")
            )
            self._refused_at = time.monotonic()
        try:
            void = int(headers[_PENDING])
        except (KeyError, ValueError):
            void = pull.batch if pull is not None else 0
        self._outstanding = max(0, self._outstanding - void)
