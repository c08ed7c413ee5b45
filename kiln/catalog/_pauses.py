"""Where a recording pauses: the pieces a speech recogniser reads one at a time.

Whisper-family models read at most 30 seconds at once. A longer recording is cut at its pauses
(the quietest stretch near each 30 s mark, never mid-word when a pause exists), and silence at
either end of each piece is left out, so each transcribed piece is a segment with honest start
and end times. Loudness is the RMS of 20 ms frames; a frame is quiet below a threshold set
from the recording's own loud frames (and never below an absolute floor for digital silence).
"""

from __future__ import annotations

from typing import Any

__all__ = ["speech_pieces"]

_FRAME_S = 0.02


def speech_pieces(
    samples: Any, sample_rate: int, *, max_s: float = 30.0, pause_s: float = 0.5
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of the speech in `samples` (float32 in [-1, 1]), each at most
    `max_s` long, cut at pauses of at least `pause_s` where there are any."""
    import numpy as np

    frame = max(1, int(sample_rate * _FRAME_S))
    count = len(samples) // frame
    if count == 0:
        return [(0, len(samples))] if len(samples) else []
    frames = np.asarray(samples[: count * frame], dtype=np.float32).reshape(count, frame)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    threshold = max(0.1 * float(np.percentile(rms, 95)), 1e-3)
    loud = rms >= threshold
    if not loud.any():
        return []
    pause_frames = max(1, round(pause_s / _FRAME_S))
    margin = 5  # 100 ms kept around each piece: word onsets are quieter than vowels
    limit = max(1, int(max_s / _FRAME_S) - 2 * margin)

    # Runs of loud frames, joined across pauses shorter than `pause_frames`.
    runs: list[list[int]] = []
    for i in np.flatnonzero(loud):
        if runs and i - runs[-1][1] < pause_frames:
            runs[-1][1] = int(i) + 1
        else:
            runs.append([int(i), int(i) + 1])
    # Runs longer than the limit are cut at their quietest frame near the limit.
    pieces: list[tuple[int, int]] = []
    for start, end in runs:
        while end - start > limit:
            window = rms[start + limit // 2 : start + limit]
            cut = start + limit // 2 + int(np.argmin(window))
            pieces.append((start, cut))
            start = cut
        pieces.append((start, end))
    # Neighbouring pieces are joined while they fit (fewer, longer reads are faster).
    joined: list[tuple[int, int]] = []
    for start, end in pieces:
        if joined and end - joined[-1][0] <= limit and start - joined[-1][1] < 2 * pause_frames:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    total = len(samples)
    return [
        (max(0, (start - margin) * frame), min(total, (end + margin) * frame))
        for start, end in joined
    ]
