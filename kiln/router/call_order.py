"""What a router asks of the dispatcher for one call (`CallOrder`), and what the dispatcher
learns of the call as it goes (`CallTrace`), for whoever records it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

__all__ = ["CallOrder", "CallTrace"]


@dataclass(slots=True)
class CallTrace:
    call_id: str = ""  # unique within its router
    replica_id: str | None = None
    queue_wait_s: float | None = None
    taken_at: float | None = None  # event loop time a replica took it
    cold: bool = False  # it waited for its replica's cold start


@dataclass(frozen=True, slots=True)
class CallOrder:
    function_id: uuid.UUID
    content_type: str
    method: str | None  # a class's method; None for a plain function
    timeout_s: float  # execution allowed once a replica takes it
    startup_timeout_s: float  # how long it may wait for a replica
    request_id: str
    generation: int = 0  # the deploy generation it was made for
    trace: CallTrace | None = field(default=None, compare=False)
