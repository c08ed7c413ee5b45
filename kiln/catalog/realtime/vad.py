"""Server-side voice activity detection: Silero's VAD model (shipped inside the `silero-vad`
package, no download) read over 32 ms windows of 16 kHz audio, turned into "speech started" and
"speech stopped" with OpenAI's `server_vad` knobs.

Speech starts at the first window whose probability reaches `threshold`; it stops once the
probability has stayed below `threshold - 0.15` (Silero's own hysteresis) for
`silence_duration_ms`, and the stop is dated to where that silence began. Times are
milliseconds of audio since the session's buffer started, as OpenAI's `audio_start_ms` and
`audio_end_ms` are.

The model keeps state from window to window, so each session gets its own copy
(`copy.deepcopy` of the loaded one: a few milliseconds).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kiln.catalog.realtime.events import TurnDetection

__all__ = ["RATE", "SpeechDetector", "VadEvent", "load_silero"]

RATE = 16_000
WINDOW = 512  # samples: what Silero's 16 kHz model reads at once (32 ms)
_WINDOW_MS = WINDOW * 1000 // RATE
_HYSTERESIS = 0.15


def load_silero() -> Any:
    """Silero's VAD model (TorchScript), from the `silero-vad` package."""
    from silero_vad import load_silero_vad

    return load_silero_vad()


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["started", "stopped"]
    at_ms: int  # audio time: where speech started, or where the silence that ended it began


class SpeechDetector:
    """Speech probability per window (`probability(samples) -> float`, float32 samples in
    [-1, 1]) into `VadEvent`s, fed 16 kHz PCM16 in any pieces."""

    def __init__(self, probability: Callable[[Any], float], config: TurnDetection) -> None:
        self.probability = probability
        self.config = config
        self.speaking = False
        self.heard_ms = 0  # audio read so far
        self._pending = b""
        self._silent_since: int | None = None

    @classmethod
    def silero(cls, model: Any, config: TurnDetection) -> SpeechDetector:
        """A detector on its own copy of Silero's model."""
        import torch

        own = copy.deepcopy(model)
        own.reset_states()

        def probability(samples: Any) -> float:
            with torch.inference_mode():
                return float(own(torch.from_numpy(samples), RATE).item())

        return cls(probability, config)

    def push(self, pcm: bytes) -> list[VadEvent]:
        import numpy as np

        data = self._pending + pcm
        whole = len(data) // (2 * WINDOW) * 2 * WINDOW
        self._pending = data[whole:]
        events: list[VadEvent] = []
        for start in range(0, whole, 2 * WINDOW):
            window = np.frombuffer(data[start : start + 2 * WINDOW], dtype="<i2")
            event = self._step(self.probability(window.astype(np.float32) / 32768.0))
            if event is not None:
                events.append(event)
        return events

    def _step(self, probability: float) -> VadEvent | None:
        at = self.heard_ms
        self.heard_ms += _WINDOW_MS
        config = self.config
        if not self.speaking:
            if probability >= config.threshold:
                self.speaking = True
                self._silent_since = None
                return VadEvent("started", at)
            return None
        if probability >= config.threshold - _HYSTERESIS:
            self._silent_since = None
            return None
        if self._silent_since is None:
            self._silent_since = at
        if self.heard_ms - self._silent_since >= config.silence_duration_ms:
            self.speaking = False
            stopped, self._silent_since = self._silent_since, None
            return VadEvent("stopped", stopped)
        return None

    def end_turn(self) -> VadEvent | None:
        """Force the end of speech (the turn reached its length limit)."""
        if not self.speaking:
            return None
        self.speaking = False
        self._silent_since = None
        return VadEvent("stopped", self.heard_ms)
