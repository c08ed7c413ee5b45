"""PCM16 audio as the speech routes and real-time sessions move it: streamed WAV headers that
players and Python's `wave` read, WAV uploads of every integer width and channel count turned
into PCM16 mono, 20-40 ms frames, and pacing at real time."""

from __future__ import annotations

import io
import math
import struct
import wave

import pytest

from kiln.functions.audio import Pacer, Pcm, frames, read_wav, wav_header


def tone(rate: int, seconds: float, *, width: int = 2, channels: int = 1) -> bytes:
    """A 440 Hz WAV file of `width`-byte samples, the same signal in every channel."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        top = 2 ** (8 * width - 1) - 1
        samples = []
        for i in range(int(rate * seconds)):
            value = int(top * 0.5 * math.sin(2 * math.pi * 440 * i / rate))
            encoded = (
                bytes([value + 128]) if width == 1
                else value.to_bytes(width, "little", signed=True)
            )  # fmt: skip
            samples.append(encoded * channels)
        writer.writeframes(b"".join(samples))
    return out.getvalue()


def test_a_known_length_header_is_a_wav_file() -> None:
    pcm = b"\x01\x00\xff\x7f" * 100
    with wave.open(io.BytesIO(wav_header(24_000, samples=200) + pcm)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (
            1,
            2,
            24_000,
        )
        assert reader.readframes(200) == pcm


def test_a_streamed_header_says_its_length_is_unknown() -> None:
    header = wav_header(16_000)
    assert len(header) == 44
    riff, data = struct.unpack_from("<I", header, 4)[0], struct.unpack_from("<I", header, 40)[0]
    assert riff == data == 0xFFFFFFFF
    with pytest.raises(ValueError, match="sample_rate=0 is not a rate a WAV file can hold"):
        wav_header(0)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_uploads_of_any_integer_width_become_pcm16_mono(width: int, channels: int) -> None:
    pcm = read_wav(tone(16_000, 0.05, width=width, channels=channels))
    assert pcm.sample_rate == 16_000
    assert pcm.samples == 800
    reference = read_wav(tone(16_000, 0.05))
    mine = struct.unpack(f"<{pcm.samples}h", pcm.data)
    theirs = struct.unpack(f"<{reference.samples}h", reference.data)
    # The same tone whatever the width: within two steps of 8-bit precision.
    assert max(abs(a - b) for a, b in zip(mine, theirs, strict=True)) <= 512


def test_what_is_not_a_wav_file_is_named() -> None:
    with pytest.raises(ValueError, match="not a WAV file with integer PCM samples"):
        read_wav(b"ID3\x03 an mp3 file")


def test_frames_are_20_to_40_ms() -> None:
    pcm = Pcm(bytes(2 * 24_000), 24_000)  # one second
    cut = list(frames(pcm, 20))
    assert len(cut) == 50
    assert {len(f) for f in cut} == {960}
    assert len(list(frames(pcm, 40))) == 25
    with pytest.raises(ValueError, match="frame_ms=10: frames are 20 to 40 ms"):
        list(frames(pcm, 10))


def test_the_pacer_keeps_a_small_lead_over_real_time() -> None:
    now = [100.0]
    pacer = Pacer(24_000, lead_s=0.1, clock=lambda: now[0])
    assert pacer.wait_s() == 0.0
    pacer.sending(bytes(48_000))  # one second of audio at once
    assert pacer.wait_s() == pytest.approx(0.9)
    now[0] += 0.5
    assert pacer.wait_s() == pytest.approx(0.4)
    now[0] += 1.0  # played past what was sent: no wait
    assert pacer.wait_s() == 0.0
    pacer.restart()
    assert pacer.sent == 0
    assert pacer.wait_s() == 0.0
