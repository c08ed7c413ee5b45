"""Invoices collected through a fake Stripe on the real stack (issue 25): an invoice issued as a
Stripe invoice once although Stripe was down at the close, its collection failing and retried
on the schedule, paid on Stripe's page and marked paid by the webhook (once, however often it
comes); a webhook about an unknown invoice ignored; an invoice unpaid past the grace period
blocking its customer until a payment lifts it; invoices mailed with their PDF."""

from __future__ import annotations

import email
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from eventually import eventually
from fakestripe import DECLINED, FakeStripe
from sqlalchemy.ext.asyncio import AsyncEngine
from stack import Platform
from test_plans_e2e import _NoNats, calls, worker
from test_stripe_e2e import new_customer, paying_platform

from kiln.billing.invoice_worker import InvoiceWorker
from kiln.billing.invoices import PAYMENT_RETRY_DAYS
from kiln.billing.ledger import billing_rules
from kiln.billing.plans import period_of
from kiln.console.mail import Mailer
from kiln.db.enums import InvoiceStatus, LedgerKind, UserRole
from kiln.db.models import Customer, Invoice, LedgerEntry, StripeOutbox, User
from kiln.db.session import session_factory, transaction
from kiln.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(
    settings: Settings, stripe_fake: FakeStripe, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    async with paying_platform(settings, stripe_fake, tmp_path_factory) as running:
        yield running


async def invoice_of(engine: AsyncEngine, invoice_id: str) -> Invoice:
    async with transaction(session_factory(engine)) as session:
        return await session.get_one(Invoice, uuid.UUID(invoice_id))


async def close_now(platform: Platform, customer_id: str) -> str:
    """The customer's invoice for this month, closed early; its id."""
    async with platform.client() as operator:
        closed = await operator.post(
            "/v1/billing/close",
            json={"period": period_of(datetime.now(UTC)).label, "customer_id": customer_id},
        )
    assert closed.status_code == 200, closed.text
    (invoice_id,) = closed.json()["invoices"]
    return str(invoice_id)


async def used(platform: Platform, engine: AsyncEngine, customer_id: str, requests: int) -> None:
    await worker(platform, engine).record(
        [calls(uuid.UUID(customer_id), datetime.now(UTC), requests)]
    )


async def test_a_stripe_invoice_is_made_once_and_its_webhook_marks_it_paid(
    platform: Platform, engine: AsyncEngine, stripe_fake: FakeStripe
) -> None:
    customer_id, _ = await new_customer(platform, "enterprise")
    await used(platform, engine, customer_id, 1234)
    stripe_fake.fail_next = 2  # Stripe is down at the close: the invoice waits, then goes
    invoice_id = await close_now(platform, customer_id)

    async def issued() -> Invoice:
        invoice = await invoice_of(engine, invoice_id)
        assert invoice.payment_attempts == 1, "not yet tried"
        return invoice

    invoice = await eventually(issued, within_s=60)
    made = [i for i in stripe_fake.invoices.values()
            if i["metadata"]["kiln_invoice"] == invoice_id]  # fmt: skip
    assert len(made) == 1  # retried under the same idempotency keys: one invoice
    (theirs,) = made
    assert theirs["id"] == invoice.stripe_invoice_id
    assert (theirs["status"], theirs["amount_due"]) == ("open", 1234)  # cents
    assert sum(item["amount"] for item in theirs["lines"]) * 10_000 == invoice.total_micros
    assert invoice.payment_url == theirs["hosted_invoice_url"]
    # Its first collection failed (no card on file) and the next waits a day.
    assert "no default payment method" in (invoice.payment_error or "")
    async with engine.connect() as conn:
        following = await conn.scalar(
            sa.select(StripeOutbox.next_attempt_at).where(
                StripeOutbox.identifier == f"invoice:{invoice_id}:pay:2"
            )
        )
    assert following is not None
    wait = following - datetime.now(UTC)
    assert timedelta(days=PAYMENT_RETRY_DAYS[0]) - timedelta(minutes=5) < wait
    assert wait <= timedelta(days=PAYMENT_RETRY_DAYS[0])

    # The customer pays on Stripe's page; Stripe's webhook tells Kiln (twice, as it may).
    event = stripe_fake.pay_hosted(theirs["id"])
    first = await stripe_fake.deliver(platform.url, event)
    again = await stripe_fake.deliver(platform.url, event)
    assert first.json() == {"received": True, "duplicate": False}
    assert again.json() == {"received": True, "duplicate": True}
    paid = await invoice_of(engine, invoice_id)
    assert (paid.status, paid.payment_reference) == (InvoiceStatus.PAID, theirs["id"])
    async with engine.connect() as conn:
        payments = list(
            await conn.scalars(
                sa.select(LedgerEntry.amount_micros).where(
                    LedgerEntry.customer_id == uuid.UUID(customer_id),
                    LedgerEntry.kind == LedgerKind.PAYMENT,
                )
            )
        )
        owed = await conn.scalar(
            sa.select(Customer.balance_micros).where(Customer.id == uuid.UUID(customer_id))
        )
    assert payments == [invoice.total_micros]  # credited once
    assert owed == 0


async def test_a_webhook_about_an_unknown_invoice_changes_nothing(
    platform: Platform, stripe_fake: FakeStripe
) -> None:
    stranger = {"id": "in_unknown", "object": "invoice", "status": "paid",
                "metadata": {"kiln_invoice": str(uuid.uuid4())}}  # fmt: skip
    answer = await stripe_fake.deliver(platform.url, stripe_fake.event("invoice.paid", stranger))
    garbled = {**stranger, "metadata": {"kiln_invoice": "not-a-uuid"}}
    other = await stripe_fake.deliver(platform.url, stripe_fake.event("invoice.paid", garbled))
    assert answer.status_code == other.status_code == 200, answer.text


async def test_an_invoice_unpaid_past_the_grace_period_blocks_until_it_is_paid(
    platform: Platform, engine: AsyncEngine, stripe_fake: FakeStripe
) -> None:
    customer_id, key = await new_customer(platform, "enterprise")
    async with platform.client() as operator:
        card = await operator.patch(
            "/v1/billing/settings",
            json={"customer_id": customer_id, "payment_method_id": DECLINED},
        )
    assert card.status_code == 200, card.text
    await used(platform, engine, customer_id, 50)
    invoice_id = await close_now(platform, customer_id)

    async def attempts_at_least(count: int) -> bool:
        return (await invoice_of(engine, invoice_id)).payment_attempts >= count

    await eventually(lambda: attempts_at_least(1), within_s=60)

    assert "declined" in ((await invoice_of(engine, invoice_id)).payment_error or "")
    # The day passes: the second attempt, declined too, puts the third three days later.
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(StripeOutbox)
            .where(StripeOutbox.identifier == f"invoice:{invoice_id}:pay:2")
            .values(next_attempt_at=sa.func.now())
        )
    await eventually(lambda: attempts_at_least(2), within_s=60)
    async with engine.connect() as conn:
        third = await conn.scalar(
            sa.select(StripeOutbox.next_attempt_at).where(
                StripeOutbox.identifier == f"invoice:{invoice_id}:pay:3"
            )
        )
    assert third is not None
    assert third - datetime.now(UTC) > timedelta(days=PAYMENT_RETRY_DAYS[1]) - timedelta(hours=1)

    # Past the grace period (none, here) the customer's calls get 402 ...
    graceless = replace(billing_rules(platform.settings), invoice_grace_s=0)
    sweeper = InvoiceWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine), graceless, Mailer(platform.settings),
        namespace=platform.settings.namespace, close_delay_s=3600, issuer="Kiln",
    )  # fmt: skip
    assert await sweeper.block_overdue() >= 1  # (any other open invoice's customer too)

    async def refused() -> str:
        async with platform.client() as client:
            client.headers["Authorization"] = f"Bearer {key}"
            answer = await client.get("/v1/billing/balance")
        blocked = answer.json()["blocked"]
        assert blocked == "invoice", blocked
        return str(blocked)

    await eventually(refused, within_s=30)
    # ... until the invoice is paid (a transfer an operator records): the block lifts.
    async with platform.client() as operator:
        paid = await operator.post(
            f"/v1/billing/invoices/{invoice_id}/payments", json={"reference": "wire 77"}
        )
    assert paid.status_code == 200, paid.text
    assert paid.json()["status"] == "paid"
    # Stripe is told, so its page no longer takes a second payment of it.
    stripe_id = paid.json()["stripe_invoice_id"]
    await eventually(lambda: stripe_fake.invoices[stripe_id].get("paid_out_of_band"), within_s=30)
    assert stripe_fake.invoices[stripe_id]["status"] == "paid"
    async with engine.connect() as conn:
        block = await conn.scalar(
            sa.select(Customer.billing_block).where(Customer.id == uuid.UUID(customer_id))
        )
    assert block is None


async def test_issued_invoices_are_mailed_with_their_pdf(
    platform: Platform, engine: AsyncEngine, tmp_path: Path
) -> None:
    customer_id, _ = await new_customer(platform, "enterprise")
    address = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    async with transaction(session_factory(engine)) as session:
        session.add(User(customer_id=uuid.UUID(customer_id), role=UserRole.OWNER, email=address,
                         password_hash="-", verified_at=datetime.now(UTC)))  # fmt: skip
    await used(platform, engine, customer_id, 7)
    invoice_id = await close_now(platform, customer_id)
    mailer = Mailer(platform.settings.replace(home=tmp_path))
    sender = InvoiceWorker(
        _NoNats(),  # type: ignore[arg-type]
        session_factory(engine), billing_rules(platform.settings), mailer,
        namespace=platform.settings.namespace, close_delay_s=3600, issuer="Kiln",
    )  # fmt: skip

    async def mailed() -> Invoice:
        await sender.mail_due()  # the platform's own sweep may send it first
        invoice = await invoice_of(engine, invoice_id)
        assert invoice.mailed_at is not None
        return invoice

    invoice = await eventually(mailed, within_s=60)
    assert invoice.mailed_to == address
    folders = [tmp_path / "mail", platform.settings.home / "mail"]
    (written,) = [
        f for folder in folders if folder.exists() for f in folder.glob(f"*-invoice-{address}.eml")
    ]
    message = email.message_from_bytes(written.read_bytes(), policy=default_policy)
    assert isinstance(message, EmailMessage)
    assert message["Subject"].startswith("Kiln invoice INV-")
    (attached,) = list(message.iter_attachments())
    assert attached.get_content_type() == "application/pdf"
    assert attached.get_content().startswith(b"%PDF-")
