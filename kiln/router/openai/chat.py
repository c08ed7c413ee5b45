"""`POST /v1/chat/completions` and `POST /v1/completions`: a deployment's chat or completions
method, answered in OpenAI's shapes.

The method is a generator of text deltas (and a last `Finish`), so both routes read a stream
from the replica. Streamed to the client, it is Server-Sent Events in OpenAI's chunk format: a
first chunk (the assistant's role, for chat), one chunk per delta, a chunk with
`finish_reason`, the usage chunk when `stream_options.include_usage` asks for it, then
`data: [DONE]`. An error before the first delta is an ordinary error answer; one after it is a
`data:` event with OpenAI's error body, then `[DONE]`. Otherwise the deltas are joined into
one `chat.completion` (or `text_completion`) answer.

The client leaving stops the call: the replica closes the generator after its current step.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.errors import KilnError, UnserializableResult
from kiln.functions.tasks import Task
from kiln.router.errors import request_id
from kiln.router.openai.calls import OpenStream, read_task_call
from kiln.router.openai.errors import openai_errors, sse_error
from kiln.router.openai.requests import chat_call, completion_call
from kiln.router.run import watch_disconnect

__all__ = ["chat_completions", "completions"]

_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Outcome:
    """What the method said beyond its text: why it stopped and the tokens it counted."""

    reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int | None = None  # None: it did not say; one per delta is counted
    deltas: int = 0

    @property
    def usage(self) -> dict[str, int]:
        completion = self.deltas if self.completion_tokens is None else self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _item(chunk: bytes, outcome: _Outcome) -> str | None:
    """A chunk's text delta, or None when it is the `Finish` (recorded on `outcome`)."""
    try:
        item = json.loads(chunk)
    except ValueError:
        raise UnserializableResult("the deployment sent a chunk that is not JSON") from None
    if isinstance(item, str):
        outcome.deltas += 1
        return item
    finish = item.get("finish") if isinstance(item, dict) else None
    if not isinstance(finish, dict):
        raise UnserializableResult(
            f"the deployment yielded {type(item).__name__}: a chat or completions method yields "
            "str deltas and, last, a kiln.Finish"
        )
    outcome.reason = "length" if finish.get("reason") == "length" else "stop"
    outcome.prompt_tokens = int(finish.get("prompt_tokens", 0))
    outcome.completion_tokens = int(finish.get("completion_tokens", 0))
    return None


class _Shape:
    """OpenAI's objects for one answer: chat's or legacy completions'."""

    def __init__(self, chat: bool, model: str, call_id: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + call_id
        self.created = int(time.time())
        self._envelope: tuple[bytes, bytes] | None = None

    def _base(self, streamed: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def delta(self, raw: bytes) -> bytes:
        """The chunk of one text delta that arrives as a JSON string (`"hel"`): spliced into
        the chunk as it is, neither decoded nor encoded again (the hot path of a stream)."""
        envelope = self._envelope
        if envelope is None:
            marker = self.chunk("\x00")
            head, _, tail = marker.rpartition(b'"\\u0000"')
            envelope = self._envelope = (head, tail)
        return envelope[0] + raw + envelope[1]

    def chunk(self, text: str | None, *, role: bool = False, finish: str | None = None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish)
        return _event({**self._base(True), "choices": [choice]})

    def usage_chunk(self, outcome: _Outcome) -> bytes:
        return _event({**self._base(True), "choices": [], "usage": outcome.usage})

    def answer(self, text: str, outcome: _Outcome) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=outcome.reason)
        return {**self._base(False), "choices": [choice], "usage": outcome.usage}


def _event(data: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % json.dumps(data, separators=(",", ":")).encode()


@openai_errors
async def chat_completions(request: Request) -> Response:
    call = await read_task_call(request)
    asked = chat_call(call.body)
    opened = await call.open(Task.CHAT, asked.request, streamed=asked.stream)
    shape = _Shape(True, asked.request.model, request_id(request))
    return await _answer(request, opened, shape, stream=asked.stream, usage=asked.include_usage)


@openai_errors
async def completions(request: Request) -> Response:
    call = await read_task_call(request)
    asked = completion_call(call.body)
    opened = await call.open(Task.COMPLETIONS, asked.request, streamed=asked.stream)
    shape = _Shape(False, asked.request.model, request_id(request))
    return await _answer(request, opened, shape, stream=asked.stream, usage=asked.include_usage)


async def _answer(
    request: Request, opened: OpenStream, shape: _Shape, *, stream: bool, usage: bool
) -> Response:
    outcome = _Outcome()
    stop_watching = watch_disconnect(request)(opened.stream.abandon)
    try:
        if not stream:
            text = await _joined(opened, outcome)
            return JSONResponse(shape.answer(text, outcome))
        # The status is decided by the first item: an error before it is an error answer.
        first = await anext(opened.stream, None)
        if first is not None and not _is_text(first):
            _item(first, outcome)  # the Finish already (no text), or an item to refuse
    except BaseException as exc:
        opened.failed(exc)
        await opened.close()
        raise
    finally:
        stop_watching()
    return StreamingResponse(
        _events(opened, shape, first, outcome, usage),
        media_type="text/event-stream",
        headers={"X-Request-Id": opened.watch.request_id, **_SSE_HEADERS},
    )


async def _joined(opened: OpenStream, outcome: _Outcome) -> str:
    parts = []
    async for chunk in opened.stream:
        text = _item(chunk, outcome)
        if text is not None:
            parts.append(text)
    text = "".join(parts)
    opened.watch.count_tokens(*_counts(outcome))
    opened.watch.succeeded(len(text.encode()))
    await opened.release()
    return text


def _counts(outcome: _Outcome) -> tuple[int, int]:
    usage = outcome.usage
    return usage["prompt_tokens"], usage["completion_tokens"]


async def _events(
    opened: OpenStream,
    shape: _Shape,
    first: bytes | None,
    outcome: _Outcome,
    usage: bool,
) -> AsyncIterator[bytes]:
    sent = 0
    try:
        if shape.chat:
            yield shape.chunk(None, role=True)
        async for data in _after(first, opened.stream):
            if _is_text(data):
                outcome.deltas += 1
                if data != _EMPTY:
                    yield shape.delta(data)
                    sent += len(data) - 2
            else:
                _item(data, outcome)  # the Finish (again, when it came first: no matter)
        yield shape.chunk(None if shape.chat else "", finish=outcome.reason)
        if usage:
            yield shape.usage_chunk(outcome)
        yield _DONE
        opened.watch.count_tokens(*_counts(outcome))
        opened.watch.succeeded(sent)
    except KilnError as exc:
        opened.watch.failed(exc.code, sent)
        yield sse_error(exc)
        yield _DONE
    except BaseException as exc:
        opened.failed(exc, sent)
        raise  # the client left (Starlette cancels the response): the finally stops the call
    finally:
        await opened.close()


_EMPTY = b'""'


async def _after(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`first`, then the rest of the stream; nothing when the stream ended before `first`."""
    if first is None:
        return
    yield first
    async for data in rest:
        yield data


def _is_text(chunk: bytes) -> bool:
    """Whether a chunk is a text delta: a JSON string (the replica sends compact JSON)."""
    return chunk[:1] == b'"'
