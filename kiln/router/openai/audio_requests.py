"""The bodies of `/v1/audio/transcriptions` (a form) and `/v1/audio/speech` (JSON), checked
against OpenAI's API as `kiln.router.openai.requests` checks the others: a refusal names the
field and what is allowed; what OpenAI has and Kiln does not do is refused by name."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidRequest
from kiln.functions.tasks import SPEECH_FORMATS, SpeechRequest, TranscriptionRequest
from kiln.router.openai.requests import model_of

__all__ = [
    "MAX_AUDIO_BYTES",
    "TRANSCRIPT_FORMATS",
    "SpeechCall",
    "TranscriptionCall",
    "speech_call",
    "transcription_call",
]

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's limit on an upload
MAX_SPEECH_CHARS = 4096
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_TRANSCRIPTION_FIELDS = frozenset({
    "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities",
    "stream", "include", "chunking_strategy", "known_speaker_names", "known_speaker_references",
})  # fmt: skip
_SPEECH_FIELDS = frozenset(
    {"model", "input", "voice", "response_format", "speed", "instructions", "stream_format"}
)


@dataclass(frozen=True)
class TranscriptionCall:
    request: TranscriptionRequest
    response_format: str


@dataclass(frozen=True)
class SpeechCall:
    request: SpeechRequest
    sse: bool  # stream_format "sse": base64 audio in Server-Sent Events


def _refuse(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _known(data: Mapping[str, Any], known: frozenset[str]) -> None:
    for key in data:
        if key not in known:
            raise _refuse(key, f"Unrecognized request argument supplied: {key}")


def _text(data: Mapping[str, Any], name: str, default: str = "") -> str:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _refuse(name, f"{name} must be a string, not {type(value).__name__}")
    return value


def _float(data: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name, default)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not low <= number <= high:
        raise _refuse(name, f"{name}={value!r} is not valid: expected a number from {low:g} to "
                      f"{high:g}")  # fmt: skip
    return number


def transcription_call(fields: Mapping[str, Any], file: bytes, filename: str) -> TranscriptionCall:
    """A transcription form's text fields and file, checked."""
    model = model_of(fields)
    _known(fields, _TRANSCRIPTION_FIELDS)
    if not file:
        raise _refuse("file", "file is empty: send the recording to transcribe")
    if len(file) > MAX_AUDIO_BYTES:
        raise _refuse("file", f"file has {len(file)} bytes; the limit is {MAX_AUDIO_BYTES} (25 MB)")
    response_format = _text(fields, "response_format", "json")
    if response_format not in TRANSCRIPT_FORMATS:
        raise _refuse("response_format", f"response_format={response_format!r} is not valid: "
                      f"expected one of {', '.join(TRANSCRIPT_FORMATS)}")  # fmt: skip
    granularities = fields.get("timestamp_granularities", [])
    for granularity in [granularities] if isinstance(granularities, str) else granularities:
        if granularity != "segment":
            raise _refuse("timestamp_granularities", f"timestamp_granularities={granularity!r} "
                          "is not supported: deployments give segment times only")  # fmt: skip
    if _text(fields, "stream", "false").lower() not in ("false", "0", ""):
        raise _refuse("stream", "stream is not supported for transcriptions: the answer comes "
                      "whole (for live speech, use WS /v1/realtime)")  # fmt: skip
    for name in ("include", "chunking_strategy", "known_speaker_names",
                 "known_speaker_references"):  # fmt: skip
        if fields.get(name):
            raise _refuse(name, f"{name} is not supported by Kiln's transcription deployments")
    language = _text(fields, "language").strip() or None
    if language is not None and not (2 <= len(language) <= 3 and language.isalpha()):
        raise _refuse("language", f"language={language!r} is not valid: expected an ISO-639-1 "
                      "code such as 'en'")  # fmt: skip
    request = TranscriptionRequest(
        model=model,
        file=file,
        filename=filename[:255] or "audio",
        language=language,
        prompt=_text(fields, "prompt")[:2000],
        temperature=_float(fields, "temperature", 0.0, 1.0, 0.0),
    )
    return TranscriptionCall(request, response_format)


def speech_call(body: Any) -> SpeechCall:
    model = model_of(body)
    _known(body, _SPEECH_FIELDS)
    text = _text(body, "input")
    if not text.strip():
        raise _refuse("input", "input is required: the text to speak")
    if len(text) > MAX_SPEECH_CHARS:
        raise _refuse("input", f"input has {len(text)} characters; the limit is "
                      f"{MAX_SPEECH_CHARS}")  # fmt: skip
    voice = body.get("voice", "alloy")
    if isinstance(voice, dict):  # a custom voice by id, as OpenAI allows
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip() or len(voice) > 64:
        raise _refuse("voice", f"voice={voice!r} is not valid: expected a voice name such as "
                      "'alloy'")  # fmt: skip
    response_format = _text(body, "response_format", "mp3")
    if response_format not in SPEECH_FORMATS:
        raise _refuse("response_format", f"response_format={response_format!r} is not valid: "
                      f"expected one of {', '.join(SPEECH_FORMATS)}")  # fmt: skip
    stream_format = _text(body, "stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise _refuse("stream_format", f"stream_format={stream_format!r} is not valid: expected "
                      "'audio' or 'sse'")  # fmt: skip
    request = SpeechRequest(
        model=model,
        input=text,
        voice=voice.strip(),
        response_format=response_format,
        speed=_float(body, "speed", 0.25, 4.0, 1.0),
        instructions=_text(body, "instructions")[:4096],
    )
    return SpeechCall(request, stream_format == "sse")
