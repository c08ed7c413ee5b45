"""Audio as Kiln's speech routes and real-time sessions move it: 16-bit little-endian PCM, mono,
at a stated sample rate (OpenAI's Realtime API speaks PCM16 at 24 kHz).

- `wav_header` starts a WAV stream whose length is not known yet (speech is streamed as it is
  synthesised); `read_wav` turns an uploaded WAV file into PCM16 mono, mixing channels down.
- `frames` cuts PCM into 20-40 ms frames; `Pacer` says how long to wait before sending more so
  that audio goes out at real time (plus a small lead) instead of flooding a client's buffer.

Standard library only (no `audioop`: it leaves Python in 3.13): the router, the replica and the
SDK all import it. Resampling between 16 and 24 kHz belongs to the replica, which has numpy.
"""

from __future__ import annotations

import array
import io
import struct
import sys
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["FRAME_MS", "SAMPLE_BYTES", "Pacer", "Pcm", "frames", "read_wav", "wav_header"]

SAMPLE_BYTES = 2  # PCM16
FRAME_MS = (20, 40)  # the frame lengths the real-time protocol takes, in ms
_UNKNOWN = 0xFFFFFFFF  # a RIFF size that says "until the stream ends"


@dataclass(frozen=True)
class Pcm:
    data: bytes  # 16-bit little-endian samples, mono
    sample_rate: int

    @property
    def samples(self) -> int:
        return len(self.data) // SAMPLE_BYTES

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


def wav_header(sample_rate: int, *, samples: int | None = None) -> bytes:
    """The 44-byte header of a mono PCM16 WAV file; with `samples` None, of a stream whose
    length is unknown (its sizes say 0xFFFFFFFF, as streaming servers write and players read
    to the end)."""
    if not 1 <= sample_rate <= 384_000:
        raise ValueError(f"sample_rate={sample_rate} is not a rate a WAV file can hold")
    data = _UNKNOWN if samples is None else samples * SAMPLE_BYTES
    riff = _UNKNOWN if samples is None else 36 + data
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
        sample_rate * SAMPLE_BYTES, SAMPLE_BYTES, 16, b"data", data,
    )  # fmt: skip


def read_wav(content: bytes) -> Pcm:
    """A WAV file's audio as PCM16 mono (8-, 16-, 24- and 32-bit integer PCM; channels are
    averaged); `ValueError` saying what the file is when it is not one of those."""
    try:
        with wave.open(io.BytesIO(content)) as reader:
            width, channels = reader.getsampwidth(), reader.getnchannels()
            rate, raw = reader.getframerate(), reader.readframes(reader.getnframes())
    except (wave.Error, EOFError, struct.error) as exc:
        raise ValueError(f"not a WAV file with integer PCM samples ({exc})") from None
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{8 * width}-bit samples; expected 8-, 16-, 24- or 32-bit PCM")
    samples = _to_int16(raw, width)
    if channels > 1:
        samples = array.array(
            "h",
            (
                sum(samples[i : i + channels]) // channels
                for i in range(0, len(samples) - channels + 1, channels)
            ),
        )
    return Pcm(_little_endian(samples), rate)


def _to_int16(raw: bytes, width: int) -> array.array[int]:
    """Samples of `width` bytes (WAV: 8-bit unsigned, the rest signed little-endian) as 16-bit
    signed ones, keeping the top bits."""
    if width == 1:
        return array.array("h", ((byte - 128) << 8 for byte in raw))
    if width == 2:
        samples = array.array("h", raw[: len(raw) - len(raw) % 2])
        if sys.byteorder != "little":
            samples.byteswap()
        return samples
    return array.array(
        "h",
        (
            int.from_bytes(raw[i : i + width], "little", signed=True) >> (8 * (width - 2))
            for i in range(0, len(raw) - width + 1, width)
        ),
    )


def _little_endian(samples: array.array[int]) -> bytes:
    if sys.byteorder != "little":
        samples = array.array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def frames(pcm: Pcm, frame_ms: int = 20) -> Iterator[bytes]:
    """`pcm` in frames of `frame_ms` (the last one may be shorter)."""
    if frame_ms not in range(FRAME_MS[0], FRAME_MS[1] + 1):
        raise ValueError(f"frame_ms={frame_ms}: frames are {FRAME_MS[0]} to {FRAME_MS[1]} ms")
    size = pcm.sample_rate * frame_ms // 1000 * SAMPLE_BYTES
    for start in range(0, len(pcm.data), size):
        yield pcm.data[start : start + size]


class Pacer:
    """Audio sent at real time: after `sent` bytes of PCM16 at `sample_rate`, `wait_s()` is how
    long to wait before sending more, so that the client holds at most `lead_s` of audio ahead
    of what it has played (a barge-in then discards little)."""

    def __init__(
        self,
        sample_rate: int,
        *,
        lead_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.byte_rate = sample_rate * SAMPLE_BYTES
        self.lead_s = lead_s
        self.clock = clock
        self.started = clock()
        self.sent = 0

    def wait_s(self) -> float:
        ahead = self.sent / self.byte_rate - (self.clock() - self.started)
        return max(0.0, ahead - self.lead_s)

    def sending(self, chunk: bytes) -> None:
        self.sent += len(chunk)

    def restart(self) -> None:
        """A new response (or audio dropped by a barge-in): pace from now."""
        self.started = self.clock()
        self.sent = 0
