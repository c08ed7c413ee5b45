"""Decoding, resampling and encoding audio in a replica, with PyAV (FFmpeg's libraries: mp3,
opus, aac, flac and the rest, and libswresample's resampler).

- `decode` reads an uploaded recording (WAV through the standard library, anything else
  through PyAV) as PCM16 mono at the rate a model wants.
- `Resampler` converts a stream of PCM16 mono between rates, keeping its filter's state from
  one piece to the next (no clicks at the joins of 20 ms frames).
- `SpeechEncoder` turns the `kiln.Audio` a speech method yields into the bytes of the format
  the caller asked for, as it goes: a WAV header then samples, raw samples, or a container
  whose pages are flushed as each piece is encoded, so the first bytes leave before the text
  is all spoken.

PyAV is imported when first needed and only here (the router never imports this module); a
replica without it can still take WAV at the model's rate and answer in wav or pcm at 24 kHz,
and otherwise says which package to install.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

from kiln.errors import InvalidArguments, UnserializableResult
from kiln.functions.audio import SAMPLE_BYTES, Pcm, read_wav, wav_header
from kiln.functions.tasks import SPEECH_FORMATS, SPEECH_SAMPLE_RATE, Audio

__all__ = [
    "Resampler",
    "SpeechEncoder",
    "decode",
    "encoded_speech",
    "encoded_speech_async",
    "media_type",
]

# response_format: (container, codec, MIME type); wav and pcm need no encoder.
_CONTAINERS: dict[str, tuple[str, str, str]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
}
_RAW_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
_OGG_PAGE_US = "20000"  # an Ogg page per 20 ms of audio, not per second


def media_type(response_format: str) -> str:
    """The Content-Type of speech in `response_format` (one of `SPEECH_FORMATS`)."""
    if response_format in _RAW_TYPES:
        return _RAW_TYPES[response_format]
    return _CONTAINERS[response_format][2]


def _av(purpose: str) -> Any:
    try:
        import av
    except ImportError:
        raise InvalidArguments(
            f"{purpose} needs PyAV, which this replica does not have: add `av` to the app's "
            "requirements (`pip install av`), or use WAV"
        ) from None
    return av


def decode(data: bytes, *, sample_rate: int, filename: str = "audio") -> Pcm:
    """A recording's audio as PCM16 mono at `sample_rate`; `InvalidArguments` (param "file")
    naming what could not be read."""
    if data[:4] == b"RIFF":
        try:
            pcm = read_wav(data)
        except ValueError as exc:
            raise InvalidArguments(
                f"file {filename!r} could not be read: {exc}", param="file"
            ) from None
        if pcm.sample_rate == sample_rate:
            return pcm
        resampler = Resampler(pcm.sample_rate, sample_rate)
        return Pcm(resampler.push(pcm.data) + resampler.flush(), sample_rate)
    av = _av(f"reading {filename!r} (not a WAV file)")
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    parts: list[bytes] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidArguments(f"file {filename!r} has no audio in it", param="file")
            for frame in container.decode(audio=0):
                frame.pts = None  # the resampler keeps its own time line
                parts.extend(_samples(out) for out in resampler.resample(frame))
    except av.error.FFmpegError as exc:
        raise InvalidArguments(
            f"file {filename!r} is not audio this server can read ({exc.strerror}); send WAV, "
            "mp3, m4a, ogg, opus, webm or flac",
            param="file",
        ) from None
    parts.extend(_samples(out) for out in resampler.resample(None))
    return Pcm(b"".join(parts), sample_rate)


def _samples(frame: Any) -> bytes:
    """A PCM16 mono frame's samples (packed planes can carry padding past the last sample)."""
    return bytes(frame.planes[0])[: frame.samples * SAMPLE_BYTES]


class Resampler:
    """PCM16 mono from one rate to another, piece by piece."""

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate = source_rate
        self.target_rate = target_rate
        self._av: Any = None
        self._resampler: Any = None
        if source_rate != target_rate:
            self._av = _av(f"resampling {source_rate} Hz audio to {target_rate} Hz")
            self._resampler = self._av.AudioResampler(format="s16", layout="mono", rate=target_rate)

    def push(self, pcm: bytes) -> bytes:
        if self._resampler is None or not pcm:
            return pcm
        import numpy as np

        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % SAMPLE_BYTES], dtype="<i2")
        frame = self._av.AudioFrame.from_ndarray(
            samples.reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.source_rate
        return b"".join(_samples(out) for out in self._resampler.resample(frame))

    def flush(self) -> bytes:
        """What the filter still holds, at the end of the stream."""
        if self._resampler is None:
            return b""
        return b"".join(_samples(out) for out in self._resampler.resample(None))


class _Sink(io.RawIOBase):
    """Where a muxer writes: what it wrote since the last `take`."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        taken = b"".join(self.parts)
        self.parts.clear()
        return taken


class SpeechEncoder:
    """The bytes of `response_format` for audio fed piece by piece (24 kHz mono, resampled from
    whatever rate the pieces come at)."""

    def __init__(self, response_format: str) -> None:
        if response_format not in SPEECH_FORMATS:
            raise InvalidArguments(
                f"response_format={response_format!r} is not valid: expected one of "
                f"{', '.join(SPEECH_FORMATS)}",
                param="response_format",
            )
        self.format = response_format
        self._resampler: Resampler | None = None
        self._started = False
        self._sink: _Sink | None = None
        self._container: Any = None
        self._stream: Any = None
        self._av: Any = None
        if response_format in _CONTAINERS:
            self._open(*_CONTAINERS[response_format][:2])

    def _open(self, container: str, codec: str) -> None:
        av = self._av = _av(f"speech in {self.format}")
        self._sink = _Sink()
        options = {"page_duration": _OGG_PAGE_US} if container == "ogg" else {}
        self._container = av.open(
            self._sink, mode="w", format=container, options=options,
            container_options={"flush_packets": "1"},
        )  # fmt: skip
        self._stream = self._container.add_stream(codec, rate=SPEECH_SAMPLE_RATE, layout="mono")

    def feed(self, audio: Audio) -> bytes:
        if self._resampler is None:
            self._resampler = Resampler(audio.sample_rate, SPEECH_SAMPLE_RATE)
        elif audio.sample_rate != self._resampler.source_rate:
            raise InvalidArguments(
                f"the speech method changed its sample rate mid-stream ({audio.sample_rate} Hz "
                f"after {self._resampler.source_rate} Hz); yield every piece at one rate"
            )
        return self._encode(self._resampler.push(audio.pcm))

    def finish(self) -> bytes:
        tail = self._encode(self._resampler.flush()) if self._resampler is not None else b""
        if self._container is None:
            return tail if self._started or self.format != "wav" else self._encode(b"")
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        assert self._sink is not None
        return tail + self._sink.take()

    def _encode(self, pcm: bytes) -> bytes:
        if self._container is None:
            if self.format == "wav" and not self._started:
                self._started = True
                return wav_header(SPEECH_SAMPLE_RATE) + pcm
            return pcm
        if pcm:
            import numpy as np

            samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
            frame = self._av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = SPEECH_SAMPLE_RATE
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        assert self._sink is not None
        return self._sink.take()

    def close(self) -> None:
        """Release the encoder without finishing (the caller left)."""
        if self._container is not None:
            # A half-written stream may not close cleanly; nobody reads it any more.
            with contextlib.suppress(self._av.error.FFmpegError, OSError, ValueError):
                self._container.close()
            self._container = None


def _audio(piece: Any) -> Audio:
    if not isinstance(piece, Audio):
        raise UnserializableResult(
            "a speech method yields kiln.Audio (PCM16 samples and their rate), not "
            f"{type(piece).__name__}"
        )
    return piece


def encoded_speech(pieces: Iterator[Any], response_format: str) -> Iterator[bytes]:
    """A speech method's `Audio` pieces as the bytes of `response_format`, each piece's as soon
    as it is encoded; the method's generator is closed with this one."""
    encoder = SpeechEncoder(response_format)
    try:
        for piece in pieces:
            if out := encoder.feed(_audio(piece)):
                yield out
        if out := encoder.finish():
            yield out
    finally:
        encoder.close()
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


async def encoded_speech_async(
    pieces: AsyncIterator[Any], response_format: str
) -> AsyncIterator[bytes]:
    """`encoded_speech` for an async speech method."""
    encoder = SpeechEncoder(response_format)
    try:
        async for piece in pieces:
            if out := encoder.feed(_audio(piece)):
                yield out
        if out := encoder.finish():
            yield out
    finally:
        encoder.close()
