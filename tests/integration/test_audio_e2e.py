"""Speech on the real, sandboxed stack (issue 24), met through OpenAI's own client: catalog
deployments of a small local Whisper (`stt`) and VITS voice (`tts`); real speech from espeak-ng
transcribed in every response format, with segment times that follow the pauses; speech
streamed phrase by phrase in every format; each refusal in OpenAI's error shape.

With random weights the words are nonsense; what is checked is everything around them."""

from __future__ import annotations

import array
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from stack import Platform

from kiln.catalog.tiny import WHISPER_NEW_TOKENS, tiny_speech_model, tiny_whisper_model
from kiln.functions.audio import Pcm, read_wav, wav_header
from kiln.settings import Settings

pytestmark = [pytest.mark.integration]


def espeak(text: str, path: Path) -> Path:
    """`text` spoken by espeak-ng, as a WAV file (22,050 Hz, 16-bit mono)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def spoken(text: str, path: Path) -> Pcm:
    """`text` spoken, without the silence espeak-ng leaves at either end."""
    pcm = read_wav(espeak(text, path).read_bytes())
    samples = array.array("h", pcm.data)
    loud = [i for i, sample in enumerate(samples) if abs(sample) > 300]
    return Pcm(samples[loud[0] : loud[-1] + 1].tobytes(), pcm.sample_rate)


def two_sentences_with_a_pause(top: Path) -> tuple[bytes, float, float]:
    """Two spoken sentences with 1.5 s of silence between them, as a WAV file; the time the
    first one ends and the second starts."""
    first = spoken("The weather is fine today.", top / "a.wav")
    second = spoken("Tomorrow it will rain.", top / "b.wav")
    rate = first.sample_rate
    silence = b"\x00\x00" * int(rate * 1.5)
    data = first.data + silence + second.data
    return (
        wav_header(rate, samples=len(data) // 2) + data,
        first.duration_s,
        first.duration_s + len(silence) / 2 / rate,
    )


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kiln-models-") as name:
        top = Path(name)
        tiny_whisper_model(top / "stt")
        tiny_speech_model(top / "tts")
        top.chmod(0o755)
        yield top


@pytest.fixture(scope="module")
def settings(settings: Settings, models: Path) -> Settings:
    return settings.replace(sandbox_share=(models,))


@pytest.fixture(scope="module")
async def deployed(platform: Platform, models: Path) -> dict[str, Any]:
    made = {}
    async with platform.client() as client:
        for slug, name in (("stt", "tiny-stt"), ("tts", "tiny-tts")):
            response = await client.post(
                "/v1/deployments",
                json={"catalog": slug, "name": name, "model": str(models / slug), "gpu": "none"},
            )
            assert response.status_code == 201, response.text
            made[slug] = response.json()
    return made


@pytest.fixture
async def oai(platform: Platform, deployed: dict[str, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=deployed["stt"]["base_url"], api_key=platform.key, max_retries=0, timeout=120
    ) as client:
        yield client


async def test_a_recording_is_transcribed_in_segments_that_follow_its_pauses(
    oai: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    audio, first_ends, second_starts = two_sentences_with_a_pause(tmp_path)
    verbose = await oai.audio.transcriptions.create(
        model="tiny-stt", file=("speech.wav", audio), response_format="verbose_json",
        language="en", timestamp_granularities=["segment"],
    )  # fmt: skip
    assert verbose.duration == pytest.approx(read_wav(audio).duration_s, abs=0.01)
    assert verbose.language == "en"
    segments = verbose.segments or []
    assert len(segments) == 2
    assert segments[0].start < 0.3
    # Each segment's ends sit in the silence, within the 100 ms kept around speech (and a
    # 20 ms frame), at most 100 ms into the speech where a word ends quietly.
    assert first_ends - 0.1 <= segments[0].end <= first_ends + 0.15
    assert second_starts - 0.15 <= segments[1].start <= second_starts + 0.1
    assert segments[1].end <= verbose.duration
    assert [len(s.text) for s in segments] == [WHISPER_NEW_TOKENS] * 2
    assert verbose.text == f"{segments[0].text} {segments[1].text}"

    plain = await oai.audio.transcriptions.create(model="tiny-stt", file=("a.wav", audio))
    assert plain.text == verbose.text  # greedy: the same words every time
    text = await oai.audio.transcriptions.create(
        model="tiny-stt", file=("a.wav", audio), response_format="text"
    )
    assert text == verbose.text + "\n"
    srt = await oai.audio.transcriptions.create(
        model="tiny-stt", file=("a.wav", audio), response_format="srt"
    )
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)\n", srt)
    assert [(c[0], c[3]) for c in cues] == [("1", segments[0].text), ("2", segments[1].text)]
    start = round(segments[1].start * 1000)
    assert cues[1][1] == f"00:00:{start // 1000:02d},{start % 1000:03d}"
    vtt = await oai.audio.transcriptions.create(
        model="tiny-stt", file=("a.wav", audio), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n00:00:00.")
    assert vtt.count(" --> ") == 2


async def test_speech_streams_phrase_by_phrase_in_every_format(
    oai: openai.AsyncOpenAI, platform: Platform, deployed: dict[str, Any]
) -> None:
    said = "Hello there. This is the second sentence! And a third one, to finish."
    async with oai.audio.speech.with_streaming_response.create(
        model="tiny-tts", voice="alloy", input=said, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        wav = await response.read()
    assert wav[:16] == b"RIFF\xff\xff\xff\xffWAVEfmt "  # a stream: its length unknown at first
    speech = read_wav(wav)
    assert speech.sample_rate == 24_000
    assert speech.duration_s > 0.5

    pcm = await (
        await oai.audio.speech.create(
            model="tiny-tts", voice="alloy", input=said, response_format="pcm"
        )
    ).aread()
    # The voice is random: the same text says the same thing only in length, near enough.
    assert abs(len(pcm) / 48_000 - speech.duration_s) < 0.5 * speech.duration_s

    mp3 = await (
        await oai.audio.speech.create(model="tiny-tts", voice="nova", input=said)  # mp3: default
    ).aread()
    assert mp3[:3] == b"ID3" or mp3[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
    opus = await (
        await oai.audio.speech.create(
            model="tiny-tts", voice="echo", input=said, response_format="opus"
        )
    ).aread()
    assert opus[:4] == b"OggS"

    # As events: a delta per phrase (at least), then done.
    async with (
        platform.client() as client,
        client.stream(
            "POST", "/v1/audio/speech",
            json={"model": "tiny-tts", "input": said, "response_format": "pcm",
                  "stream_format": "sse"},
        ) as events,
    ):  # fmt: skip
        assert events.headers["content-type"].startswith("text/event-stream")
        kinds = [
            line.split('"type":"')[1].split('"')[0]
            async for line in events.aiter_lines()
            if line.startswith("data: ")
        ]
    assert kinds[-1] == "speech.audio.done"
    assert kinds.count("speech.audio.delta") >= 3


async def test_speech_becomes_text_again_in_mp3(oai: openai.AsyncOpenAI) -> None:
    mp3 = await (
        await oai.audio.speech.create(model="tiny-tts", voice="alloy", input="One. Two.")
    ).aread()
    heard = await oai.audio.transcriptions.create(
        model="tiny-stt", file=("speech.mp3", mp3), response_format="verbose_json"
    )
    assert heard.duration > 0.2
    assert heard.text
    assert heard.language in ("en", "fr")  # detected: the request named none


def refused(response: Any) -> tuple[int, str | None, str]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return response.status_code, error["param"], error["message"]


@pytest.mark.parametrize(
    ("fields", "file", "status", "param", "words"),
    [
        ({"model": "tiny-stt"}, None, 400, "file", "file is required"),
        ({"model": "tiny-stt"}, b"not audio at all", 400, "file",
         "file 'x.wav' is not audio this server can read"),
        ({"model": "tiny-stt", "response_format": "xml"}, b"RIFF", 400, "response_format",
         "expected one of json, text, srt, verbose_json, vtt"),
        ({"model": "tiny-stt", "timestamp_granularities[]": "word"}, b"RIFF", 400,
         "timestamp_granularities", "deployments give segment times only"),
        ({"model": "tiny-stt", "language": "klingon"}, b"RIFF", 400, "language",
         "expected an ISO-639-1 code"),
        ({"model": "tiny-tts"}, b"RIFF", 400, "model",
         "model 'tiny-tts' serves speech, not transcription; call it at /v1/audio/speech"),
    ],
)  # fmt: skip
async def test_bad_transcriptions_are_refused_in_openais_shape(
    platform: Platform,
    deployed: dict[str, Any],
    tmp_path: Path,
    fields: dict[str, str],
    file: bytes | None,
    status: int,
    param: str,
    words: str,
) -> None:
    files = None if file is None else {"file": ("x.wav", file)}
    async with platform.client() as client:
        response = await client.post(
            "/v1/audio/transcriptions", data=fields, files=files or {"other": ("o", b"")}
        )
    assert refused(response)[:2] == (status, param), response.text
    assert words in refused(response)[2]


async def test_a_language_the_model_lacks_is_named(
    platform: Platform, deployed: dict[str, Any], tmp_path: Path
) -> None:
    audio = espeak("Bonjour.", tmp_path / "fr.wav").read_bytes()
    async with platform.client() as client:
        response = await client.post(
            "/v1/audio/transcriptions",
            data={"model": "tiny-stt", "language": "de"},
            files={"file": ("fr.wav", audio)},
        )
    assert refused(response) == (
        400, "language", "language='de' is not one this model knows; it knows en, fr",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "input is required"),
        ({"input": "x" * 4097}, "input", "the limit is 4096"),
        ({"input": "hi", "speed": 5}, "speed", "expected a number from 0.25 to 4"),
        ({"input": "hi", "response_format": "ogg"}, "response_format",
         "expected one of mp3, opus, aac, flac, wav, pcm"),
        ({"input": "hi", "voice": "robot"}, "voice",
         "voice='robot' is not a voice of this model; its voices are alloy, ash"),
        ({"input": "hi", "loudness": 11}, "loudness", "Unrecognized request argument"),
    ],
)  # fmt: skip
async def test_bad_speech_requests_are_refused_in_openais_shape(
    platform: Platform, deployed: dict[str, Any], body: dict[str, Any], param: str, words: str
) -> None:
    async with platform.client() as client:
        response = await client.post("/v1/audio/speech", json={"model": "tiny-tts", **body})
    status, found_param, message = refused(response)
    assert (status, found_param) == (400, param), message
    assert words in message
