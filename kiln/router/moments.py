"""Points in time in query parameters: an ISO date or time (`2026-11-01`,
`2026-11-01T12:00:00Z`), or for `since`-like parameters a span back from now (`90s`, `10m`,
`2h`, `7d`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from starlette.requests import Request

from kiln.errors import InvalidRequest

__all__ = ["moment_param"]

_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def moment_param(
    request: Request, name: str, default: datetime, *, spans: bool = False
) -> datetime:
    """The query parameter `name` as an aware datetime (UTC when it names no zone), `default`
    when absent; with `spans`, also `10m` and the like, meaning that long before now."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if spans and (span := _SPAN.fullmatch(raw.strip())) is not None:
        seconds = float(span.group(1)) * _UNIT_S[span.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        spans_too = " or a span back from now such as 10m, 2h or 7d" if spans else ""
        raise InvalidRequest(
            f"{name}={raw!r} is not valid: expected an ISO date or time such as 2026-11-01 or "
            f"2026-11-01T12:00:00Z{spans_too}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
