"""How listing commands print: aligned columns for people, `--json` for scripts.

With `--json` a command prints the API's own objects (one JSON document on stdout), so a
script sees the same fields, names and units as the HTTP API documents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

import typer

__all__ = ["JsonFlag", "echo_json", "echo_table"]

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print the API's objects as JSON, for scripts.")
]


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def echo_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """`header` and `rows` in columns as wide as their widest cell, two spaces apart."""
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        typer.echo("  ".join(cells).rstrip())
