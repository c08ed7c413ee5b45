"""What the router records of each call it serves: a row in the invocation log
(`kiln.observability.invocation_log`) and the call metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kiln.db.enums import InvocationKind, InvocationStatus
from kiln.observability.invocation_log import CallRecord
from kiln.router.auth import Principal
from kiln.router.call_order import CallTrace
from kiln.router.catalog import FunctionRoute
from kiln.router.services import RouterServices

__all__ = ["CallWatch"]

_OPERATOR_TIER = "operator"  # the tier label of calls made with operator keys


class CallWatch:
    """One call from the router's side: started when the request is read, finished once with
    its outcome, which writes its invocation log row and counts it in the metrics."""

    __slots__ = (
        "bytes_in",
        "done",
        "kind",
        "method",
        "principal",
        "request_id",
        "route",
        "started_at",
        "started_loop",
        "svc",
        "tokens",
        "trace",
        "voice_turns",
    )  # fmt: skip

    def __init__(
        self,
        svc: RouterServices,
        principal: Principal,
        route: FunctionRoute,
        method: str,
        kind: InvocationKind,
        request_id: str,
        bytes_in: int,
        *,
        started_loop: float | None = None,
    ) -> None:
        self.svc = svc
        self.principal = principal
        self.route = route
        self.method = method or None
        self.kind = kind
        self.request_id = request_id
        self.bytes_in = bytes_in
        now = asyncio.get_running_loop().time()
        self.started_loop = now if started_loop is None else started_loop
        self.started_at = time.time() - (now - self.started_loop)
        self.trace = CallTrace()
        self.done = False
        self.tokens: tuple[int, int] | None = None  # (prompt, completion): OpenAI routes
        self.voice_turns: list[dict[str, Any]] | None = None  # WS /v1/realtime

    def count_tokens(self, prompt: int, completion: int) -> None:
        """The tokens the call read and wrote, recorded with its outcome."""
        self.tokens = (prompt, completion)

    def succeeded(self, bytes_out: int) -> None:
        self._finish(InvocationStatus.SUCCEEDED, None, bytes_out)

    def failed(self, error_code: str, bytes_out: int = 0) -> None:
        """It ended with an error: `error_code` is the API's (timeout, worker_lost...)."""
        self._finish(InvocationStatus.FAILED, error_code, bytes_out)

    def cancelled(self, bytes_out: int = 0) -> None:
        """The caller left before the answer."""
        self._finish(InvocationStatus.CANCELLED, None, bytes_out)

    def _finish(self, status: InvocationStatus, error_code: str | None, bytes_out: int) -> None:
        if self.done:  # however many ways a stream may end, it is recorded once
            return
        self.done = True
        now = asyncio.get_running_loop().time()
        trace = self.trace
        total = now - self.started_loop
        execution = None if trace.taken_at is None else now - trace.taken_at
        outcome = error_code or ("ok" if status is InvocationStatus.SUCCEEDED else status.value)
        route = self.route
        self.svc.metrics.count_call(
            route.app, route.spec.name, self.kind.value, outcome,
            self.principal.tier or _OPERATOR_TIER,
        )  # fmt: skip
        if self.kind is InvocationKind.SYNC and status is InvocationStatus.SUCCEEDED:
            self.svc.metrics.observe_call(
                route.app, route.spec.name, total, trace.queue_wait_s or 0.0, execution or 0.0
            )
        self.svc.invocations.record(
            CallRecord(
                customer_id=self.principal.owner_id,
                function_id=route.function_id,
                version_id=route.version_id,
                kind=self.kind,
                status=status,
                started_at=self.started_at,
                duration_s=total,
                call_id=f"{self.svc.dispatcher.router_id}-{trace.call_id}"
                if trace.call_id
                else None,
                request_id=self.request_id,
                method=self.method,
                replica_id=trace.replica_id,
                error_code=error_code,
                queue_wait_s=trace.queue_wait_s,
                execution_s=execution,
                bytes_in=self.bytes_in,
                bytes_out=bytes_out,
                cold_start=trace.cold,
                prompt_tokens=None if self.tokens is None else self.tokens[0],
                completion_tokens=None if self.tokens is None else self.tokens[1],
                voice_turns=self.voice_turns,
            )
        )
