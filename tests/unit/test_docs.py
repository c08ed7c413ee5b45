"""The documentation lists every setting the code accepts, and nothing the code does not, and
every stream and bucket as kiln/streams.py declares it."""

from __future__ import annotations

import re
from pathlib import Path

from kiln.settings import SETTINGS, default_text
from kiln.streams import DECLARED, Bucket, Consumer, Stream

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_operations_lists_exactly_the_settings_with_their_defaults() -> None:
    """Each default is written once, in Settings; the docs' default column is read from it."""
    text = (DOCS / "operations.md").read_text()
    rows = re.findall(r"^\| `(KILN_[A-Z0-9_]+)` \| .* \| (.*) \|$", text, flags=re.MULTILINE)
    assert len(rows) == len(SETTINGS)
    assert dict(rows) == {spec.var: default_text(spec) for spec in SETTINGS}


def test_help_strings_leave_defaults_to_the_settings() -> None:
    said = [spec.var for spec in SETTINGS if "default" in spec.help]
    assert said == []


def _span(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _row(declared: Stream | Consumer | Bucket) -> str:
    if isinstance(declared, Stream):
        kind = f"stream ({declared.retention}), subjects `{declared.subjects}`"
        limits = [
            *([f"max age {_span(declared.max_age_s)}"] if declared.max_age_s else []),
            *(["max bytes and age: KILN_FUNCTION_LOGS_MAX_*"] if declared.operator_bounds else []),
            *(
                [f"duplicates {_span(declared.duplicate_window_s)}"]
                if declared.duplicate_window_s
                else []
            ),
        ]
    elif isinstance(declared, Consumer):
        kind = f"consumer of `{declared.stream.name}`, filter `{declared.filter}`"
        limits = [f"ack wait {_span(declared.ack_wait_s)}"]
    else:
        kind = f"{declared.kind} bucket"
        ttl = declared.ttl_setting or (_span(declared.ttl_s) if declared.ttl_s else None)
        limits = [*([f"TTL {ttl}"] if ttl else []), *(["direct gets"] if declared.direct else [])]
    return f"| `{declared.name}` | {kind} | {declared.purpose} | {'; '.join(limits) or '-'} |"


def test_architecture_lists_the_declared_streams_and_buckets() -> None:
    """docs/architecture.md's table is kiln/streams.py's declarations, row for row."""
    text = (DOCS / "architecture.md").read_text()
    section = text.split("## Streams and buckets", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [_row(declared) for declared in DECLARED]
    assert table == expected, "\n".join(["the table should read:", *expected])
