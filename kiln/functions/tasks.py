"""The inference tasks a method can serve behind Kiln's OpenAI-compatible routes, and the values
that cross between the router and such a method.

A method marked `@kiln.method(task="chat")` is called with one `ChatRequest` (already validated
by the router against OpenAI's API) and yields text deltas, optionally ending with a `Finish`
that says why it stopped and how many tokens it read and wrote. `"completions"` is the same with
a `CompletionRequest`. `"embeddings"` returns `Embeddings` (or a plain list of vectors) for an
`EmbeddingsRequest`; `"image"` returns `Images` (PNG bytes) for an `ImageRequest`.

Speech: `"transcription"` returns a `Transcription` (text and timed segments) for a
`TranscriptionRequest` (the uploaded file's bytes and name); `"speech"` yields `Audio` (PCM16
mono at the model's rate, phrase by phrase) for a `SpeechRequest`, which the replica resamples and
encodes in the format asked for as it goes (`kiln.functions.audio_codec`). `"realtime"` marks a
`@kiln.websocket()` handler that speaks OpenAI's Realtime protocol (`WS /v1/realtime`).

Requests travel as JSON objects (`to_wire` / `from_wire`, unknown keys ignored so an older
replica reads a newer router's request); outputs travel as JSON too. Standard library only: the
SDK, the router and the replica all import this module.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

__all__ = [
    "GENERATOR_TASKS",
    "Audio",
    "ChatRequest",
    "CompletionRequest",
    "Embeddings",
    "EmbeddingsRequest",
    "Finish",
    "ImageRequest",
    "Images",
    "Message",
    "Segment",
    "SpeechRequest",
    "Task",
    "Transcription",
    "TranscriptionRequest",
    "embeddings_from_wire",
    "images_from_wire",
    "request_from_wire",
    "transcription_from_wire",
]


class Task(enum.StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    IMAGE = "image"
    TRANSCRIPTION = "transcription"
    SPEECH = "speech"
    REALTIME = "realtime"


# Tasks whose method is a generator (text deltas, or audio); the others return one value, but
# REALTIME's, a WebSocket handler.
GENERATOR_TASKS = frozenset({Task.CHAT, Task.COMPLETIONS, Task.SPEECH})
# Tasks served by a `@kiln.websocket()` handler rather than a `@kiln.method()`.
SESSION_TASKS = frozenset({Task.REALTIME})
# The formats `/v1/audio/speech` can answer in (PyAV encodes all but wav and pcm).
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
# The rate of speech audio as the routes send it (OpenAI's "pcm" is 24 kHz PCM16 mono).
SPEECH_SAMPLE_RATE = 24_000

_R = TypeVar("_R")


@dataclass(frozen=True, kw_only=True)
class Message:
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True, kw_only=True)
class _Sampling:
    """The sampling options chat and completions share, as OpenAI names them. `max_tokens` is
    None when the caller set no limit (the engine then stops at its context's end)."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ChatRequest(_Sampling):
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(_Sampling):
    prompt: str = ""
    echo: bool = False


@dataclass(frozen=True, kw_only=True)
class EmbeddingsRequest:
    model: str = ""
    input: tuple[str, ...] = ()
    # Shorten each vector to this many dimensions (then renormalise), where the model allows.
    dimensions: int | None = None


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    model: str = ""
    prompt: str = ""
    n: int = 1
    size: str = "512x512"
    seed: int | None = None
    steps: int | None = None  # inference steps; None: the engine's default

    @property
    def width_height(self) -> tuple[int, int]:
        width, _, height = self.size.partition("x")
        return int(width), int(height)


@dataclass(frozen=True, kw_only=True)
class TranscriptionRequest:
    """An uploaded recording to transcribe: the file's bytes as sent (WAV, or any format PyAV
    reads: mp3, m4a, ogg, webm, flac...) and its name."""

    model: str = ""
    file: bytes = b""
    filename: str = "audio"
    language: str | None = None  # ISO-639-1, such as "en"; None: the model detects it
    prompt: str = ""  # text that came before, to guide spelling and style
    temperature: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str


@dataclass(frozen=True, kw_only=True)
class Transcription:
    text: str
    language: str = ""
    duration_s: float = 0.0
    segments: Sequence[Segment] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "language": self.language,
            "duration_s": self.duration_s,
            "segments": [asdict(segment) for segment in self.segments],
        }


@dataclass(frozen=True, kw_only=True)
class SpeechRequest:
    model: str = ""
    input: str = ""
    voice: str = "alloy"
    response_format: str = "mp3"  # one of SPEECH_FORMATS
    speed: float = 1.0  # 0.25 to 4.0
    instructions: str = ""


@dataclass(frozen=True, kw_only=True)
class Audio:
    """What a speech method yields: PCM16 mono samples (little-endian) at `sample_rate`."""

    pcm: bytes
    sample_rate: int

    def to_wire(self) -> dict[str, Any]:
        return {"pcm": base64.b64encode(self.pcm).decode(), "sample_rate": self.sample_rate}


@dataclass(frozen=True, kw_only=True)
class Finish:
    """The last item a chat or completions method may yield: why it stopped ("stop": a natural
    end or a stop sequence; "length": `max_tokens` or the context ran out) and the tokens it
    read and wrote. Without one, the router reports "stop" and counts one token per delta."""

    reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"finish": asdict(self)}


@dataclass(frozen=True, kw_only=True)
class Embeddings:
    vectors: Sequence[Sequence[float]]
    prompt_tokens: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "vectors": [[float(x) for x in vector] for vector in self.vectors],
            "prompt_tokens": self.prompt_tokens,
        }


@dataclass(frozen=True, kw_only=True)
class Images:
    png: Sequence[bytes] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, Any]:
        return {"png": [base64.b64encode(image).decode() for image in self.png]}


_REQUESTS: dict[Task, type[Any]] = {
    Task.CHAT: ChatRequest,
    Task.COMPLETIONS: CompletionRequest,
    Task.EMBEDDINGS: EmbeddingsRequest,
    Task.IMAGE: ImageRequest,
    Task.TRANSCRIPTION: TranscriptionRequest,
    Task.SPEECH: SpeechRequest,
}


def request_from_wire(task: Task, data: Mapping[str, Any]) -> Any:
    """The request object a `task` method receives, from the JSON the router sent."""
    cls = _REQUESTS[task]
    known = {f.name for f in fields(cls)}
    values = {key: value for key, value in data.items() if key in known}
    if "messages" in values:
        values["messages"] = tuple(Message(**m) for m in values["messages"])
    for name in ("stop", "input"):
        if name in values and not isinstance(values[name], str):
            values[name] = tuple(values[name])
    if "file" in values:
        values["file"] = base64.b64decode(values["file"])
    return cls(**values)


def to_wire(request: Any) -> dict[str, Any]:
    """The JSON object for a request (the router's side of `request_from_wire`)."""
    wire = asdict(request)
    if isinstance(wire.get("file"), bytes):
        wire["file"] = base64.b64encode(wire["file"]).decode()
    return wire


def embeddings_from_wire(data: Any) -> Embeddings:
    """What an embeddings method returned, as the router reads it: `Embeddings`' wire form or
    a plain list of vectors."""
    if isinstance(data, list):
        return Embeddings(vectors=data)
    return Embeddings(vectors=data["vectors"], prompt_tokens=int(data.get("prompt_tokens", 0)))


def images_from_wire(data: Any) -> list[str]:
    """The base64 PNGs an image method returned."""
    return [str(image) for image in data["png"]]


def transcription_from_wire(data: Any) -> Transcription:
    """What a transcription method returned: `Transcription`'s wire form, or plain text."""
    if isinstance(data, str):
        return Transcription(text=data)
    return Transcription(
        text=str(data["text"]),
        language=str(data.get("language") or ""),
        duration_s=float(data.get("duration_s") or 0.0),
        segments=tuple(
            Segment(start=float(s["start"]), end=float(s["end"]), text=str(s["text"]))
            for s in data.get("segments") or ()
        ),
    )
