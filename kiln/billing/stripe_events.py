"""What Stripe's webhook events change: each event is applied once (its id is stored in the
same transaction), and the outcome does not depend on the order events arrive in, because
every event is read as a fact about one Kiln payment (found through `metadata.kiln_payment`) or
one Kiln invoice (`metadata.kiln_invoice`), and being paid is final: a payment is credited, an
invoice marked paid, the first time any event says so, and a failure reported after that
changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.invoices import record_payment
from kiln.billing.ledger import BillingRules, Changes, credit_payment, fail_payment
from kiln.db.enums import InvoiceStatus
from kiln.db.models import Customer, Invoice, Payment, StripeEvent

__all__ = ["apply_event"]

_log = logging.getLogger("kiln.billing.stripe")


def _payment_id(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata") or {}
    found = metadata.get("kiln_payment") or obj.get("client_reference_id")
    return str(found) if found else None


async def apply_event(
    session: AsyncSession, event: Mapping[str, Any], rules: BillingRules, changes: Changes
) -> bool:
    """Apply a verified event; whether it was new."""
    first = await session.scalar(
        insert(StripeEvent)
        .values(id=str(event["id"]), type=str(event.get("type", "")))
        .on_conflict_do_nothing(index_elements=[StripeEvent.id])
        .returning(StripeEvent.id)
    )
    if first is None:
        return False  # delivered before
    kind = str(event.get("type", ""))
    obj: Mapping[str, Any] = (event.get("data") or {}).get("object") or {}
    if kind.startswith("invoice."):
        await _invoice_event(session, kind, obj, rules, changes)
        return True
    payment_id = _payment_id(obj)
    if payment_id is None:
        return True  # not about a Kiln payment: recorded, nothing to do
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        if kind.endswith("succeeded") or obj.get("payment_status") == "paid":
            intent = obj.get("payment_intent")
            await credit_payment(session, payment_id, rules, changes,
                                 payment_intent_id=str(intent) if intent else None)  # fmt: skip
    elif kind in ("checkout.session.expired", "checkout.session.async_payment_failed"):
        await fail_payment(session, payment_id, kind.removeprefix("checkout.session."), rules,
                           changes)  # fmt: skip
    elif kind == "payment_intent.succeeded":
        await credit_payment(session, payment_id, rules, changes, payment_intent_id=str(obj["id"]))
        await _remember_card(session, payment_id, obj)
    elif kind in ("payment_intent.payment_failed", "payment_intent.canceled"):
        error = (obj.get("last_payment_error") or {}).get("message") or kind
        await fail_payment(session, payment_id, str(error), rules, changes)
    else:
        _log.debug("Stripe event %s of type %s needs nothing", event["id"], kind)
    return True


async def _invoice_event(
    session: AsyncSession,
    kind: str,
    obj: Mapping[str, Any],
    rules: BillingRules,
    changes: Changes,
) -> None:
    """A Stripe invoice Kiln issued was paid (the invoice is marked paid and the customer
    credited, once) or a payment of it failed (the error is kept; Kiln's own attempts count
    and schedule the retries). An invoice Kiln does not know is logged and left alone."""
    found = await _kiln_invoice(session, obj)
    if found is None:
        _log.warning("Stripe event %s names no Kiln invoice (Stripe's %s); ignored", kind,
                     obj.get("id"))  # fmt: skip
        return
    if kind in ("invoice.paid", "invoice.payment_succeeded"):
        if found.status is InvoiceStatus.OPEN:
            await record_payment(session, found.id, str(obj.get("id") or "stripe"), rules, changes,
                                 now=datetime.now(UTC))  # fmt: skip
    elif kind == "invoice.payment_failed" and found.status is InvoiceStatus.OPEN:
        error = ((obj.get("last_finalization_error") or {}).get("message")
                 or "Stripe could not collect the payment")  # fmt: skip
        found.payment_error = str(error)[:2000]


async def _kiln_invoice(session: AsyncSession, obj: Mapping[str, Any]) -> Invoice | None:
    """The invoice a Stripe invoice object stands for: by Kiln's id in its metadata, else by
    Stripe's id."""
    named = (obj.get("metadata") or {}).get("kiln_invoice")
    try:
        invoice_id = uuid.UUID(str(named)) if named else None
    except ValueError:
        invoice_id = None
    if invoice_id is not None:
        return await session.get(Invoice, invoice_id, with_for_update=True)
    if obj.get("id"):
        found: Invoice | None = await session.scalar(
            sa.select(Invoice).where(Invoice.stripe_invoice_id == str(obj["id"])).with_for_update()
        )
        return found
    return None


async def _remember_card(session: AsyncSession, payment_id: str, obj: Mapping[str, Any]) -> None:
    """A top-up paid with a card saved for later becomes the card auto-refills charge, unless
    the customer has one already."""
    method = obj.get("payment_method")
    if not method or obj.get("setup_future_usage") != "off_session":
        return
    payment = await session.get(Payment, payment_id)
    if payment is None:
        return
    customer = await session.get(Customer, payment.customer_id, with_for_update=True)
    if customer is not None and customer.payment_method_id is None:
        customer.payment_method_id = str(method)
