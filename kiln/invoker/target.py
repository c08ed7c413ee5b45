"""What a replica runs: the user's function, or an instance of the user's class, behind one
`call(method, body, content_type)` interface that decodes arguments, runs sync code in threads
(so the event loop keeps serving heartbeats and other calls) and encodes the result; and
`stream(...)` for generators, which yields each item encoded as it is produced."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import inspect
import json
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidArguments, NotFound, UnserializableResult
from kiln.functions.hooks import lifecycle
from kiln.functions.session import Session
from kiln.functions.spec import FunctionSpec, UnitKind
from kiln.functions.tasks import (
    Embeddings,
    Finish,
    Images,
    Task,
    Transcription,
    request_from_wire,
)

__all__ = ["Encoded", "Target", "build_target"]

BYTES = "application/octet-stream"
JSON = "application/json"


@dataclass(frozen=True)
class Encoded:
    body: bytes
    content_type: str


class Target:
    def __init__(self, spec: FunctionSpec, obj: Any, concurrency: int) -> None:
        self.spec = spec
        self.obj = obj
        self.instance: Any = None
        self._signatures: dict[str, inspect.Signature] = {}
        # One thread per concurrent input: sync user code never waits for a free thread.
        self.executor = ThreadPoolExecutor(
            max_workers=max(1, concurrency), thread_name_prefix="kiln-call"
        )

    # Lifecycle ---------------------------------------------------------------------------------

    async def instantiate(self) -> None:
        """Create the class's instance (a plain function has none)."""
        if self.spec.kind is UnitKind.CLASS:
            self.instance = await self._run(self.obj)

    async def run_hooks(self, names: tuple[str, ...]) -> None:
        for name in names:
            await self._run(getattr(self.instance, name))

    def adopt(self, state: dict[str, Any]) -> None:
        """Give the instance the attributes restored from its snapshot: what its
        @enter(snap=True) hooks built, without running them."""
        vars(self.instance).update(state)

    async def exit(self) -> None:
        # Not on the call threads: one may be stuck in an overrun call.
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.instance is not None:
            for name in lifecycle(self.obj).exit:
                hook = getattr(self.instance, name)
                if inspect.iscoroutinefunction(hook):
                    await hook()
                else:
                    await asyncio.to_thread(hook)

    # Calls -------------------------------------------------------------------------------------

    def callable_for(self, method: str | None) -> tuple[str, Callable[..., Any]]:
        if self.spec.kind is UnitKind.CLASS:
            if method is None or method not in self.spec.entries:
                raise NotFound(f"class {self.spec.name} has no method {method!r}")
            return f"{self.spec.name}.{method}", getattr(self.instance, method)
        return self.spec.name, inspect.unwrap(self.obj)

    async def call(self, method: str | None, body: bytes, content_type: str) -> Encoded:
        label, fn = self.callable_for(method)
        signature = self._signatures.get(label)
        if signature is None:
            signature = self._signatures[label] = _signature(fn)
        args, kwargs = self._task_request(method, *_decode(label, signature, body, content_type))
        return _encode(label, await self._run(fn, *args, **kwargs))

    async def stream(
        self, method: str | None, body: bytes, content_type: str
    ) -> AsyncGenerator[bytes, None]:
        """Run a generator entry point, yielding each item as JSON (bytes as a base64 string).
        A sync generator steps in the call threads, one item per step, so it is paused
        between items while the caller is not ready for more; closing this iterator closes
        the generator (its `finally` blocks run) once its current step is done."""
        label, fn = self.callable_for(method)
        signature = self._signatures.get(label)
        if signature is None:
            signature = self._signatures[label] = _signature(fn)
        args, kwargs = self._task_request(method, *_decode(label, signature, body, content_type))
        speech = self._speech_format(method, args)
        if inspect.isasyncgenfunction(fn):
            agen = fn(*args, **kwargs)
            if speech is not None:
                from kiln.functions.audio_codec import encoded_speech_async

                agen = encoded_speech_async(agen, speech)
            try:
                async for item in agen:
                    yield _encode_chunk(label, item)
            finally:
                await agen.aclose()
            return
        made = await self._run(fn, *args, **kwargs)
        if not isinstance(made, Iterator):
            raise UnserializableResult(
                f"{label} is declared a generator but returned {type(made).__name__}"
            )
        if speech is not None:
            from kiln.functions.audio_codec import encoded_speech

            made = encoded_speech(made, speech)
        steps = _Steps(made)
        loop = asyncio.get_running_loop()
        try:
            while True:
                done, item = await loop.run_in_executor(
                    self.executor, contextvars.copy_context().run, steps.next
                )
                if done:
                    return
                yield _encode_chunk(label, item)
        finally:
            # Not awaited: a step may still be running in its thread; `close` waits for it.
            try:
                self.executor.submit(steps.close)
            except RuntimeError:  # the executor is shut down: the replica is exiting
                threading.Thread(target=steps.close, daemon=True).start()

    def _task_request(
        self, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A task method's one argument as its request object (the router sends a JSON
        object; `kiln.functions.tasks` says what it holds)."""
        entry = self.spec.entry(method)
        if entry is None or entry.task is None:
            return args, kwargs
        given = [*args, *kwargs.values()]
        if len(given) != 1 or not isinstance(given[0], dict):
            raise InvalidArguments(
                f"{method} serves the {entry.task!r} task: it takes one JSON object, the request"
            )
        try:
            return (request_from_wire(Task(entry.task), given[0]),), {}
        except (TypeError, ValueError) as exc:
            raise InvalidArguments(f"the {entry.task} request is not valid: {exc}") from None

    def _speech_format(self, method: str | None, args: tuple[Any, ...]) -> str | None:
        """The format a speech method's audio is encoded in on its way out; None for others."""
        entry = self.spec.entry(method)
        if entry is None or entry.task != Task.SPEECH or not args:
            return None
        return str(args[0].response_format)

    async def session(self, method: str | None, session: Session) -> None:
        """Run a WebSocket handler with its session, until it returns."""
        _, fn = self.callable_for(method)
        await fn(session)

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        # In a copy of this task's context: the code's prints know the call they belong to.
        result = await loop.run_in_executor(
            self.executor, contextvars.copy_context().run, functools.partial(fn, *args, **kwargs)
        )
        if inspect.isawaitable(result):  # a sync wrapper around async code
            return await result
        return result


class _Steps:
    """A sync generator stepped from several threads, one step at a time: closing it waits for
    a step in progress (a running generator cannot be closed)."""

    def __init__(self, generator: Iterator[Any]) -> None:
        self.generator = generator
        self.lock = threading.Lock()

    def next(self) -> tuple[bool, Any]:
        with self.lock:
            try:
                return False, next(self.generator)
            except StopIteration:
                return True, None

    def close(self) -> None:
        with self.lock:
            close = getattr(self.generator, "close", None)
            if close is not None:
                close()


def build_target(spec: FunctionSpec, obj: Any) -> Target:
    return Target(spec, obj, concurrency=spec.resources.concurrency)


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature as the user wrote it: with `from __future__ import annotations` the
    annotations are strings, and showing them evaluated avoids quotes in messages."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated: show it as text
        return inspect.signature(fn)


def _decode(
    label: str, signature: inspect.Signature, body: bytes, content_type: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if content_type == BYTES:
        args: tuple[Any, ...] = (body,)
        kwargs: dict[str, Any] = {}
    else:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise InvalidArguments(f"the body is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            args, kwargs = (), data
        elif isinstance(data, list):
            args, kwargs = tuple(data), {}
        else:
            raise InvalidArguments(
                f"{label}{signature} takes a JSON object of keyword arguments (or an array of "
                f"positional ones), not a JSON {type(data).__name__}"
            )
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(f"{exc}; the signature is {label}{signature}") from None
    return args, kwargs


_TASK_OUTPUTS = (Finish, Embeddings, Images, Transcription)


def _encode_chunk(label: str, item: Any) -> bytes:
    if isinstance(item, _TASK_OUTPUTS):
        item = item.to_wire()
    if isinstance(item, bytes | bytearray | memoryview):
        return json.dumps(base64.b64encode(item).decode()).encode()
    try:
        return json.dumps(item, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise UnserializableResult(
            f"{label} yielded a value that cannot be sent as JSON ({exc}); yield JSON types "
            "(dict, list, str, int, float, bool, None) or bytes"
        ) from None


def _encode(label: str, result: Any) -> Encoded:
    if isinstance(result, _TASK_OUTPUTS):
        result = result.to_wire()
    if isinstance(result, bytes | bytearray | memoryview):
        return Encoded(bytes(result), BYTES)
    try:
        return Encoded(json.dumps(result, separators=(",", ":")).encode(), JSON)
    except (TypeError, ValueError) as exc:
        raise UnserializableResult(
            f"{label} returned a value that cannot be sent as JSON ({exc}); return JSON types "
            "(dict, list, str, int, float, bool, None) or bytes"
        ) from None
