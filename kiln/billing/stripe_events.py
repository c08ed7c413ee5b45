"""What Stripe's webhook events change: each event is applied once (its id is stored in the
same transaction), and the outcome does not depend on the order events arrive in, because
every event is read as a fact about one Kiln payment (found through `metadata.kiln_payment`)
and a succeeded payment is final: it is credited the first time any event says it succeeded,
and a failure reported after that changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from kiln.billing.ledger import BillingRules, Changes, credit_payment, fail_payment
from kiln.db.models import Customer, Payment, StripeEvent

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
