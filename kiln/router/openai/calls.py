"""Calling a task method for an OpenAI-compatible route: the same path as `POST /v1/run`
(billing's 402, the customer's concurrency slot and rate limit, the invocation log, the
dispatcher) with the validated request as the method's one argument.

A task call is either answered once (`call`: embeddings, images) or streamed (`open`: chat and
completions, whose methods are generators, even when the client asked for one JSON answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from kiln.db.enums import InvocationKind
from kiln.errors import InvalidRequest, KilnError
from kiln.functions.tasks import Task, to_wire
from kiln.router.auth import Principal
from kiln.router.call_log import CallWatch
from kiln.router.call_order import CallOrder
from kiln.router.errors import request_id
from kiln.router.openai.models import resolve_model
from kiln.router.openai.requests import model_of
from kiln.router.run import abandoned_if_gone, call_slot, read_body
from kiln.router.services import RouterServices, services
from kiln.router.streams import CallAbandoned, CallStream
from kiln.router.validation import parse_json

__all__ = ["OpenStream", "TaskCall", "read_form_call", "read_task_call"]

_JSON = "application/json"


@dataclass
class OpenStream:
    """A streaming task call in progress: read `stream`, record the outcome on `watch`, and
    call `release` once it is over (it frees the customer's slot)."""

    stream: CallStream
    watch: CallWatch
    release: Callable[[], Awaitable[None]]

    def failed(self, exc: BaseException, sent: int = 0) -> None:
        """Record how the call ended early: the client left, or an error."""
        if isinstance(exc, CallAbandoned | asyncio.CancelledError | GeneratorExit):
            self.watch.cancelled(sent)
        else:
            self.watch.failed(exc.code if isinstance(exc, KilnError) else "internal_error", sent)

    async def close(self) -> None:
        """Stop the call if it still runs and free the customer's slot."""
        self.stream.abandon()  # does nothing once the stream has ended
        await self.release()


@dataclass
class TaskCall:
    """A validated request on its way to the method of the deployment `model` names."""

    svc: RouterServices
    principal: Principal
    request: Request
    body: Any  # the decoded JSON body
    started: float  # the event loop's time when the request came in

    async def _order(
        self, task: Task, wire: dict[str, Any], kind: InvocationKind
    ) -> tuple[CallOrder, CallWatch, bytes]:
        svc = self.svc
        svc.billing.check(self.principal.customer_id)  # 402 before any work
        route, method = await resolve_model(svc, self.principal, model_of(self.body), task)
        payload = json.dumps([wire], separators=(",", ":")).encode()
        rid = request_id(self.request)
        watch = CallWatch(
            svc, self.principal, route, method or "", kind, rid, len(payload),
            started_loop=self.started,
        )  # fmt: skip
        order = CallOrder(
            route.function_id, _JSON, method, route.timeout_s, route.startup_timeout_s, rid,
            route.generation, watch.trace,
        )  # fmt: skip
        return order, watch, payload

    def _slot(self, order: CallOrder) -> contextlib.AbstractAsyncContextManager[None]:
        return call_slot(self.svc, self.principal, order.startup_timeout_s + order.timeout_s + 30)

    async def call(
        self, task: Task, request: Any, tokens: Callable[[Any], tuple[int, int]] | None = None
    ) -> Any:
        """Call a method that answers once; its decoded result. `tokens(result)` counts what it
        read and wrote, for the invocation log (none for tasks that count no tokens)."""
        order, watch, payload = await self._order(task, to_wire(request), InvocationKind.SYNC)
        async with self._slot(order):
            try:
                call = await self.svc.dispatcher.submit(order, payload)
            except KilnError as exc:
                watch.failed(exc.code)
                raise

            try:
                with abandoned_if_gone(self.request, call):
                    result = await call
            except CallAbandoned:
                watch.cancelled()
                raise
            except KilnError as exc:
                watch.failed(exc.code)
                raise
        try:
            decoded = json.loads(result.body)
            if tokens is not None:
                watch.count_tokens(*tokens(decoded))
        except (ValueError, KeyError, TypeError):
            watch.failed("unserializable_result", len(result.body))
            raise
        watch.succeeded(len(result.body))
        return decoded

    async def open(self, task: Task, request: Any, *, streamed: bool) -> OpenStream:
        """Start a generator method; the customer's slot is held until `release`."""
        kind = InvocationKind.STREAM if streamed else InvocationKind.SYNC
        order, watch, payload = await self._order(task, to_wire(request), kind)
        slot = contextlib.AsyncExitStack()
        await slot.enter_async_context(self._slot(order))
        try:
            stream = await self.svc.dispatcher.open_stream(order, payload)
        except BaseException as exc:
            watch.failed(exc.code if isinstance(exc, KilnError) else "internal_error")
            await slot.aclose()
            raise
        return OpenStream(stream, watch, slot.aclose)


async def read_task_call(request: Request) -> TaskCall:
    """Authenticate the caller and read the JSON body of an OpenAI route."""
    started = asyncio.get_running_loop().time()
    svc = services(request)
    principal = await svc.auth.authenticate(request, count=False)  # counted with its slot
    raw = await read_body(request, svc.settings.max_request_bytes)
    return TaskCall(svc, principal, request, parse_json(raw), started)


async def read_form_call(request: Request, *, max_file_bytes: int) -> tuple[TaskCall, bytes, str]:
    """Authenticate the caller and read the `multipart/form-data` body of an upload route: its
    text fields become the call's body; its one file (`file`) is returned with its name."""
    started = asyncio.get_running_loop().time()
    svc = services(request)
    principal = await svc.auth.authenticate(request, count=False)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(
            "the body must be multipart/form-data, with the audio in a part named 'file'"
        )
    raw = await read_body(request, min(svc.settings.max_request_bytes, max_file_bytes + 65_536))

    async def body() -> AsyncGenerator[bytes, None]:
        yield raw

    try:
        form = await MultiPartParser(
            request.headers, body(), max_files=1, max_fields=32, max_part_size=65_536
        ).parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"the form could not be read: {exc.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file is required: the audio to transcribe", param="file")
        content = await upload.read(max_file_bytes + 1)
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key.removesuffix("[]"), []).append(value)
    finally:
        await form.close()
    text = {key: values if len(values) > 1 else values[0] for key, values in fields.items()}
    return TaskCall(svc, principal, request, text, started), content, upload.filename or "file"
