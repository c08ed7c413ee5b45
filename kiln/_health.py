"""Whether a process can do its job (`/healthz`) and whether it should take traffic
(`/readyz`), answered the same way by every process.

Live means "leave me running": the process's NATS links have not been down longer than
`KILN_HEALTH_NATS_DOWN_S` and its event loop ran within `KILN_HEALTH_LOOP_STALL_S`. Failing it
asks an orchestrator (or systemd's watchdog script) for a restart, which is the cure for a
process wedged in a way it cannot see from inside. The loop check matters where the answer is
given from another thread (the services' metrics server): a router whose loop is stuck does not
answer at all, which a probe's timeout reports as well.

Ready means "send me work": live, every link up right now, and nothing that its parts report
(the router while it starts or drains).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.settings import Settings

if TYPE_CHECKING:
    from kiln._nats import NatsLink

__all__ = ["Health", "Verdict"]

_TICK_S = 0.25


@dataclass(frozen=True)
class Verdict:
    ok: bool
    problems: list[str] = field(default_factory=list)

    def body(self, good: str, bad: str) -> dict[str, Any]:
        return {"status": good if self.ok else bad, "problems": self.problems}


class Health:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.nats_down_limit_s = settings.health_nats_down_s
        self.loop_stall_limit_s = settings.health_loop_stall_s
        self.clock = clock
        self.links: list[NatsLink] = []
        # Each returns why the process should not take traffic now, or None.
        self.readiness: list[Callable[[], str | None]] = []
        self._tick = clock()

    def watch(self, link: NatsLink) -> None:
        self.links.append(link)

    async def tick(self) -> None:
        """Note, forever, that the event loop runs; run it as a task the process owns."""
        while True:
            self._tick = self.clock()
            await asyncio.sleep(_TICK_S)

    def live(self) -> Verdict:
        problems = []
        stalled = self.clock() - self._tick
        if stalled > self.loop_stall_limit_s:
            problems.append(
                f"the event loop has not run for {stalled:.1f} s "
                f"(KILN_HEALTH_LOOP_STALL_S={self.loop_stall_limit_s:g})"
            )
        for link in self.links:
            down = link.down_for()
            if down > self.nats_down_limit_s:
                problems.append(
                    f"{link.name}: NATS unreachable for {down:.0f} s "
                    f"(KILN_HEALTH_NATS_DOWN_S={self.nats_down_limit_s:g})"
                )
        return Verdict(not problems, problems)

    def ready(self) -> Verdict:
        problems = list(self.live().problems)
        for link in self.links:
            if not link.connected and not any(p.startswith(f"{link.name}:") for p in problems):
                problems.append(f"{link.name}: NATS is not connected")
        for check in self.readiness:
            reason = check()
            if reason is not None:
                problems.append(reason)
        return Verdict(not problems, problems)
