"""The router's side of billing blocks: which customers may not start calls (402), kept in
memory so the check costs a dictionary lookup.

The billing worker announces each block set or lifted on `<ns>.billing.blocks`; the gate also
rereads every block from PostgreSQL every few seconds, so a router that missed a message (or
just started) is right again within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kiln._tasks import cancel_and_wait
from kiln.db.models import Customer
from kiln.db.session import transaction
from kiln.errors import PaymentRequired
from kiln.seal import Seals

__all__ = ["BillingGate"]

_log = logging.getLogger(__name__)
_REFRESH_S = 5.0
_MESSAGES = {
    "balance": "the account's prepaid balance is used up: add funds (POST /v1/billing/topups "
    "or `kiln billing topup`) or turn on auto-refill, then call again",
    "spend_cap": "the account reached its daily spend cap: raise the cap "
    "(PATCH /v1/billing/settings) or wait for the next day (UTC)",
    "invoice": "an invoice of the account is unpaid past its grace period: pay it (its "
    "payment_url in GET /v1/billing/invoices?status=open), then call again",
}


class BillingGate:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.blocked: dict[uuid.UUID, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.seals = Seals(None)  # start() gives the platform's

    async def start(self, nc: NATS, subject: str, *, seals: Seals) -> None:
        """Hear blocks announced on `subject` under the platform's seal."""
        self.seals = seals
        await nc.subscribe(subject, cb=self._on_block)
        with contextlib.suppress(Exception):  # the refresher tries again
            await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="kiln-billing-gate")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def check(self, customer_id: uuid.UUID | None) -> None:
        """Raise 402 when the customer may not start calls now."""
        if customer_id is None or not self.blocked:
            return
        block = self.blocked.get(customer_id)
        if block is not None:
            raise PaymentRequired(_MESSAGES.get(block, f"billing blocks this account ({block})"))

    async def refresh(self) -> None:
        async with transaction(self.sessions) as session:
            rows = await session.execute(
                sa.select(Customer.id, Customer.billing_block).where(
                    Customer.billing_block.is_not(None)
                )
            )
            self.blocked = {customer_id: str(block) for customer_id, block in rows}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_S)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last known blocks
                _log.warning("billing blocks not refreshed: %s", exc)

    async def _on_block(self, msg: Msg) -> None:
        if not self.seals.platform_sent(msg, "a billing block"):
            return
        try:
            data = json.loads(msg.data)
            customer_id = uuid.UUID(data["customer_id"])
            block = data.get("block")
        except (ValueError, KeyError, TypeError):
            return
        if block:
            self.blocked[customer_id] = str(block)
        else:
            self.blocked.pop(customer_id, None)
