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
from kiln.router.run import read_body, read_json_object
from kiln.router.services import RouterServices, services
from kiln.wire import Subjects

__all__ = [
    "announce",
    "balance",
    "create_topup",
    "credit",
    "patch_settings",
    "stripe_webhook",
    "transactions",
]

_WEBHOOK_LIMIT = 1024 * 1024
_MIN_TOPUP_MICROS = 1_000_000  # one unit of the currency
_MAX_TOPUP_MICROS = 100_000 * 1_000_000
_MAX_PAGE = 500
_SETTINGS = (
    "spend_cap_micros", "refill_threshold_micros", "refill_amount_micros", "reset_refill_failures"
)  # fmt: skip


async def account_of(request: Request, named: object = None) -> tuple[bool, uuid.UUID]:
    """(whether an operator asks, the customer the request is about)."""
    principal = await services(request).auth.authenticate(request)
    if principal.kind is ApiKeyKind.FUNCTION:
        raise PermissionDenied("a function-scoped key cannot see or change billing")
    named = named if named is not None else request.query_params.get("customer_id")
    if principal.kind is ApiKeyKind.OPERATOR:
        if named is None:
            raise InvalidRequest("an operator key must say which customer: customer_id=...")
        try:
            return True, uuid.UUID(str(named))
        except ValueError:
            raise NotFound(f"customer {named!r} not found") from None
    assert principal.customer_id is not None
    if named is not None and str(named) != str(principal.customer_id):
        raise NotFound(f"customer {named!r} not found")
    return False, principal.customer_id


def _micros(data: dict[str, Any], name: str, *, low: int, high: int, nullable: bool) -> int | None:
    value = data.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        allowed = f"whole micro-units from {low} to {high}" + (" or null" if nullable else "")
        raise InvalidRequest(f"{name}={value!r} is not valid: expected {allowed}")
    return value


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


def _account_view(customer: Customer, spent_today: int, currency: str) -> dict[str, Any]:
    return {
        "customer_id": str(customer.id),
        "currency": currency,
        "balance_micros": customer.balance_micros,
        "spent_today_micros": spent_today,
        "spend_cap_micros": customer.spend_cap_micros,
        "refill_threshold_micros": customer.refill_threshold_micros,
        "refill_amount_micros": customer.refill_amount_micros,
        "refill_failures": customer.refill_failures,
        "payment_method": customer.payment_method_id is not None,
        "blocked": customer.billing_block,
    }


async def _view(svc: RouterServices, session: Any, customer: Customer) -> dict[str, Any]:
    return _account_view(customer, await _spent_today(session, customer.id), svc.settings.currency)


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
    return JSONResponse(view)


async def patch_settings(request: Request) -> Response:
    """Spend cap and auto-refill: `spend_cap_micros` (null: none), `refill_threshold_micros`
    with `refill_amount_micros` (both null: off), `reset_refill_failures` (turns a refill that
    stopped after failures back on), and, for operators, `payment_method_id`."""
    svc = services(request)
    data = await read_json_object(request)
    operator, customer_id = await account_of(request, data.pop("customer_id", None))
    allowed = set(_SETTINGS) | ({"payment_method_id"} if operator else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(
            f"unknown setting {unknown[0]!r}; settings are {', '.join(sorted(allowed))}"
        )
    changes = Changes()
    async with transaction(svc.sessions) as session:
        customer = await _customer(session, customer_id, lock=True)
        if "spend_cap_micros" in data:
            customer.spend_cap_micros = _micros(data, "spend_cap_micros", low=0, high=2**62,
                                                nullable=True)  # fmt: skip
        if "refill_threshold_micros" in data or "refill_amount_micros" in data:
            threshold = _micros(data, "refill_threshold_micros", low=0, high=2**62, nullable=True)
            amount = _micros(data, "refill_amount_micros", low=_MIN_TOPUP_MICROS,
                             high=_MAX_TOPUP_MICROS, nullable=True)  # fmt: skip
            if (threshold is None) != (amount is None):
                raise InvalidRequest(
                    "refill_threshold_micros and refill_amount_micros go together: give both "
                    "(auto-refill on) or both null (off)"
                )
            customer.refill_threshold_micros, customer.refill_amount_micros = threshold, amount
        if data.get("reset_refill_failures"):
            customer.refill_failures = 0
        if "payment_method_id" in data:
            method = data["payment_method_id"]
            if method is not None and not (isinstance(method, str) and method.startswith("pm_")):
                raise InvalidRequest(f"payment_method_id={method!r} is not valid: expected pm_...")
            customer.payment_method_id = method
        await session.flush()
        await refresh_block(session, customer_id, billing_rules(svc.settings), changes)
        view = _account_view(
            customer, await _spent_today(session, customer_id), svc.settings.currency
        )
    await announce(svc, changes)
    return JSONResponse(view)


async def credit(request: Request) -> Response:
    """An operator's adjustment: credit (or, negative, debit) a customer's balance."""
    svc = services(request)
    data = await read_json_object(request)
    operator, customer_id = await account_of(request, data.get("customer_id"))
    if not operator:
        raise PermissionDenied("adjusting a balance needs an operator key")
    amount = _micros(data, "amount_micros", low=-(2**62), high=2**62, nullable=False)
    assert amount is not None
    if amount == 0:
        raise InvalidRequest("amount_micros=0 is not valid: expected a non-zero amount")
    description = str(data.get("description") or "adjustment")[:500]
    changes = Changes()
    async with transaction(svc.sessions) as session:
        customer = await _customer(session, customer_id, lock=True)
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
    return JSONResponse(view, status_code=201)


async def transactions(request: Request) -> Response:
    """Ledger entries, newest first; `before` (an entry id) pages back."""
    svc = services(request)
    _, customer_id = await account_of(request)
    try:
        limit = min(_MAX_PAGE, max(1, int(request.query_params.get("limit", "100"))))
        before = request.query_params.get("before")
        before_id = int(before) if before is not None else None
    except ValueError:
        raise InvalidRequest("limit and before must be integers") from None
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
    return JSONResponse(
        {
            "transactions": [
                {
                    "id": e.id,
                    "kind": e.kind.value,
                    "amount_micros": e.amount_micros,
                    "balance_after_micros": e.balance_after_micros,
                    "description": e.description,
                    "created_at": e.created_at.isoformat(),
                }
                for e in entries
            ]
        }
    )


# Top-ups and Stripe's webhook --------------------------------------------------------------


async def create_topup(request: Request) -> Response:
    """`{"amount_micros", "method": "checkout"|"payment_intent", "success_url", "cancel_url"}`:
    a Stripe Checkout page to send the customer to, or a PaymentIntent's client secret for
    Stripe.js. The balance is credited when Stripe's webhook says the payment succeeded."""
    svc = services(request)
    data = await read_json_object(request)
    _, customer_id = await account_of(request, data.get("customer_id"))
    gateway = svc.stripe
    if gateway is None:
        raise Unavailable("payments are not set up on this platform (KILN_STRIPE_API_KEY)")
    amount = _micros(data, "amount_micros", low=_MIN_TOPUP_MICROS, high=_MAX_TOPUP_MICROS,
                     nullable=False)  # fmt: skip
    assert amount is not None
    method = data.get("method", "checkout")
    if method not in ("checkout", "payment_intent"):
        raise InvalidRequest(f"method={method!r} is not valid: expected checkout or payment_intent")
    urls = {name: data.get(name) for name in ("success_url", "cancel_url")}
    if method == "checkout":
        for name, url in urls.items():
            if not (isinstance(url, str) and url.startswith(("https://", "http://"))):
                raise InvalidRequest(f"{name}={url!r} is not valid: Checkout needs an http(s) URL")
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
            answer: dict[str, Any] = {"payment_id": payment_id, "amount_micros": amount}
            if method == "checkout":
                session_id, url = await gateway.checkout_session(
                    payment_id, stripe_customer, amount, str(urls["success_url"]),
                    str(urls["cancel_url"]),
                )  # fmt: skip
                payment.checkout_session_id = session_id
                answer["checkout_url"] = url
            else:
                charge = await gateway.payment_intent(payment_id, stripe_customer, amount)
                payment.payment_intent_id = charge.id
                answer["client_secret"] = charge.client_secret
    except stripe.StripeError as exc:
        raise Unavailable(
            f"Stripe did not take the payment request: {exc.user_message or 'try again'}"
        ) from None
    return JSONResponse(answer, status_code=201)


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
    return JSONResponse({"received": True, "duplicate": not new})
