"""The parts of the speech routes that need no platform: phrases, pauses, decoding and encoding,
captions, and the checks of the routes' bodies."""

from __future__ import annotations

import io
import math

import pytest

from kiln.catalog._pauses import speech_pieces
from kiln.catalog._phrases import PhraseSplitter, phrases
from kiln.errors import InvalidArguments, InvalidRequest
from kiln.functions.audio import read_wav, wav_header
from kiln.functions.tasks import (
    Audio,
    Segment,
    SpeechRequest,
    Task,
    Transcription,
    TranscriptionRequest,
    request_from_wire,
    to_wire,
    transcription_from_wire,
)
from kiln.router.openai.audio import _captions
from kiln.router.openai.audio_requests import speech_call, transcription_call

np = pytest.importorskip("numpy")
av = pytest.importorskip("av")


def tone(seconds: float, rate: int, *, hz: float = 440.0, level: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * math.pi * hz * t) * level * 32767).astype("<i2")
    return bytes(samples.tobytes())


def wav(pcm: bytes, rate: int) -> bytes:
    return wav_header(rate, samples=len(pcm) // 2) + pcm


# Phrases -----------------------------------------------------------------------------------------


def test_text_is_cut_at_sentence_ends_and_late_commas() -> None:
    assert phrases("Hello there. How are you? Fine!") == ["Hello there.", "How are you?", "Fine!"]
    # The first phrase may end at an early comma; later ones need `soft_chars` first.
    assert phrases("Well, I think, on the whole, it works.") == [
        "Well, I think,", "on the whole, it works.",
    ]  # fmt: skip
    assert phrases("3.14 is pi") == ["3.14 is pi"]  # no space after the point: no end


def test_phrases_come_out_as_soon_as_a_delta_completes_them() -> None:
    splitter = PhraseSplitter()
    assert splitter.feed("Hel") == []
    assert splitter.feed("lo. Wor") == ["Hello."]
    assert splitter.feed("ld") == []
    assert splitter.flush() == ["World"]
    long = PhraseSplitter(hard_chars=20)
    assert long.feed("one two three four five six seven") == ["one two three four"]


# Pauses ------------------------------------------------------------------------------------------


def test_speech_is_cut_at_pauses_and_its_silence_left_out() -> None:
    rate = 16_000
    silence = b"\x00\x00" * rate
    pcm = silence + tone(1.0, rate) + silence + tone(0.5, rate) + silence
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    pieces = speech_pieces(samples, rate, pause_s=0.3)
    assert [(round(a / rate, 2), round(b / rate, 2)) for a, b in pieces] == [
        (0.9, 2.1), (2.9, 3.6),
    ]  # fmt: skip
    assert speech_pieces(np.zeros(rate, dtype=np.float32), rate) == []


def test_a_long_stretch_without_pauses_is_cut_within_the_limit() -> None:
    rate = 16_000
    samples = np.frombuffer(tone(70, rate), dtype="<i2").astype(np.float32) / 32768
    pieces = speech_pieces(samples, rate)
    assert len(pieces) == 3
    assert all(b - a <= 30 * rate for a, b in pieces)
    assert pieces[0][0] == 0
    assert pieces[-1][1] == len(samples)


# Decoding and encoding ---------------------------------------------------------------------------


def test_uploads_are_decoded_to_the_models_rate() -> None:
    from kiln.functions.audio_codec import decode

    pcm = decode(wav(tone(1.0, 22_050), 22_050), sample_rate=16_000)
    assert pcm.sample_rate == 16_000
    assert abs(pcm.samples - 16_000) < 40
    with pytest.raises(InvalidArguments, match=r"^file 'x.mp3' is not audio this server can read"):
        decode(b"ID3 nonsense" * 10, sample_rate=16_000, filename="x.mp3")
    with pytest.raises(InvalidArguments, match=r"^file 'x.wav' could not be read: not a WAV"):
        decode(b"RIFF\x00\x00\x00\x00WAVEjunk", sample_rate=16_000, filename="x.wav")


@pytest.mark.parametrize(
    ("response_format", "magic"),
    [("wav", b"RIFF"), ("mp3", None), ("opus", b"OggS"), ("aac", b"\xff\xf1"), ("flac", b"fLaC")],
)
def test_speech_is_encoded_piece_by_piece(response_format: str, magic: bytes | None) -> None:
    from kiln.functions.audio_codec import encoded_speech

    pieces = [Audio(pcm=tone(0.5, 16_000, hz=220 * (i + 1)), sample_rate=16_000) for i in range(3)]
    out = list(encoded_speech(iter(pieces), response_format))
    assert len(out) >= 3  # not all at the end
    data = b"".join(out)
    if magic is not None:
        assert data.startswith(magic)
    with av.open(io.BytesIO(data)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
        rate = container.streams.audio[0].rate
    assert abs(samples / rate - 1.5) < 0.1


def test_pcm_is_24khz_and_a_change_of_rate_midway_is_refused() -> None:
    from kiln.functions.audio_codec import SpeechEncoder

    encoder = SpeechEncoder("pcm")
    pcm = encoder.feed(Audio(pcm=tone(1.0, 16_000), sample_rate=16_000)) + encoder.finish()
    assert abs(len(pcm) / 2 - 24_000) < 40
    with pytest.raises(InvalidArguments, match="changed its sample rate mid-stream"):
        encoder.feed(Audio(pcm=b"\x00\x00", sample_rate=22_050))
    wav_only = SpeechEncoder("wav")
    assert read_wav(wav_only.finish()).samples == 0  # an empty answer is still a WAV file


# The routes' bodies -------------------------------------------------------------------------------


def test_a_transcription_form_is_checked_field_by_field() -> None:
    call = transcription_call(
        {"model": "m", "language": "en", "response_format": "srt", "temperature": "0.2",
         "timestamp_granularities": "segment"}, b"RIFF", "a.wav",
    )  # fmt: skip
    assert call.response_format == "srt"
    assert call.request.temperature == 0.2
    assert call.request.language == "en"
    with pytest.raises(InvalidRequest, match=r"^file is empty"):
        transcription_call({"model": "m"}, b"", "a.wav")
    with pytest.raises(InvalidRequest, match=r"^temperature='hot' is not valid"):
        transcription_call({"model": "m", "temperature": "hot"}, b"x", "a.wav")
    with pytest.raises(InvalidRequest, match=r"^stream is not supported for transcriptions"):
        transcription_call({"model": "m", "stream": "true"}, b"x", "a.wav")


def test_a_speech_body_is_checked_field_by_field() -> None:
    call = speech_call({"model": "m", "input": "hi", "voice": {"id": "v1"}, "speed": 2})
    assert (call.request.voice, call.request.speed, call.request.response_format) == (
        "v1", 2.0, "mp3",
    )  # fmt: skip
    assert speech_call({"model": "m", "input": "hi", "stream_format": "sse"}).sse
    with pytest.raises(InvalidRequest, match=r"^voice='' is not valid"):
        speech_call({"model": "m", "input": "hi", "voice": ""})


def test_speech_and_transcription_requests_cross_the_wire() -> None:
    speech = SpeechRequest(model="m", input="hi", voice="nova", response_format="wav")
    assert request_from_wire(Task.SPEECH, to_wire(speech)) == speech
    upload = TranscriptionRequest(model="m", file=b"\x00\xffbytes", filename="a.wav")
    assert request_from_wire(Task.TRANSCRIPTION, to_wire(upload)) == upload
    said = Transcription(
        text="a b", language="en", duration_s=2.0,
        segments=(Segment(start=0.0, end=1.0, text="a"), Segment(start=1.5, end=2.0, text="b")),
    )  # fmt: skip
    assert transcription_from_wire(said.to_wire()) == said
    assert transcription_from_wire("plain") == Transcription(text="plain")


def test_captions_in_srt_and_webvtt() -> None:
    segments = [
        Segment(start=0.0, end=1.5, text="one"),
        Segment(start=61.25, end=3725.5, text="two"),
    ]
    assert _captions(segments, srt=True) == (
        "1\n00:00:00,000 --> 00:00:01,500\none\n\n2\n00:01:01,250 --> 01:02:05,500\ntwo\n"
    )
    assert _captions(segments, srt=False) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\none\n\n00:01:01.250 --> 01:02:05.500\ntwo\n"
    )
