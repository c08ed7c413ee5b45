"""OpenAI's Realtime protocol as Kiln's voice agent speaks it: the session's configuration and
how `session.update` changes it, the error event, and ids.

The configuration is read in the shape of OpenAI's GA API (`session.audio.input.format`,
`session.audio.input.turn_detection`, `session.audio.output.voice`...) and, for older clients,
the beta API's top-level names (`input_audio_format: "pcm16"`, `voice`, `turn_detection`,
`input_audio_transcription`). Anything else is refused by name, in an `error` event that
leaves the session as it was.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "INPUT_RATES",
    "OUTPUT_RATE",
    "RealtimeError",
    "SessionConfig",
    "TurnDetection",
    "error_event",
    "new_id",
    "updated",
]

INPUT_RATES = (16_000, 24_000)  # PCM16 mono the client may send
OUTPUT_RATE = 24_000  # PCM16 mono the server sends
DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant. Answer briefly, in one or two spoken sentences."
)


class RealtimeError(Exception):
    """A client event the session refuses; sent as an `error` event, the session kept."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(error: RealtimeError, client_event_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": new_id("event"),
        "error": {
            "type": "invalid_request_error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "event_id": client_event_id,
        },
    }


@dataclass(frozen=True)
class TurnDetection:
    """Server-side voice activity detection (OpenAI's `server_vad`)."""

    threshold: float = 0.5  # Silero's speech probability that starts speech
    prefix_padding_ms: int = 300  # audio kept from before speech started
    silence_duration_ms: int = 500  # silence that ends the user's turn
    create_response: bool = True  # answer when the turn ends
    interrupt_response: bool = True  # the user speaking stops the answer (barge-in)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "server_vad", **self.__dict__}


@dataclass(frozen=True)
class SessionConfig:
    instructions: str = DEFAULT_INSTRUCTIONS
    input_rate: int = 24_000
    voice: str = "alloy"
    speed: float = 1.0
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    language: str | None = None  # of the user's speech; None: the recogniser detects it
    transcription_prompt: str = ""
    max_output_tokens: int | None = None  # None: "inf", the model's room

    def to_wire(self, session_id: str, model: str) -> dict[str, Any]:
        """The session as `session.created` and `session.updated` show it (GA shape)."""
        detection = self.turn_detection
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": ["audio"],
            "instructions": self.instructions,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.input_rate},
                    "transcription": {
                        "language": self.language,
                        "prompt": self.transcription_prompt,
                    },
                    "turn_detection": None if detection is None else detection.to_wire(),
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": OUTPUT_RATE},
                    "voice": self.voice,
                    "speed": self.speed,
                },
            },
            "max_output_tokens": "inf"
            if self.max_output_tokens is None
            else self.max_output_tokens,
        }


def _refuse(param: str, message: str) -> RealtimeError:
    return RealtimeError("invalid_value", message, param=param)


def _object(value: Any, param: str, known: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(param, f"{param} must be an object")
    for key in value:
        if key not in known:
            raise RealtimeError(
                "unknown_parameter", f"Unknown parameter: '{param}.{key}'.", param=f"{param}.{key}"
            )
    return value


def _format_rate(value: Any, param: str, allowed: tuple[int, ...]) -> int:
    """The rate of an audio format: `{"type": "audio/pcm", "rate": N}` or beta's "pcm16"."""
    if value == "pcm16":
        return 24_000
    if isinstance(value, str):
        raise _refuse(param, f"{param}={value!r} is not supported: send PCM16 (audio/pcm)")
    fmt = _object(value, param, frozenset({"type", "rate"}))
    if fmt.get("type") != "audio/pcm":
        raise _refuse(
            f"{param}.type",
            f"{param}.type={fmt.get('type')!r} is not supported: the audio is PCM16 ('audio/pcm')",
        )
    rate = fmt.get("rate", 24_000)
    if rate not in allowed:
        raise _refuse(
            f"{param}.rate",
            f"{param}.rate={rate!r} is not supported: expected "
            f"{' or '.join(str(r) for r in allowed)}",
        )
    return int(rate)


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(param, f"{param}={value!r} is not valid: expected a number")
    if not low <= value <= high:
        raise _refuse(param, f"{param}={value!r} is not valid: expected {low:g} to {high:g}")
    return float(value)


def _turn_detection(value: Any, param: str, current: TurnDetection | None) -> TurnDetection | None:
    if value is None:
        return None
    known = frozenset(
        {
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
        }
    )
    given = _object(value, param, known)
    if given.get("type", "server_vad") != "server_vad":
        raise _refuse(
            f"{param}.type",
            f"{param}.type={given.get('type')!r} is not supported: "
            "expected 'server_vad' (or null for manual turns)",
        )
    out = current or TurnDetection()
    if "threshold" in given:
        out = replace(out, threshold=_number(given["threshold"], f"{param}.threshold", 0.0, 1.0))
    if "prefix_padding_ms" in given:
        padding = _number(given["prefix_padding_ms"], f"{param}.prefix_padding_ms", 0, 2000)
        out = replace(out, prefix_padding_ms=int(padding))
    if "silence_duration_ms" in given:
        silence = _number(given["silence_duration_ms"], f"{param}.silence_duration_ms", 100, 5000)
        out = replace(out, silence_duration_ms=int(silence))
    for name in ("create_response", "interrupt_response"):
        if name in given:
            if not isinstance(given[name], bool):
                raise _refuse(f"{param}.{name}", f"{param}.{name} must be true or false")
            out = replace(out, **{name: given[name]})
    return out


def _text(value: Any, param: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _refuse(param, f"{param} must be a string")
    if len(value) > limit:
        raise _refuse(param, f"{param} has {len(value)} characters; the limit is {limit}")
    return value


_SESSION_KEYS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "modalities",
        "audio",
        "max_output_tokens",
        "max_response_output_tokens",
        "voice",
        "input_audio_format",
        "output_audio_format",
        "turn_detection",
        "input_audio_transcription",
        "temperature",
        "tool_choice",
        "tools",
        "tracing",
        "include",
        "prompt",
        "truncation",
        "speed",
    }
)


def updated(config: SessionConfig, session: Any) -> SessionConfig:
    """`config` with a `session.update`'s `session` applied; raises `RealtimeError` (and
    changes nothing) when any part is not valid."""
    given = _object(session, "session", _SESSION_KEYS)
    out = config
    if "instructions" in given:
        out = replace(
            out, instructions=_text(given["instructions"], "session.instructions", 20_000)
        )
    for name in ("output_modalities", "modalities"):
        if name in given and given[name] not in (["audio"], ["audio", "text"], ["text", "audio"]):
            raise _refuse(
                f"session.{name}",
                f"session.{name}={given[name]!r} is not supported: "
                "this agent answers in audio (with its transcript)",
            )
    for name in ("tools", "prompt"):
        if given.get(name):
            raise _refuse(
                f"session.{name}", f"session.{name} is not supported by Kiln's voice agent"
            )
    for name in ("max_output_tokens", "max_response_output_tokens"):
        if name in given:
            value = given[name]
            if value == "inf":
                out = replace(out, max_output_tokens=None)
            else:
                out = replace(
                    out, max_output_tokens=int(_number(value, f"session.{name}", 1, 4096))
                )
    # The beta API's names.
    if "input_audio_format" in given:
        rate = _format_rate(given["input_audio_format"], "session.input_audio_format", INPUT_RATES)
        out = replace(out, input_rate=rate)
    if "output_audio_format" in given:
        _format_rate(given["output_audio_format"], "session.output_audio_format", (OUTPUT_RATE,))
    if "voice" in given:
        out = replace(out, voice=_text(given["voice"], "session.voice", 64))
    if "speed" in given:
        out = replace(out, speed=_number(given["speed"], "session.speed", 0.25, 4.0))
    if "turn_detection" in given:
        out = replace(
            out,
            turn_detection=_turn_detection(
                given["turn_detection"], "session.turn_detection", out.turn_detection
            ),
        )
    if given.get("input_audio_transcription") is not None:
        out = _transcription(
            out, given["input_audio_transcription"], "session.input_audio_transcription"
        )
    # The GA API's.
    if "audio" in given:
        audio = _object(given["audio"], "session.audio", frozenset({"input", "output"}))
        if "input" in audio:
            known = frozenset({"format", "transcription", "turn_detection", "noise_reduction"})
            inputs = _object(audio["input"], "session.audio.input", known)
            if "format" in inputs:
                rate = _format_rate(inputs["format"], "session.audio.input.format", INPUT_RATES)
                out = replace(out, input_rate=rate)
            if "turn_detection" in inputs:
                out = replace(
                    out,
                    turn_detection=_turn_detection(
                        inputs["turn_detection"],
                        "session.audio.input.turn_detection",
                        out.turn_detection,
                    ),
                )
            if inputs.get("transcription") is not None:
                out = _transcription(
                    out, inputs["transcription"], "session.audio.input.transcription"
                )
        if "output" in audio:
            known = frozenset({"format", "voice", "speed"})
            outputs = _object(audio["output"], "session.audio.output", known)
            if "format" in outputs:
                _format_rate(outputs["format"], "session.audio.output.format", (OUTPUT_RATE,))
            if "voice" in outputs:
                out = replace(out, voice=_text(outputs["voice"], "session.audio.output.voice", 64))
            if "speed" in outputs:
                out = replace(
                    out, speed=_number(outputs["speed"], "session.audio.output.speed", 0.25, 4.0)
                )
    return out


def _transcription(config: SessionConfig, value: Any, param: str) -> SessionConfig:
    given = _object(value, param, frozenset({"model", "language", "prompt"}))
    language = given.get("language")
    if language is not None and not (isinstance(language, str) and 2 <= len(language) <= 3):
        raise _refuse(
            f"{param}.language",
            f"{param}.language={language!r} is not valid: expected an ISO-639-1 code such as 'en'",
        )
    prompt = _text(given.get("prompt", ""), f"{param}.prompt", 2000)
    return replace(config, language=language, transcription_prompt=prompt)
