"""The documentation lists every setting the code accepts, and nothing the code does not."""

from __future__ import annotations

import re
from pathlib import Path

from kiln.settings import SETTINGS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_operations_lists_exactly_the_settings() -> None:
    text = (DOCS / "operations.md").read_text()
    table = set(re.findall(r"^\| `(KILN_[A-Z_]+)` \|", text, flags=re.MULTILINE))
    assert table == {spec.var for spec in SETTINGS}
