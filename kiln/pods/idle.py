"""A pod's idle time in words, as the scheduler's auto-stop (`error`) and the billing service's
idle reminder (a mail) both say it. Standard library only."""

from __future__ import annotations

import math

__all__ = ["span", "whole_span"]

_UNITS = (("hour", 3600), ("minute", 60), ("second", 1))


def span(seconds: float) -> str:
    """'2 hours', '1.5 hours', '20 minutes', '4 seconds': a duration in the largest unit it
    fills, to two decimals."""
    unit, size = next(((u, s) for u, s in _UNITS if seconds >= s), _UNITS[-1])
    count = round(seconds / size, 2)
    return f"{count:g} {unit}{'' if count == 1 else 's'}"


def whole_span(seconds: float) -> str:
    """The same in whole units, rounded down: how long something has lasted so far ('3
    hours' for 3 h 40 min)."""
    size = next((s for _, s in _UNITS if seconds >= s), 1)
    return span(size * math.floor(seconds / size))
