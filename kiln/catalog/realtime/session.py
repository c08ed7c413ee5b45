"""One voice-agent session over OpenAI's Realtime protocol: client events in, server events out.

The client streams its microphone as `input_audio_buffer.append` (PCM16 at 16 or 24 kHz,
resampled here to the 16 kHz the recogniser and the VAD read). With server VAD on (the
default), speech starting and stopping are announced (`input_audio_buffer.speech_started` /
`speech_stopped`), partial transcripts stream while the user speaks
(`conversation.item.input_audio_transcription.delta`, whenever a new hypothesis extends what
was sent), and the end of the turn commits the audio, sends the final transcript (`...completed`)
and starts the answer (`kiln.catalog.realtime.response`). Without it, the client commits and
asks for answers itself (`input_audio_buffer.commit`, `response.create`).

Barge-in: speech starting while an answer plays cancels the answer at once (no frame leaves
after `speech_started`), tells the client to drop the audio it holds
(`output_audio_buffer.cleared`), and truncates the assistant's item to what the client can have
played (`conversation.item.truncated`), which is what the conversation keeps. A client that
knows better says so with `conversation.item.truncate`.

Every refusal is an `error` event naming the event and field; the session goes on. Nothing grows
without bound: appends are capped in size, the input buffer at `MAX_TURN_S` (server VAD ends a
longer turn there), the conversation at `MAX_ITEMS`, and a session with no client event for
`idle_timeout_s` is told so and closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import kiln
from kiln.catalog.realtime.events import (
    RealtimeError,
    SessionConfig,
    error_event,
    new_id,
    updated,
)
from kiln.catalog.realtime.response import Response, Turn
from kiln.catalog.realtime.vad import RATE, SpeechDetector, VadEvent
from kiln.functions.audio import SAMPLE_BYTES
from kiln.functions.audio_codec import Resampler

__all__ = ["MAX_APPEND_MS", "MAX_TURN_S", "RealtimeSession"]

_log = logging.getLogger("kiln.catalog.voice")

MAX_APPEND_MS = 1000  # audio in one append
MAX_TURN_S = 30.0  # audio held for one turn
MAX_ITEMS = 64  # conversation items kept (the oldest go first)
PARTIAL_EVERY_S = 0.5  # speech between partial transcripts
MIN_COMMIT_MS = 100  # OpenAI's minimum for a manual commit
_MS_BYTES = RATE * SAMPLE_BYTES // 1000  # bytes of 16 kHz PCM16 per ms


@dataclass
class Item:
    id: str
    role: str  # "user" or "assistant"
    text: str = ""
    audio_ms: float = 0.0  # assistant: the audio sent
    answer: Response | None = None  # assistant: what was spoken, phrase by phrase


class RealtimeSession:
    def __init__(self, agent: Any, io: kiln.Session, *, model: str, idle_timeout_s: float) -> None:
        self.agent = agent
        self.io = io
        self.model = model
        self.idle_timeout_s = idle_timeout_s
        self.id = new_id("sess")
        self.config = SessionConfig()
        self.loop = asyncio.get_running_loop()
        self.resampler = Resampler(self.config.input_rate, RATE)
        self.detector = self._detector()
        self.buffer = bytearray()  # 16 kHz PCM16 since the last commit or clear
        self.buffer_start_ms = 0  # the audio time of the buffer's first byte
        self.items: dict[str, Item] = {}
        self.speech_item: str | None = None  # the user item being spoken
        self.speech_start_ms = 0
        self.partial: asyncio.Task[None] | None = None
        self.partial_sent = ""
        self.partial_at_ms = 0
        self.pending: asyncio.Task[str] | None = None  # the last committed turn's transcript
        self.response: Response | None = None
        self.responding: asyncio.Task[None] | None = None
        self.turns: list[dict[str, Any]] = []

    # Plumbing ----------------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", new_id("event"))
        await self.io.send(json.dumps(event, separators=(",", ":")))

    def _detector(self) -> SpeechDetector | None:
        detection = self.config.turn_detection
        if detection is None:
            return None
        return SpeechDetector.silero(self.agent.vad_model, detection)

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self._session()})
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.io.receive(), self.idle_timeout_s)
                except TimeoutError:
                    idle = RealtimeError(
                        "session_idle_timeout",
                        f"the session had no client event for {self.idle_timeout_s:g} s "
                        "and is closed",
                    )
                    await self.send(error_event(idle))
                    await self.io.close(1000, "idle timeout")
                    return
                await self._handle(message)
        except kiln.SessionClosed:
            return
        finally:
            await self._stop_response()
            for task in (self.partial, self.pending):
                if task is not None:
                    task.cancel()

    async def _handle(self, message: str | bytes) -> None:
        client_event_id = None
        try:
            if isinstance(message, bytes):
                raise RealtimeError(
                    "invalid_event",
                    "binary frames are not part of the protocol: "
                    "send audio as base64 in input_audio_buffer.append",
                )
            try:
                event = json.loads(message)
            except ValueError as exc:
                raise RealtimeError("invalid_json", f"the event is not valid JSON: {exc}") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise RealtimeError(
                    "invalid_event", "an event is a JSON object with a string 'type'", param="type"
                )
            client_event_id = event.get("event_id")
            handler = _HANDLERS.get(event["type"])
            if handler is None:
                raise RealtimeError(
                    "unknown_event",
                    f"Invalid value: '{event['type']}'. Supported values are: "
                    f"{', '.join(repr(name) for name in _HANDLERS)}.",
                    param="type",
                )
            await handler(self, event)
        except RealtimeError as error:
            await self.send(error_event(error, client_event_id))

    def _session(self) -> dict[str, Any]:
        return self.config.to_wire(self.id, self.model)

    # Session -----------------------------------------------------------------------------------

    async def _session_update(self, event: dict[str, Any]) -> None:
        config = updated(self.config, event.get("session"))
        try:
            self.agent.tts.speaker_of(config.voice)
        except kiln.InvalidArguments as exc:
            raise RealtimeError(
                "invalid_value", str(exc), param="session.audio.output.voice"
            ) from None
        if config.language is not None:
            try:
                self.agent.stt.language_of(config.language)
            except kiln.InvalidArguments as exc:
                raise RealtimeError(
                    "invalid_value", str(exc), param="session.audio.input.transcription.language"
                ) from None
        previous, self.config = self.config, config
        if config.input_rate != previous.input_rate:
            self.resampler = Resampler(config.input_rate, RATE)
        if config.turn_detection != previous.turn_detection:
            self.detector = self._detector()
        await self.send({"type": "session.updated", "session": self._session()})

    # Input audio -------------------------------------------------------------------------------

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise RealtimeError(
                "invalid_value", "audio must be base64-encoded PCM16", param="audio"
            )
        rate = self.config.input_rate
        limit = rate * SAMPLE_BYTES * MAX_APPEND_MS // 1000
        if len(audio) > (limit + 2) // 3 * 4 + 4:
            raise RealtimeError(
                "audio_too_large",
                f"an append holds at most {MAX_APPEND_MS} ms "
                f"of audio ({limit} bytes of PCM16 at {rate} Hz); send 20-40 ms "
                "frames",
                param="audio",
            )
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError(
                "invalid_value", "audio is not valid base64", param="audio"
            ) from None
        if len(pcm) % SAMPLE_BYTES:
            raise RealtimeError(
                "invalid_value",
                f"audio has {len(pcm)} bytes: PCM16 samples take 2 bytes each",
                param="audio",
            )
        if (
            self.detector is None
            and len(self.buffer) + len(pcm) * RATE // rate > MAX_TURN_S * RATE * SAMPLE_BYTES
        ):
            raise RealtimeError(
                "input_audio_buffer_full",
                f"the input audio buffer holds at most {MAX_TURN_S:g} s: commit or clear it",
                param="audio",
            )
        converted = self.resampler.push(pcm)
        self.buffer += converted
        if self.detector is None:
            return
        for vad in self.detector.push(converted):
            await self._vad(vad)
        if self.detector.speaking:
            await self._speaking()
        elif self.speech_item is None:
            self._forget_silence()

    def _forget_silence(self) -> None:
        """Keep only the prefix padding of audio that is not speech."""
        detection = self.config.turn_detection
        keep = (detection.prefix_padding_ms if detection else 0) * _MS_BYTES
        if len(self.buffer) > keep + 64 * _MS_BYTES:
            drop = len(self.buffer) - keep
            del self.buffer[:drop]
            self.buffer_start_ms += drop // _MS_BYTES

    async def _vad(self, vad: VadEvent) -> None:
        if vad.kind == "started":
            self.speech_item = new_id("item")
            self.speech_start_ms = vad.at_ms
            self.partial_sent, self.partial_at_ms = "", vad.at_ms
            # Barge-in: the answer stops before the client hears that speech started, so no
            # frame of it follows that event.
            stopped = await self._stop_response() if self._detection_interrupts() else None
            await self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": vad.at_ms,
                    "item_id": self.speech_item,
                }
            )
            if stopped is not None:
                await self._report_cancelled(stopped, "turn_detected")
            return
        item_id = self.speech_item or new_id("item")
        await self.send(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": vad.at_ms,
                "item_id": item_id,
            }
        )
        turn = Turn(began=self.loop.time(), end_of_speech_ms=vad.at_ms)
        padding = self.config.turn_detection.prefix_padding_ms if self.config.turn_detection else 0
        start = max(0, (self.speech_start_ms - padding - self.buffer_start_ms) * _MS_BYTES)
        end = max(start, (vad.at_ms - self.buffer_start_ms) * _MS_BYTES)
        await self._commit(item_id, bytes(self.buffer[start:end]), turn)
        if self.config.turn_detection is not None and self.config.turn_detection.create_response:
            await self._start_response(turn)

    def _detection_interrupts(self) -> bool:
        detection = self.config.turn_detection
        return detection is not None and detection.interrupt_response

    async def _speaking(self) -> None:
        """While the user speaks: a partial transcript now and then, and the turn's limit."""
        assert self.detector is not None
        heard = self.detector.heard_ms
        if heard - self.speech_start_ms >= MAX_TURN_S * 1000:
            stop = self.detector.end_turn()
            if stop is not None:
                await self._vad(stop)
            return
        if heard - self.partial_at_ms >= PARTIAL_EVERY_S * 1000 and (
            self.partial is None or self.partial.done()
        ):
            self.partial_at_ms = heard
            start = max(0, (self.speech_start_ms - self.buffer_start_ms) * _MS_BYTES)
            self.partial = asyncio.ensure_future(
                self._partial(self.speech_item or "", bytes(self.buffer[start:]))
            )

    async def _partial(self, item_id: str, pcm: bytes) -> None:
        try:
            text = await self._recognise(pcm)
        except Exception:  # noqa: BLE001 - a partial is a courtesy; the final transcript says
            _log.exception("partial transcript failed")
            return
        if item_id != self.speech_item or not text.startswith(self.partial_sent):
            return  # the turn ended, or the new hypothesis revises what was sent
        delta, self.partial_sent = text[len(self.partial_sent) :], text
        if delta:
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": delta,
                }
            )

    async def _recognise(self, pcm: bytes) -> str:
        import numpy as np

        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        text: str = await asyncio.to_thread(
            self.agent.stt.recognise,
            samples,
            language=self.config.language,
            prompt=self.config.transcription_prompt,
        )
        return text

    async def _commit(self, item_id: str, pcm: bytes, turn: Turn) -> None:
        """A user turn: its item, then its transcript as soon as it is made."""
        previous = next(reversed(self.items), None)
        self._remember(Item(item_id, "user"))
        self.speech_item = None
        if self.partial is not None:
            self.partial.cancel()
        del self.buffer[:]
        self.buffer_start_ms = self.detector.heard_ms if self.detector else 0
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        await self.send(
            {
                "type": "conversation.item.added",
                "previous_item_id": previous,
                "item": {
                    "id": item_id,
                    "object": "realtime.item",
                    "type": "message",
                    "role": "user",
                    "status": "completed",
                    "content": [{"type": "input_audio", "transcript": None}],
                },
            }
        )
        self.pending = asyncio.ensure_future(self._transcribe(item_id, pcm, turn))

    async def _transcribe(self, item_id: str, pcm: bytes, turn: Turn) -> str:
        try:
            text = await self._recognise(pcm)
        except Exception as exc:  # noqa: BLE001 - the session outlives a failed transcript
            _log.exception("transcription failed")
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.failed",
                    "item_id": item_id,
                    "content_index": 0,
                    "error": {
                        "type": "server_error",
                        "code": "transcription_failed",
                        "message": str(exc)[:200],
                    },
                }
            )
            return ""
        turn.transcribed = self.loop.time()
        item = self.items.get(item_id)
        if item is not None:
            item.text = text
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": text,
            }
        )
        return text

    async def _buffer_commit(self, event: dict[str, Any]) -> None:
        ms = len(self.buffer) // _MS_BYTES
        if ms < MIN_COMMIT_MS:
            raise RealtimeError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio "
                f"buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms "
                f"of audio, but buffer only has {ms}ms of audio.",
            )
        turn = Turn(began=self.loop.time())
        await self._commit(self.speech_item or new_id("item"), bytes(self.buffer), turn)

    async def _buffer_clear(self, event: dict[str, Any]) -> None:
        del self.buffer[:]
        self.speech_item = None
        self.buffer_start_ms = self.detector.heard_ms if self.detector else 0
        if self.detector is not None and self.detector.speaking:
            self.detector = self._detector()
        await self.send({"type": "input_audio_buffer.cleared"})

    # Answers -----------------------------------------------------------------------------------

    async def _response_create(self, event: dict[str, Any]) -> None:
        if self.response is not None:
            raise RealtimeError(
                "conversation_already_has_active_response",
                "Conversation "
                f"already has an active response in progress: {self.response.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        await self._start_response(Turn(began=self.loop.time()))

    async def _start_response(self, turn: Turn) -> None:
        if self.response is not None:  # a turn ended over an answer that was not interrupted
            await self._cancel_response("turn_detected")
        response = Response(
            turn=turn,
            messages=(),
            voice=self.agent.tts.speaker_of(self.config.voice),
            speed=self.config.speed,
            max_tokens=self.config.max_output_tokens,
            chat=self.agent.chat,
            tts=self.agent.tts,
            send=self.send,
        )
        self.response = response
        self.responding = asyncio.ensure_future(self._respond(response))

    async def _respond(self, response: Response) -> None:
        if self.pending is not None:  # the turn's words first: the answer depends on them
            with contextlib.suppress(Exception):
                await asyncio.shield(self.pending)
        await self.send(
            {
                "type": "response.created",
                "response": {
                    "id": response.id,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "output": [],
                },
            }
        )
        response.messages = self.agent.fit(self.config.instructions, self._history())
        previous = next(reversed(self.items), None)
        item = Item(response.item_id, "assistant", answer=response)
        self._remember(item)
        shown = {
            "id": item.id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        await self.send(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": shown}
        )
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": shown,
            }
        )
        try:
            await response.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session outlives a failed answer
            _log.exception("the answer failed")
            await self._finish(
                response,
                "failed",
                {
                    "type": "failed",
                    "error": {
                        "type": "server_error",
                        "code": "generation_failed",
                        "message": str(exc)[:200],
                    },
                },
            )
            if self.response is response:
                self.response = None
            return
        item.text, item.audio_ms = response.transcript, response.sent_ms
        await self._finish(response, "completed", None)
        if self.response is response:
            self.response = None

    async def _finish(
        self, response: Response, status: str, details: dict[str, Any] | None
    ) -> None:
        """The answer's closing events and its turn's timings."""
        base = {
            "response_id": response.id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        await self.send({"type": "response.output_audio.done", **base})
        await self.send(
            {
                "type": "response.output_audio_transcript.done",
                **base,
                "transcript": self.items.get(response.item_id, Item("", "")).text,
            }
        )
        item = {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed" if status == "completed" else "incomplete",
            "content": [
                {
                    "type": "output_audio",
                    "transcript": self.items.get(response.item_id, Item("", "")).text,
                }
            ],
        }
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            }
        )
        report = response.turn.report()
        self.turns.append(report)
        await self.send(
            {
                "type": "response.done",
                "response": {
                    "id": response.id,
                    "object": "realtime.response",
                    "status": status,
                    "status_details": details,
                    "output": [item],
                    "usage": {"output_tokens": response.tokens},
                },
                "kiln": {"turn": report},
            }
        )

    async def _cancel_response(self, reason: str) -> None:
        """Stop the answer in progress and say so."""
        stopped = await self._stop_response()
        if stopped is not None:
            await self._report_cancelled(stopped, reason)

    async def _stop_response(self) -> Response | None:
        """Stop the answer in progress: no frame of it leaves after this returns."""
        response, task = self.response, self.responding
        if response is None or task is None:
            return None
        self.response = None
        response.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return response

    async def _report_cancelled(self, response: Response, reason: str) -> None:
        """A stopped answer's closing events; the conversation keeps what the client can
        have played of it."""
        response.turn.barge_in = reason == "turn_detected"
        played = response.played_ms(self.loop.time())
        item = self.items.get(response.item_id)
        if item is not None:
            item.text, item.audio_ms = response.kept(played), response.sent_ms
            await self.send({"type": "output_audio_buffer.cleared", "response_id": response.id})
            await self.send(
                {
                    "type": "conversation.item.truncated",
                    "item_id": item.id,
                    "content_index": 0,
                    "audio_end_ms": int(played),
                }
            )
        await self._finish(response, "cancelled", {"type": "cancelled", "reason": reason})

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted is not None and wanted != self.response.id):
            raise RealtimeError(
                "response_cancel_not_active",
                "Cancellation failed: no active "
                "response found" + (f" with id {wanted}" if wanted else ""),
                param="response_id",
            )
        await self._cancel_response("client_cancelled")

    # Conversation ------------------------------------------------------------------------------

    def _remember(self, item: Item) -> None:
        self.items[item.id] = item
        while len(self.items) > MAX_ITEMS:
            del self.items[next(iter(self.items))]

    def _history(self) -> list[kiln.Message]:
        return [
            kiln.Message(role="user" if item.role == "user" else "assistant", content=item.text)
            for item in self.items.values()
            if item.text
        ]

    async def _truncate(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        item = self.items.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise RealtimeError(
                "item_truncate_invalid_item_id",
                f"Item with item_id not found: {item_id}",
                param="item_id",
            )
        if item.role != "assistant":
            raise RealtimeError(
                "invalid_value",
                f"item {item_id} is the user's: only an assistant's audio can be truncated",
                param="item_id",
            )
        if event.get("content_index", 0) != 0:
            raise RealtimeError(
                "invalid_value",
                "content_index must be 0: an answer has one audio part",
                param="content_index",
            )
        end = event.get("audio_end_ms")
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            raise RealtimeError(
                "invalid_value",
                f"audio_end_ms={end!r} is not valid: expected milliseconds of the item's audio",
                param="audio_end_ms",
            )
        if end > item.audio_ms + 1:
            raise RealtimeError(
                "invalid_value",
                f"audio_end_ms={end} is after the end of the "
                f"item's audio ({int(item.audio_ms)} ms)",
                param="audio_end_ms",
            )
        if self.response is not None and self.response.item_id == item.id:
            await self._cancel_response("client_cancelled")
        if item.answer is not None:
            item.text = item.answer.kept(end)
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item.id,
                "content_index": 0,
                "audio_end_ms": end,
            }
        )


_HANDLERS = {
    "session.update": RealtimeSession._session_update,
    "input_audio_buffer.append": RealtimeSession._append,
    "input_audio_buffer.commit": RealtimeSession._buffer_commit,
    "input_audio_buffer.clear": RealtimeSession._buffer_clear,
    "response.create": RealtimeSession._response_create,
    "response.cancel": RealtimeSession._response_cancel,
    "conversation.item.truncate": RealtimeSession._truncate,
}
