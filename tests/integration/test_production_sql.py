"""The analytics queries of docs/production.md run against the real schema (issue 26), on a
database with some history in it, so they stay true as the schema changes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform
from test_plans_e2e import calls, customer_on, worker

from kiln.db.models_access import DEFAULT_CUSTOMER_ID

pytestmark = pytest.mark.integration

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "production.md"


def queries() -> list[str]:
    found = re.findall(r"```sql\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(found) >= 5, "the guide's analytics queries went missing"
    return found


@pytest.mark.parametrize("query", queries(), ids=lambda q: q.split("\n")[0][:40])
async def test_the_guides_query_runs_on_the_schema(
    platform: Platform, engine: AsyncEngine, query: str
) -> None:
    customer_id = await customer_on(engine, "enterprise", datetime.now(UTC))
    await worker(platform, engine).record([calls(customer_id, datetime.now(UTC), 12)])
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text(query))).all()
    assert isinstance(rows, list)
    if "usage_events u" in query:  # the usage query sees the customer just charged
        assert any(row[0] == "on enterprise" for row in rows), rows
    if "c.id <>" in query:  # leaves out the platform's own customer: by its real id
        assert f"'{DEFAULT_CUSTOMER_ID}'" in query
