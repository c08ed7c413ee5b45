"""`POST /v1/audio/transcriptions` and `POST /v1/audio/speech`: a deployment's transcription and
speech methods, in OpenAI's shapes.

A transcription is answered once, as JSON (`{"text"}`), plain text, SRT or WebVTT captions, or
verbose JSON with the segments' times. Speech is streamed: the replica encodes each phrase as
the method yields it (`kiln.functions.audio_codec`), and each piece goes to the client as it
arrives, as the body of the chosen audio type or (`stream_format: "sse"`) as
`speech.audio.delta` events. As with chat, an error before the first piece is an ordinary error
answer; the client leaving stops the synthesis.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from kiln.errors import KilnError, UnserializableResult
from kiln.functions.audio_codec import media_type
from kiln.functions.tasks import Segment, Task, Transcription, transcription_from_wire
from kiln.router.openai.audio_requests import MAX_AUDIO_BYTES, speech_call, transcription_call
from kiln.router.openai.calls import OpenStream, read_form_call, read_task_call
from kiln.router.openai.errors import openai_errors, sse_error
from kiln.router.run import watch_disconnect

__all__ = ["speech", "transcriptions"]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@openai_errors
async def transcriptions(request: Request) -> Response:
    call, content, filename = await read_form_call(request, max_file_bytes=MAX_AUDIO_BYTES)
    asked = transcription_call(call.body, content, filename)
    result = transcription_from_wire(await call.call(Task.TRANSCRIPTION, asked.request))
    return _transcript(result, asked.response_format)


def _transcript(result: Transcription, response_format: str) -> Response:
    usage = {"type": "duration", "seconds": math.ceil(result.duration_s)}
    if response_format == "text":
        return PlainTextResponse(result.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(_captions(result.segments, srt=True))
    if response_format == "vtt":
        return PlainTextResponse(_captions(result.segments, srt=False), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": result.language,
                "duration": result.duration_s,
                "text": result.text,
                "segments": [
                    {
                        "id": i,
                        "seek": round(segment.start * 100),  # in 10 ms frames, as Whisper's
                        "start": segment.start,
                        "end": segment.end,
                        "text": segment.text,
                        "temperature": 0.0,
                    }
                    for i, segment in enumerate(result.segments)
                ],
                "usage": usage,
            }
        )
    return JSONResponse({"text": result.text, "usage": usage})


def _captions(segments: Sequence[Segment], *, srt: bool) -> str:
    """Subtitles: SRT (numbered cues, commas before milliseconds) or WebVTT."""
    cues = []
    for i, segment in enumerate(segments, start=1):
        times = f"{_clock(segment.start, srt)} --> {_clock(segment.end, srt)}"
        cues.append(f"{i}\n{times}\n{segment.text}\n" if srt else f"{times}\n{segment.text}\n")
    return "\n".join(cues) if srt else "WEBVTT\n\n" + "\n".join(cues)


def _clock(seconds: float, srt: bool) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{',' if srt else '.'}{millis:03d}"


@openai_errors
async def speech(request: Request) -> Response:
    call = await read_task_call(request)
    asked = speech_call(call.body)
    opened = await call.open(Task.SPEECH, asked.request, streamed=True)
    stop_watching = watch_disconnect(request)(opened.stream.abandon)
    try:
        # The status is decided by the first piece: an error before it is an error answer.
        first = await anext(opened.stream, None)
        head = b"" if first is None else _audio(first)
    except BaseException as exc:
        opened.failed(exc)
        await opened.close()
        raise
    finally:
        stop_watching()
    headers = {"X-Request-Id": opened.watch.request_id, **_STREAM_HEADERS}
    if asked.sse:
        return StreamingResponse(
            _events(opened, head), media_type="text/event-stream", headers=headers
        )
    return StreamingResponse(
        _pieces(opened, head), media_type=media_type(asked.request.response_format),
        headers=headers,
    )  # fmt: skip


def _audio(chunk: bytes) -> bytes:
    """A piece of encoded audio from the replica (a JSON string of base64)."""
    try:
        return base64.b64decode(json.loads(chunk), validate=True)
    except (ValueError, TypeError, binascii.Error):
        raise UnserializableResult(
            "the deployment sent a piece of speech that is not audio: a speech method yields "
            "kiln.Audio"
        ) from None


async def _pieces(opened: OpenStream, head: bytes) -> AsyncIterator[bytes]:
    sent = 0
    try:
        if head:
            yield head
            sent += len(head)
        async for chunk in opened.stream:
            piece = _audio(chunk)
            yield piece
            sent += len(piece)
        opened.watch.succeeded(sent)
    except BaseException as exc:
        # Mid-stream there is no status left to set: the audio just ends, and the log says why.
        opened.failed(exc, sent)
        if not isinstance(exc, KilnError):
            raise
    finally:
        await opened.close()


def _event(data: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % json.dumps(data, separators=(",", ":")).encode()


async def _events(opened: OpenStream, head: bytes) -> AsyncIterator[bytes]:
    sent = 0
    try:
        if head:
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(head).decode()})
            sent += len(head)
        async for chunk in opened.stream:
            piece = _audio(chunk)
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
            sent += len(piece)
        yield _event({"type": "speech.audio.done"})
        opened.watch.succeeded(sent)
    except KilnError as exc:
        opened.failed(exc, sent)
        yield sse_error(exc)
    except BaseException as exc:
        opened.failed(exc, sent)
        raise
    finally:
        await opened.close()
