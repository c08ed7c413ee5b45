"""One spoken answer: the chat model's tokens cut into phrases, each phrase synthesised as soon
as it is whole, and its audio sent in 40 ms frames paced to real time.

Generation and synthesis overlap: a thread runs the chat model's generator and hands its deltas
to the event loop; the phrases they complete queue up for the speaker, which synthesises one
(in a thread), sends its transcript, then its frames at the pace the listener plays them
(`kiln.functions.audio.Pacer`), so the client never holds more than a fraction of a second of
audio that a barge-in would throw away.

Cancelling the answer (barge-in, `response.cancel`) stops the sending at once; the generator
is closed by its own thread after the token in progress, and a phrase being synthesised is
dropped when it is done. What was played is then known from the clock: the audio sent, less
what the client cannot have played yet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kiln
from kiln.catalog._phrases import PhraseSplitter
from kiln.catalog.realtime.events import OUTPUT_RATE, new_id
from kiln.functions.audio import SAMPLE_BYTES, Pacer, Pcm, frames
from kiln.functions.audio_codec import Resampler

__all__ = ["FRAME_MS", "LEAD_S", "Response", "Spoken", "Turn"]

FRAME_MS = 40
LEAD_S = 0.1  # audio the client may hold ahead of what it plays
_END = object()


@dataclass
class Turn:
    """When each stage of one turn happened (the event loop's clock)."""

    began: float  # the end of the user's speech (or response.create)
    end_of_speech_ms: int | None = None  # in the session's audio
    transcribed: float | None = None
    first_token: float | None = None
    first_audio: float | None = None
    barge_in: bool = False

    def report(self) -> dict[str, Any]:
        def since(moment: float | None) -> float | None:
            return None if moment is None else round((moment - self.began) * 1000, 2)

        return {
            "audio_end_ms": self.end_of_speech_ms,
            "transcript_ms": since(self.transcribed),
            "first_token_ms": since(self.first_token),
            "first_audio_ms": since(self.first_audio),
            "barge_in": self.barge_in,
        }


@dataclass(frozen=True)
class Spoken:
    """A phrase as sent: its text and where its audio lies in the answer (ms)."""

    text: str
    start_ms: float
    end_ms: float


@dataclass
class Response:
    """An answer in progress; `run` speaks it through `send`."""

    turn: Turn
    messages: tuple[kiln.Message, ...]
    voice: int | None
    speed: float
    max_tokens: int | None
    chat: Any  # the chat engine (`TransformersText`)
    tts: Any  # the speech engine (`TransformersSpeech`)
    send: Callable[[dict[str, Any]], Awaitable[None]]
    id: str = field(default_factory=lambda: new_id("resp"))
    item_id: str = field(default_factory=lambda: new_id("item"))
    spoken: list[Spoken] = field(default_factory=list)
    sent_ms: float = 0.0
    tokens: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def transcript(self) -> str:
        return " ".join(s.text for s in self.spoken)

    def played_ms(self, now: float) -> float:
        """How much of the sent audio the client can have played by `now` (it plays each
        frame as it arrives, at real time)."""
        if self.turn.first_audio is None:
            return 0.0
        return max(0.0, min(self.sent_ms, (now - self.turn.first_audio) * 1000))

    def kept(self, played_ms: float) -> str:
        """The transcript of the audio up to `played_ms`: whole phrases, and the words of the
        phrase in progress in proportion to its time played."""
        kept: list[str] = []
        for phrase in self.spoken:
            if phrase.end_ms <= played_ms:
                kept.append(phrase.text)
                continue
            if phrase.start_ms < played_ms:
                words = phrase.text.split()
                share = (played_ms - phrase.start_ms) / max(1.0, phrase.end_ms - phrase.start_ms)
                if heard := words[: int(len(words) * share)]:
                    kept.append(" ".join(heard))
            break
        return " ".join(kept)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        phrases: asyncio.Queue[object] = asyncio.Queue()
        writer = asyncio.ensure_future(self._write(loop, phrases))
        try:
            await self._speak(phrases)
            await writer
        finally:
            self.stop()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _write(self, loop: asyncio.AbstractEventLoop, phrases: asyncio.Queue[object]) -> None:
        """The chat model's deltas, from its thread, into phrases."""
        deltas: asyncio.Queue[object] = asyncio.Queue()
        request = kiln.ChatRequest(messages=self.messages, max_tokens=self.max_tokens)
        thread = threading.Thread(
            target=self._generate, args=(loop, deltas, request), name="kiln-voice-chat", daemon=True
        )
        thread.start()
        splitter = PhraseSplitter()
        try:
            while (delta := await deltas.get()) is not _END:
                if isinstance(delta, BaseException):
                    raise delta
                if not isinstance(delta, str):
                    continue  # the Finish
                if self.turn.first_token is None:
                    self.turn.first_token = loop.time()
                self.tokens += 1
                for phrase in splitter.feed(delta):
                    phrases.put_nowait(phrase)
            for phrase in splitter.flush():
                phrases.put_nowait(phrase)
        finally:
            # The speaker stops at the end of the phrases, even when generation failed (the
            # error is then raised where `run` awaits this task).
            phrases.put_nowait(_END)

    def _generate(
        self, loop: asyncio.AbstractEventLoop, deltas: asyncio.Queue[object], request: Any
    ) -> None:
        stream: Iterator[Any] = self.chat.chat(request)
        try:
            for item in stream:
                if self._stop.is_set():
                    break
                loop.call_soon_threadsafe(deltas.put_nowait, item)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which raises it
            loop.call_soon_threadsafe(deltas.put_nowait, exc)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            loop.call_soon_threadsafe(deltas.put_nowait, _END)

    async def _speak(self, phrases: asyncio.Queue[object]) -> None:
        """Synthesise and send each phrase as it comes, paced to real time."""
        loop = asyncio.get_running_loop()
        resampler: Resampler | None = None
        pacer = Pacer(OUTPUT_RATE, lead_s=LEAD_S, clock=loop.time)
        while (phrase := await phrases.get()) is not _END:
            assert isinstance(phrase, str)
            audio = await asyncio.to_thread(
                self.tts.synthesise, phrase, speaker=self.voice, speed=self.speed
            )
            if resampler is None:
                resampler = Resampler(audio.sample_rate, OUTPUT_RATE)
            pcm = resampler.push(audio.pcm)
            start = self.sent_ms
            await self.send(
                {
                    "type": "response.output_audio_transcript.delta",
                    "response_id": self.id,
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": phrase if not self.spoken else " " + phrase,
                }
            )
            self.spoken.append(Spoken(phrase, start, start + _ms(len(pcm))))
            await self._frames(pcm, pacer)
        if resampler is not None:
            await self._frames(resampler.flush(), pacer)

    async def _frames(self, pcm: bytes, pacer: Pacer) -> None:
        loop = asyncio.get_running_loop()
        for frame in frames(Pcm(pcm, OUTPUT_RATE), FRAME_MS):
            if self.turn.first_audio is None:
                self.turn.first_audio = loop.time()
                pacer.restart()
            elif (wait := pacer.wait_s()) > 0:
                await asyncio.sleep(wait)
            await self.send(
                {
                    "type": "response.output_audio.delta",
                    "response_id": self.id,
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": base64.b64encode(frame).decode(),
                }
            )
            pacer.sending(frame)
            self.sent_ms += _ms(len(frame))


def _ms(pcm_bytes: int) -> float:
    return pcm_bytes / SAMPLE_BYTES / OUTPUT_RATE * 1000
