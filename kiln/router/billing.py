"""Money routes: `/v1/billing/...`.

A customer's account key sees and changes its own account; an operator key names the customer
(`customer_id` in the query or the body); function-scoped keys have no business here. Stripe's
webhook is authenticated by its signature alone, checked on the raw body before anything is
parsed or stored.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.billing.ledger import Changes, billing_rules, refresh_block
from kiln.billing.outbox import ensure_stripe_customer
from kiln.billing.stripe_events import apply_event
from kiln.billing.stripe_gateway import construct_event
from kiln.billing.worker import announce_blocks
from kiln.db.enums import ApiKeyKind, LedgerKind, PaymentKind
from kiln.db.models import Customer, DailySpend, LedgerEntry, Payment
from kiln.db.session import transaction
from kiln.errors import InvalidRequest, NotFound, PermissionDenied, Unavailable
from kiln.router.auth import Principal
from kiln.router.bodies import (
    MICROS,
    AccountQuery,
    CreditBody,
    OperatorSettingsPatch,
    SettingsPatch,
    TopupBody,
    TransactionsQuery,
)
from kiln.router.services import RouterServices, services
from kiln.router.validation import read_body, read_model, read_query
from kiln.router.views import Account, Topup, Transaction, Transactions, WebhookReceived, dump
from kiln.wire import Subjects

__all__ = [
    "account_for",
    "account_of",
    "announce",
    "balance",
    "billing_principal",
    "create_topup",
    "credit",
    "patch_settings",
    "stripe_webhook",
    "transactions",
]

_WEBHOOK_LIMIT = 1024 * 1024
_MAX_PAGE = 500


async def billing_principal(request: Request) -> Principal:
    """The caller of a billing route: an account or operator key."""
    principal = await services(request).auth.authenticate(request)
    if principal.kind is ApiKeyKind.FUNCTION:
        raise PermissionDenied("a function-scoped key cannot see or change billing")
    return principal


def account_for(principal: Principal, named: uuid.UUID | None) -> tuple[bool, uuid.UUID]:
    """(whether an operator asks, the customer the request is about): the one an operator
    names, or the account key's own."""
    if principal.kind is ApiKeyKind.OPERATOR:
        if named is None:
            raise InvalidRequest("an operator key must say which customer: customer_id=...")
        return True, named
    assert principal.customer_id is not None
    if named is not None and named != principal.customer_id:
        raise NotFound(f"customer {str(named)!r} not found")
    return False, principal.customer_id


async def account_of(request: Request) -> tuple[bool, uuid.UUID]:
    """`account_for` the caller, with the customer named in the query (`customer_id`)."""
    principal = await billing_principal(request)
    return account_for(principal, read_query(request, AccountQuery).customer_id)


async def _customer(session: Any, customer_id: uuid.UUID, *, lock: bool = False) -> Customer:
    customer = await session.get(Customer, customer_id, with_for_update=lock)
    if customer is None:
        raise NotFound(f"customer {customer_id} not found")
    assert isinstance(customer, Customer)
    return customer


async def announce(svc: RouterServices, changes: Changes) -> None:
    """Blocks set or lifted by a committed change: this router applies them at once, the
    others and the scheduler hear of them over NATS."""
    for customer_id, block in changes.blocks.items():  # this router knows at once
        if block:
            svc.billing.blocked[customer_id] = block
        else:
            svc.billing.blocked.pop(customer_id, None)
    subjects = Subjects(svc.settings.namespace)
    await announce_blocks(svc.dispatcher.nc, subjects, changes, seals=svc.dispatcher.seals)


# Balance, settings, credits ----------------------------------------------------------------


def _account_view(customer: Customer, spent_today: int, currency: str) -> Account:
    return Account(
        customer_id=str(customer.id),
        currency=currency,
        balance_micros=customer.balance_micros,
        spent_today_micros=spent_today,
        spend_cap_micros=customer.spend_cap_micros,
        refill_threshold_micros=customer.refill_threshold_micros,
        refill_amount_micros=customer.refill_amount_micros,
        refill_failures=customer.refill_failures,
        payment_method=customer.payment_method_id is not None,
        blocked=customer.billing_block,
        plan=customer.plan,
    )


async def _spent_today(session: Any, customer_id: uuid.UUID) -> int:
    spent = await session.scalar(
        sa.select(DailySpend.spent_micros).where(
            DailySpend.customer_id == customer_id, DailySpend.day == datetime.now(UTC).date()
        )
    )
    return int(spent or 0)


async def balance(request: Request) -> Response:
    svc = services(request)
    _, customer_id = await account_of(request)
    async with transaction(svc.sessions) as session:
        customer = await _customer(session, customer_id)
        view = _account_view(
            customer, await _spent_today(session, customer_id), svc.settings.currency
        )
    return JSONResponse(dump(view))


async def patch_settings(request: Request) -> Response:
    """Spend cap and auto-refill: `spend_cap_micros` (null: none), `refill_threshold_micros`
    with `refill_amount_micros` (both null: off), `reset_refill_failures` (turns a refill that
    stopped after failures back on), and, for operators, `payment_method_id`."""
    svc = services(request)
    principal = await billing_principal(request)
    operator = principal.kind is ApiKeyKind.OPERATOR
    patch = await read_model(request, OperatorSettingsPatch if operator else SettingsPatch)
    _, customer_id = account_for(principal, patch.customer_id)
    sent = patch.model_fields_set
    changes = Changes()
    async with transaction(svc.sessions) as session:
        customer = await _customer(session, customer_id, lock=True)
        if "spend_cap_micros" in sent:
            customer.spend_cap_micros = patch.spend_cap_micros
        if sent & {"refill_threshold_micros", "refill_amount_micros"}:
            customer.refill_threshold_micros = patch.refill_threshold_micros
            customer.refill_amount_micros = patch.refill_amount_micros
        if patch.reset_refill_failures:
            customer.refill_failures = 0
        if isinstance(patch, OperatorSettingsPatch) and "payment_method_id" in sent:
            customer.payment_method_id = patch.payment_method_id
        await session.flush()
        await refresh_block(session, customer_id, billing_rules(svc.settings), changes)
        view = _account_view(
            customer, await _spent_today(session, customer_id), svc.settings.currency
        )
    await announce(svc, changes)
    return JSONResponse(dump(view))


async def credit(request: Request) -> Response:
    """An operator's adjustment: credit (or, negative, debit) a customer's balance."""
    svc = services(request)
    principal = await billing_principal(request)
    if principal.kind is not ApiKeyKind.OPERATOR:
        raise PermissionDenied("adjusting a balance needs an operator key")
    body = await read_model(request, CreditBody)
    _, customer_id = account_for(principal, body.customer_id)
    amount = body.amount_micros
    description = (body.description or "adjustment")[:500]
    changes = Changes()
    async with transaction(svc.sessions) as session:
        customer = await _customer(session, customer_id, lock=True)
        if not -MICROS <= customer.balance_micros + amount <= MICROS:
            raise InvalidRequest(
                f"amount_micros={amount} is not valid: the balance would pass {MICROS:,} "
                "micro-units either way"
            )
        customer.balance_micros += amount
        session.add(
            LedgerEntry(
                customer_id=customer_id,
                kind=LedgerKind.ADJUSTMENT,
                amount_micros=amount,
                balance_after_micros=customer.balance_micros,
                description=description,
            )
        )
        await session.flush()
        await refresh_block(session, customer_id, billing_rules(svc.settings), changes)
        view = _account_view(
            customer, await _spent_today(session, customer_id), svc.settings.currency
        )
    await announce(svc, changes)
    return JSONResponse(dump(view), status_code=201)


async def transactions(request: Request) -> Response:
    """Ledger entries, newest first; `before` (an entry id) pages back."""
    svc = services(request)
    principal = await billing_principal(request)
    asked = read_query(request, TransactionsQuery)
    _, customer_id = account_for(principal, asked.customer_id)
    limit = min(_MAX_PAGE, max(1, asked.limit))
    before_id = asked.before
    query = (
        sa.select(LedgerEntry)
        .where(LedgerEntry.customer_id == customer_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        query = query.where(LedgerEntry.id < before_id)
    async with transaction(svc.sessions) as session:
        entries = (await session.scalars(query)).all()
    views = [
        Transaction(
            id=e.id,
            kind=e.kind,
            amount_micros=e.amount_micros,
            balance_after_micros=e.balance_after_micros,
            description=e.description,
            created_at=e.created_at.isoformat(),
        )
        for e in entries
    ]
    return JSONResponse(dump(Transactions(transactions=views)))


# Top-ups and Stripe's webhook --------------------------------------------------------------


async def create_topup(request: Request) -> Response:
    """`{"amount_micros", "method": "checkout"|"payment_intent", "success_url", "cancel_url"}`:
    a Stripe Checkout page to send the customer to, or a PaymentIntent's client secret for
    Stripe.js. The balance is credited when Stripe's webhook says the payment succeeded."""
    svc = services(request)
    principal = await billing_principal(request)
    body = await read_model(request, TopupBody)
    _, customer_id = account_for(principal, body.customer_id)
    gateway = svc.stripe
    if gateway is None:
        raise Unavailable("payments are not set up on this platform (KILN_STRIPE_API_KEY)")
    amount, method = body.amount_micros, body.method
    payment_id = f"topup:{uuid.uuid4()}"
    # The payment exists before Stripe hears of it, so no webhook can find nothing.
    async with transaction(svc.sessions) as session:
        await _customer(session, customer_id)
        session.add(Payment(id=payment_id, customer_id=customer_id, kind=PaymentKind.TOPUP,
                            amount_micros=amount))  # fmt: skip
    try:
        async with transaction(svc.sessions) as session:
            stripe_customer = await ensure_stripe_customer(session, gateway, customer_id)
            payment = await session.get(Payment, payment_id)
            assert payment is not None
            if method == "checkout":
                session_id, url = await gateway.checkout_session(
                    payment_id, stripe_customer, amount, str(body.success_url),
                    str(body.cancel_url),
                )  # fmt: skip
                payment.checkout_session_id = session_id
                answer = Topup(payment_id=payment_id, amount_micros=amount, checkout_url=url)
            else:
                charge = await gateway.payment_intent(payment_id, stripe_customer, amount)
                payment.payment_intent_id = charge.id
                answer = Topup(
                    payment_id=payment_id, amount_micros=amount,
                    client_secret=charge.client_secret,
                )  # fmt: skip
    except stripe.StripeError as exc:
        raise Unavailable(
            f"Stripe did not take the payment request: {exc.user_message or 'try again'}"
        ) from None
    return JSONResponse(dump(answer, exclude_none=True), status_code=201)


async def stripe_webhook(request: Request) -> Response:
    svc = services(request)
    secret = svc.settings.stripe_webhook_secret
    if secret is None:
        raise NotFound(
            "Stripe webhooks are not set up on this platform (KILN_STRIPE_WEBHOOK_SECRET)"
        )
    payload = await read_body(request, _WEBHOOK_LIMIT)
    try:
        event = construct_event(payload, request.headers.get("stripe-signature"), secret)
    except stripe.SignatureVerificationError:
        raise InvalidRequest(
            "the Stripe-Signature header does not match this body and secret, or is too old"
        ) from None
    except ValueError:
        raise InvalidRequest("the body is not a Stripe event") from None
    changes = Changes()
    async with transaction(svc.sessions) as session:
        new = await apply_event(session, event.to_dict(), billing_rules(svc.settings), changes)
    await announce(svc, changes)
    return JSONResponse(dump(WebhookReceived(received=True, duplicate=not new)))
