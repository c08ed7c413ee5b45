"""Points in time in query parameters: an ISO date or time (`2026-11-01`,
`2026-11-01T12:00:00Z`), or for `since`-like parameters a span back from now (`90s`, `10m`,
`2h`, `7d`). `Moment` and `MomentOrSpan` declare such a parameter in a query model
(`kiln.router.bodies`); an empty value is an absent one."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo, WithJsonSchema

from kiln.errors import InvalidRequest
from kiln.router.validation import Expect

__all__ = ["Moment", "MomentOrSpan", "parse_moment"]

_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_MAX_SPAN_S = 100 * 365 * 86_400  # further back than any stored row


def parse_moment(raw: str, name: str, *, spans: bool = False) -> datetime | None:
    """`raw` as an aware datetime (UTC when it names no zone), None when empty; with `spans`,
    also `10m` and the like, meaning that long before now."""
    if raw == "":
        return None
    if spans and (span := _SPAN.fullmatch(raw.strip())) is not None:
        seconds = min(float(span.group(1)) * _UNIT_S[span.group(2)], _MAX_SPAN_S)
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


def _moment(value: Any, info: ValidationInfo) -> Any:
    return (
        parse_moment(value, info.field_name or "", spans=False) if isinstance(value, str) else value
    )


def _moment_or_span(value: Any, info: ValidationInfo) -> Any:
    return (
        parse_moment(value, info.field_name or "", spans=True) if isinstance(value, str) else value
    )


Moment = Annotated[
    datetime | None,
    BeforeValidator(_moment),
    WithJsonSchema({"type": "string", "description": "An ISO date or time (UTC unless zoned)."}),
    Expect("an ISO date or time such as 2026-11-01 or 2026-11-01T12:00:00Z"),
]
MomentOrSpan = Annotated[
    datetime | None,
    BeforeValidator(_moment_or_span),
    WithJsonSchema(
        {"type": "string", "description": "An ISO date or time, or a span back from now: 10m, 2h."}
    ),
    Expect("an ISO date or time, or a span back from now such as 10m, 2h or 7d"),
]
