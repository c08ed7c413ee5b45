"""The voice agent over `WS /v1/realtime` on the real, sandboxed stack (issue 24): the catalog's
`voice-agent` built from small local models (Whisper, the chat model, a VITS voice) with
Silero's real voice activity model; espeak-ng's speech streamed in 20 ms frames.

With random weights the words are nonsense; what is checked is the protocol around them: the
events and their order, the timing fields, audio frames of 40 ms paced to real time, barge-in
(nothing sent after speech starts, the answer truncated to what was played), the client's own
truncation, refusals as `error` events that keep the session, idle sessions closed, and the
turns' timings in Prometheus and the invocation log."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from eventually import eventually
from stack import Platform
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from kiln.catalog.tiny import tiny_chat_model, tiny_speech_model, tiny_whisper_model
from kiln.functions.audio import Pacer, Pcm, frames, read_wav, wav_header
from kiln.functions.audio_codec import decode
from kiln.settings import Settings

pytestmark = [pytest.mark.integration]

QUICK = """
import kiln
from kiln.catalog.voice import VoiceAgent

app = kiln.App("quick-voice")


@app.cls(concurrency=2)
class Quick(VoiceAgent):
    model_id = {parts!r}
    idle_timeout_s = 1.0
"""


TWO_SECONDS = base64.b64encode(b"\x00" * 96_000).decode()  # of 24 kHz PCM16


def speech(text: str, rate: int) -> bytes:
    """`text` spoken by espeak-ng, as PCM16 mono at `rate`, with 0.7 s of silence after it."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    return decode(wav, sample_rate=rate).data + b"\x00\x00" * int(rate * 0.7)


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kiln-models-") as name:
        top = Path(name)
        tiny_chat_model(top / "chat")
        tiny_whisper_model(top / "stt")
        tiny_speech_model(top / "tts")
        top.chmod(0o755)
        yield top


@pytest.fixture(scope="module")
def settings(settings: Settings, models: Path) -> Settings:
    return settings.replace(sandbox_share=(models,))


def parts(models: Path) -> str:
    return ",".join(f"{part}={models / part}" for part in ("stt", "chat", "tts"))


@pytest.fixture(scope="module")
async def deployed(platform: Platform, models: Path) -> dict[str, Any]:
    async with platform.client() as client:
        made = await client.post(
            "/v1/deployments",
            json={"catalog": "voice-agent", "name": "voice", "model": parts(models), "gpu": "none"},
        )
    assert made.status_code == 201, made.text
    await platform.deploy_source(models, "quick.py", QUICK.format(parts=parts(models)))
    result: dict[str, Any] = made.json()
    return result


class Call:
    """A client of the realtime protocol: every event received, with when it arrived."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.seen = 0  # events already returned by `next`

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": kind, **fields}))

    async def speak(self, pcm: bytes, rate: int) -> None:
        """`pcm` as 20 ms appends, as a microphone sends them: at the pace it records them
        (paced by the platform's own `Pacer`, as the server paces its answers)."""
        microphone = Pacer(rate, lead_s=0.0)
        for frame in frames_of(pcm, rate):
            if (wait := microphone.wait_s()) > 0:
                await asyncio.sleep(wait)
            await self.send("input_audio_buffer.append", audio=base64.b64encode(frame).decode())
            microphone.sending(frame)

    async def next(self, kind: str, within_s: float = 60) -> dict[str, Any]:
        """The next event of `kind` after those already returned (reading on as needed)."""
        deadline = time.monotonic() + within_s
        while True:
            for index in range(self.seen, len(self.events)):
                if self.events[index][1]["type"] == kind:
                    self.seen = index + 1
                    return self.events[index][1]
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(self.ws.recv(), max(0.0, left))
            except TimeoutError:
                raise AssertionError(f"no {kind} in {self.kinds()}") from None
            self.events.append((time.monotonic(), json.loads(message)))

    def kinds(self) -> list[str]:
        return [event["type"] for _, event in self.events]


def wav_of(pcm: bytes, rate: int) -> bytes:
    return wav_header(rate, samples=len(pcm) // 2) + pcm


def frames_of(pcm: bytes, rate: int) -> Iterator[bytes]:

    return frames(Pcm(pcm, rate), 20)


def url(platform: Platform, model: str) -> str:
    return platform.url.replace("http://", "ws://") + f"/v1/realtime?model={model}"


@pytest.fixture
async def call(platform: Platform, deployed: dict[str, Any]) -> AsyncIterator[Call]:
    async with connect(
        url(platform, "voice"),
        additional_headers={"Authorization": f"Bearer {platform.key}"},
        open_timeout=120,
        max_size=None,
    ) as ws:
        talk = Call(ws)
        created = await talk.next("session.created", within_s=120)
        assert created["session"]["audio"]["output"]["format"] == {
            "type": "audio/pcm",
            "rate": 24_000,
        }
        yield talk


async def test_a_spoken_turn_is_transcribed_and_answered_in_paced_frames(call: Call) -> None:
    await call.send(
        "session.update",
        session={"max_output_tokens": 30,
                 "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16_000},
                                     "turn_detection": {"type": "server_vad",
                                                        "silence_duration_ms": 400}}}},
    )  # fmt: skip
    updated = await call.next("session.updated")
    assert updated["session"]["audio"]["input"]["format"]["rate"] == 16_000
    assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400
    pcm = speech("Hello, could you tell me the time please?", 16_000)
    await call.speak(pcm, 16_000)

    started = await call.next("input_audio_buffer.speech_started")
    stopped = await call.next("input_audio_buffer.speech_stopped")
    spoken_ms = (len(pcm) / 32) - 700  # without the silence after it
    assert started["audio_start_ms"] < 300
    assert abs(stopped["audio_end_ms"] - spoken_ms) < 300
    assert stopped["item_id"] == started["item_id"]
    committed = await call.next("input_audio_buffer.committed")
    assert committed["item_id"] == started["item_id"]
    final = await call.next("conversation.item.input_audio_transcription.completed")
    assert final["item_id"] == started["item_id"]
    assert final["transcript"]
    created = await call.next("response.created")
    done = await call.next("response.done")

    kinds = call.kinds()
    # A partial transcript came while the user was still speaking.
    assert kinds.index("conversation.item.input_audio_transcription.delta") < kinds.index(
        "input_audio_buffer.speech_stopped"
    )
    order = [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
        "response.created", "response.output_item.added",
        "response.output_audio_transcript.delta", "response.output_audio.delta",
        "response.output_audio.done", "response.output_audio_transcript.done",
        "response.output_item.done", "response.done",
    ]  # fmt: skip
    assert [kinds.index(kind) for kind in order] == sorted(kinds.index(kind) for kind in order)
    assert done["response"]["id"] == created["response"]["id"]
    assert done["response"]["status"] == "completed"
    turn = done["kiln"]["turn"]
    assert turn["audio_end_ms"] == stopped["audio_end_ms"]
    assert 0 <= turn["transcript_ms"] <= turn["first_token_ms"] <= turn["first_audio_ms"]
    assert turn["barge_in"] is False

    # 40 ms frames of 24 kHz PCM16, sent no faster than they play (with 100 ms of lead).
    audio = [(at, base64.b64decode(e["delta"])) for at, e in call.events
             if e["type"] == "response.output_audio.delta"]  # fmt: skip
    assert all(len(frame) <= 1920 and len(frame) % 2 == 0 for _, frame in audio)
    assert sum(len(frame) == 1920 for _, frame in audio) >= len(audio) - 4
    # Flooded, the frames would all arrive within milliseconds; paced, they take about as long
    # as they play (less the lead, and less the reading delays of this busy event loop).
    seconds = sum(len(frame) for _, frame in audio) / 48_000
    assert seconds > 1.0
    assert audio[-1][0] - audio[0][0] >= seconds - 0.1 - 0.5, "audio arrived faster than it plays"
    transcript = "".join(
        e["delta"] for _, e in call.events if e["type"] == "response.output_audio_transcript.delta"
    )
    said = next(e for _, e in call.events if e["type"] == "response.output_audio_transcript.done")
    assert said["transcript"] == transcript


async def test_speaking_over_the_answer_stops_it_and_keeps_what_was_played(call: Call) -> None:
    await call.send("session.update", session={"input_audio_format": "pcm16"})  # beta: 24 kHz
    await call.next("session.updated")
    await call.send("session.update", session={"max_output_tokens": 60})
    await call.next("session.updated")
    await call.speak(speech("Tell me a long story about the sea.", 24_000), 24_000)
    first_audio = await call.next("response.output_audio.delta", within_s=90)
    response_id = first_audio["response_id"]
    await call.send("session.update", session={"max_output_tokens": 12})  # the next answer
    await call.speak(speech("Stop, stop.", 24_000), 24_000)

    await call.next("input_audio_buffer.speech_started")
    cleared = await call.next("output_audio_buffer.cleared")
    truncated = await call.next("conversation.item.truncated")
    done = await call.next("response.done")
    assert cleared["response_id"] == response_id
    assert done["response"]["id"] == response_id
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert done["kiln"]["turn"]["barge_in"] is True
    kinds = call.kinds()
    barged = kinds.index(
        "input_audio_buffer.speech_started", kinds.index("response.output_audio.delta")
    )
    late = [
        e for _, e in call.events[barged:]
        if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
    ]  # fmt: skip
    assert late == [], "audio of the interrupted answer was sent after speech started"
    sent_ms = sum(
        len(base64.b64decode(e["delta"])) / 48
        for _, e in call.events
        if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id
    )
    assert 0 <= truncated["audio_end_ms"] <= sent_ms + 1
    transcript = "".join(
        e["delta"] for _, e in call.events
        if e["type"] == "response.output_audio_transcript.delta" and e["response_id"] == response_id
    )  # fmt: skip
    kept = next(
        e for _, e in call.events
        if e["type"] == "response.output_audio_transcript.done" and e["response_id"] == response_id
    )["transcript"]  # fmt: skip
    assert transcript.startswith(kept)
    assert len(kept) < len(transcript) or truncated["audio_end_ms"] >= sent_ms - 1

    # The interruption is a turn of its own, answered in full (and briefly).
    answered = await call.next("response.done", within_s=90)
    assert answered["response"]["status"] == "completed"

    # The client says how much it played of that answer; a time past its end is refused.
    item_id = answered["response"]["output"][0]["id"]
    await call.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=40)
    assert (await call.next("conversation.item.truncated"))["audio_end_ms"] == 40
    await call.send("conversation.item.truncate", item_id=item_id, content_index=0,
                    audio_end_ms=10**7)  # fmt: skip
    error = (await call.next("error"))["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "audio_end_ms")
    assert "is after the end of the item's audio" in error["message"]


async def test_manual_turns_commit_create_and_cancel(call: Call) -> None:
    await call.send("session.update", session={"turn_detection": None})
    assert (await call.next("session.updated"))["session"]["audio"]["input"][
        "turn_detection"
    ] is None
    await call.send("input_audio_buffer.commit", event_id="empty")
    error = await call.next("error")
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "empty"
    await call.speak(speech("One two three.", 24_000), 24_000)
    await call.send("input_audio_buffer.commit")
    committed = await call.next("input_audio_buffer.committed")
    heard = await call.next("conversation.item.input_audio_transcription.completed")
    assert heard["item_id"] == committed["item_id"]
    assert "input_audio_buffer.speech_started" not in call.kinds()
    await call.send("response.create")
    await call.next("response.output_audio.delta", within_s=90)
    await call.send("response.create")
    busy = await call.next("error")
    assert busy["error"]["code"] == "conversation_already_has_active_response"
    await call.send("response.cancel")
    done = await call.next("response.done")
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    await call.send("response.cancel")
    assert (await call.next("error"))["error"]["code"] == "response_cancel_not_active"

    # Without server VAD the buffer holds at most 30 s: the append past it is refused.
    second = base64.b64encode(b"\x00" * 48_000).decode()
    for _ in range(31):
        await call.send("input_audio_buffer.append", audio=second)
    full = (await call.next("error"))["error"]
    assert (full["code"], full["param"]) == ("input_audio_buffer_full", "audio")
    assert "holds at most 30 s: commit or clear it" in full["message"]


@pytest.mark.parametrize(
    ("event", "code", "param", "words"),
    [
        ({"type": "conversation.item.create"}, "unknown_event", "type",
         "Invalid value: 'conversation.item.create'. Supported values are: 'session.update'"),
        ("not json", "invalid_json", None, "the event is not valid JSON"),
        (b"\x00\x01", "invalid_event", None, "binary frames are not part of the protocol"),
        ({"type": "input_audio_buffer.append", "audio": TWO_SECONDS},
         "audio_too_large", "audio", "an append holds at most 1000 ms of audio"),
        ({"type": "input_audio_buffer.append", "audio": "AAAA"}, "invalid_value", "audio",
         "audio has 3 bytes: PCM16 samples take 2 bytes each"),
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio",
         "audio is not valid base64"),
        ({"type": "session.update",
          "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44_100}}}}},
         "invalid_value", "session.audio.input.format.rate", "expected 16000 or 24000"),
        ({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}},
         "invalid_value", "session.input_audio_format", "send PCM16"),
        ({"type": "session.update", "session": {"audio": {"output": {"voice": "robot"}}}},
         "invalid_value", "session.audio.output.voice", "voice='robot' is not a voice"),
        ({"type": "session.update", "session": {"colour": "blue"}}, "unknown_parameter",
         "session.colour", "Unknown parameter: 'session.colour'."),
        ({"type": "conversation.item.truncate", "item_id": "item_x", "audio_end_ms": 0},
         "item_truncate_invalid_item_id", "item_id", "Item with item_id not found: item_x"),
    ],
)  # fmt: skip
async def test_bad_events_are_error_events_and_the_session_goes_on(
    call: Call, event: Any, code: str, param: str | None, words: str
) -> None:
    await call.ws.send(event if isinstance(event, str | bytes) else json.dumps(event))
    error = (await call.next("error"))["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert words in error["message"]
    await call.send("session.update", session={"instructions": "Be brief."})
    assert (await call.next("session.updated"))["session"]["instructions"] == "Be brief."


async def test_an_idle_session_is_told_and_closed(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    async with connect(
        url(platform, "quick-voice"),
        additional_headers={"Authorization": f"Bearer {platform.key}"},
        open_timeout=120,
    ) as ws:
        talk = Call(ws)
        await talk.next("session.created", within_s=120)
        error = (await talk.next("error", within_s=30))["error"]
        assert error["code"] == "session_idle_timeout"
        await ws.wait_closed()
    assert ws.close_code == 1000


@pytest.mark.parametrize(
    ("model", "status", "words"),
    [
        ("", 400, "model is required: open /v1/realtime?model=NAME"),
        ("nope", 404, "The model 'nope' does not exist or you do not have access to it"),
    ],
)
async def test_refusals_before_the_upgrade_are_openai_errors(
    platform: Platform, deployed: dict[str, Any], model: str, status: int, words: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            url(platform, model), additional_headers={"Authorization": f"Bearer {platform.key}"}
        ):
            pass
    response = refused.value.response
    assert response.status_code == status
    error = json.loads(response.body or b"{}")["error"]
    assert error["param"] == "model"
    assert words in error["message"]


async def test_turn_timings_reach_prometheus_and_the_invocation_log(
    platform: Platform, deployed: dict[str, Any]
) -> None:
    async with connect(
        url(platform, "voice"),
        additional_headers={"Authorization": f"Bearer {platform.key}"},
        open_timeout=120,
    ) as ws:
        talk = Call(ws)
        await talk.next("session.created", within_s=120)
        await talk.send("session.update", session={"max_output_tokens": 20})
        await talk.speak(speech("What is the weather?", 24_000), 24_000)
        done = await talk.next("response.done", within_s=90)
    turn = done["kiln"]["turn"]
    async with platform.client() as client:
        metrics = (await client.get("/metrics")).text
    assert (
        'kiln_voice_turn_seconds_count{app="voice",function="VoiceAgent",stage="first_audio"}'
        in metrics
    )
    assert 'kiln_voice_turns_total{app="voice",function="VoiceAgent",status="completed"}' in metrics

    async def logged() -> list[dict[str, Any]]:
        async with platform.client() as client:
            calls = (await client.get("/v1/functions/voice/VoiceAgent/calls")).json()["calls"]
        rows = [
            c
            for c in calls
            if c["voice_turns"] and c["voice_turns"][0]["audio_end_ms"] == turn["audio_end_ms"]
        ]
        assert rows, "not yet written"
        turns: list[dict[str, Any]] = rows[0]["voice_turns"]
        return turns

    turns = await eventually(logged, within_s=20, what="the session's row with its turns")
    assert turns[0] == {"status": "completed", **turn}


async def test_the_example_client_talks_to_the_agent_with_a_wav_file(
    platform: Platform, deployed: dict[str, Any], tmp_path: Path
) -> None:
    question = tmp_path / "question.wav"
    question.write_bytes(wav_of(speech("Is it going to rain?", 16_000), 16_000))
    env = {**os.environ, "KILN_URL": platform.url, "KILN_API_KEY": platform.key}
    client = Path(__file__).parents[2] / "examples" / "voice_client.py"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(client), "--model", "voice", str(question),
         "--out", str(tmp_path / "answer.wav"), "--max-tokens", "12"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("you said:   ")
    assert any(line.startswith("first audio ") for line in lines)
    assert any(line.startswith("agent said: ") for line in lines)
    answer = read_wav((tmp_path / "answer.wav").read_bytes())
    assert answer.sample_rate == 24_000
    assert answer.duration_s > 0.1
