"""The voice agent's parts that need no platform: the session configuration and `session.update`,
the voice activity state machine (on a scripted probability), and what an interrupted answer
keeps."""

from __future__ import annotations

from typing import Any

import pytest

import kiln
from kiln.catalog.realtime.events import RealtimeError, SessionConfig, TurnDetection, updated
from kiln.catalog.realtime.response import Response, Spoken, Turn
from kiln.catalog.realtime.vad import SpeechDetector
from kiln.catalog.voice import PARTS, parts_of
from kiln.errors import InvalidSpec

WINDOW = b"\x00\x00" * 512  # 32 ms at 16 kHz


def test_session_update_reads_the_ga_and_the_beta_shapes() -> None:
    ga = updated(SessionConfig(), {
        "type": "realtime", "instructions": "Be kind.", "max_output_tokens": 50,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16_000},
                      "turn_detection": {"type": "server_vad", "silence_duration_ms": 300},
                      "transcription": {"model": "whisper", "language": "fr"}},
            "output": {"format": {"type": "audio/pcm", "rate": 24_000}, "voice": "nova",
                       "speed": 1.5},
        },
    })  # fmt: skip
    assert (ga.instructions, ga.max_output_tokens, ga.input_rate) == ("Be kind.", 50, 16_000)
    assert ga.turn_detection == TurnDetection(silence_duration_ms=300)
    assert (ga.language, ga.voice, ga.speed) == ("fr", "nova", 1.5)
    beta = updated(ga, {"input_audio_format": "pcm16", "voice": "echo", "turn_detection": None,
                        "max_response_output_tokens": "inf"})  # fmt: skip
    assert (beta.input_rate, beta.voice, beta.turn_detection, beta.max_output_tokens) == (
        24_000, "echo", None, None,
    )  # fmt: skip
    shown = beta.to_wire("sess_1", "voice")
    assert shown["audio"]["input"]["turn_detection"] is None
    assert shown["max_output_tokens"] == "inf"


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ("text", "invalid_value", "session"),
        ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "invalid_value",
         "session.audio.input.format.type"),
        ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16_000}}}},
         "invalid_value", "session.audio.output.format.rate"),
        ({"turn_detection": {"type": "semantic_vad"}}, "invalid_value",
         "session.turn_detection.type"),
        ({"turn_detection": {"threshold": 2}}, "invalid_value", "session.turn_detection.threshold"),
        ({"audio": {"input": {"turn_detection": {"silence_ms": 1}}}}, "unknown_parameter",
         "session.audio.input.turn_detection.silence_ms"),
        ({"tools": [{"type": "function"}]}, "invalid_value", "session.tools"),
        ({"output_modalities": ["text"]}, "invalid_value", "session.output_modalities"),
        ({"speed": 9}, "invalid_value", "session.speed"),
    ],
)  # fmt: skip
def test_session_update_refuses_by_name_and_changes_nothing(
    session: Any, code: str, param: str
) -> None:
    config = SessionConfig()
    with pytest.raises(RealtimeError) as refused:
        updated(config, session)
    assert (refused.value.code, refused.value.param) == (code, param)
    assert config == SessionConfig()


def scripted(probabilities: list[float], config: TurnDetection) -> list[tuple[str, int]]:
    script = iter(probabilities)
    detector = SpeechDetector(lambda _samples: next(script), config)
    events = detector.push(WINDOW * len(probabilities))
    return [(event.kind, event.at_ms) for event in events]


def test_speech_starts_at_the_threshold_and_stops_after_the_silence() -> None:
    config = TurnDetection(threshold=0.5, silence_duration_ms=96)
    # Windows of 32 ms: speech from window 2; a dip under 0.35 for 2 windows does not end it;
    # 3 windows (96 ms) from window 8 do.
    probabilities = [0.1, 0.2, 0.9, 0.8, 0.4, 0.3, 0.3, 0.9, 0.1, 0.1, 0.1, 0.2]
    assert scripted(probabilities, config) == [("started", 64), ("stopped", 256)]


def test_a_detector_reads_any_piece_sizes_and_ends_a_turn_on_demand() -> None:
    seen: list[int] = []

    def probability(samples: Any) -> float:
        seen.append(len(samples))
        return 0.9

    detector = SpeechDetector(probability, TurnDetection())
    assert detector.push(WINDOW[:100]) == []
    events = detector.push(WINDOW[100:] + WINDOW[:10])
    assert [e.kind for e in events] == ["started"]
    assert seen == [512]
    end = detector.end_turn()
    assert end is not None
    assert (end.kind, end.at_ms) == ("stopped", 32)
    assert detector.end_turn() is None


def answer(spoken: list[Spoken]) -> Response:
    async def send(event: dict[str, Any]) -> None:
        raise AssertionError("not sent")

    response = Response(
        turn=Turn(began=0.0), messages=(), voice=None, speed=1.0, max_tokens=None, chat=None,
        tts=None, send=send,
    )  # fmt: skip
    response.spoken = spoken
    response.sent_ms = spoken[-1].end_ms if spoken else 0.0
    return response


def test_an_interrupted_answer_keeps_the_words_that_were_played() -> None:
    response = answer([
        Spoken("Hello there.", 0, 1000), Spoken("It is a fine day for a walk.", 1000, 3000),
        Spoken("Shall we?", 3000, 4000),
    ])  # fmt: skip
    assert response.kept(400) == ""  # not one whole word's share of the phrase yet
    assert response.kept(500) == "Hello"
    assert response.kept(1000) == "Hello there."
    assert response.kept(2000) == "Hello there. It is a fine"
    assert response.kept(4000) == response.transcript
    response.turn.first_audio = 10.0
    assert response.played_ms(11.5) == 1500
    assert response.played_ms(20.0) == 4000  # never more than was sent
    assert answer([]).played_ms(5.0) == 0


def test_the_voice_agents_parts_default_to_the_catalogs_models() -> None:
    assert parts_of("") == PARTS
    assert parts_of("chat=/models/chat, tts=/models/tts") == {
        **PARTS, "chat": "/models/chat", "tts": "/models/tts",
    }  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"write its parts as 'stt=ID,chat=ID,tts=ID'"):
        parts_of("llm=/models/x")


def test_a_realtime_handler_is_a_websocket_with_a_task() -> None:
    with pytest.raises(
        kiln.errors.InvalidSpec, match=r"^task='chat' is not valid for @kiln\.websocket"
    ):
        kiln.websocket(task="chat")  # type: ignore[call-overload]
    with pytest.raises(
        kiln.errors.InvalidSpec, match=r"^task='realtime' is not valid for @kiln\.method"
    ):
        kiln.method(task="realtime")  # type: ignore[call-overload]
