"""Everything Kiln asks of Stripe, through the official `stripe` package: customers, top-ups
(a Checkout Session or a PaymentIntent), off-session refill charges and Billing meter events.

Every call that creates something carries an idempotency key derived from Kiln's own record
(the payment id, the usage event id), so a retry after a timeout or a crash is the same request
to Stripe, never a second charge. `KILN_STRIPE_API_BASE` points the client elsewhere (the tests'
fake Stripe); nothing else in Kiln talks to Stripe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stripe

from kiln.billing.prices import micros_per_minor
from kiln.settings import Settings

__all__ = [
    "Charge",
    "IssuedInvoice",
    "StripeGateway",
    "construct_event",
    "micros_to_minor",
    "minor_to_micros",
]


def micros_to_minor(micros: int, currency: str) -> int:
    """Stripe's `amount` (cents for usd) for a whole number of minor units' worth of micros."""
    return micros // micros_per_minor(currency)


def minor_to_micros(amount: int, currency: str) -> int:
    return amount * micros_per_minor(currency)


@dataclass(frozen=True)
class Charge:
    """What Stripe said about a PaymentIntent."""

    id: str
    status: str  # succeeded, processing, requires_action, requires_payment_method, canceled…
    client_secret: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class IssuedInvoice:
    """A Stripe invoice Kiln issued: its id and the page where it can be paid."""

    id: str
    payment_url: str | None


class _HTTPXClient(stripe.HTTPXClient):
    """stripe's httpx client, sending its form body as `content`: passing text as `data`, as
    stripe does, is deprecated by httpx 0.28 and headed for removal."""

    def _get_request_args_kwargs(  # type: ignore[no-untyped-def]
        self, method: str, url: str, headers: Any, post_data: Any
    ):
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        kwargs["content"] = kwargs.pop("data", None) or None
        return args, kwargs


class StripeGateway:
    def __init__(self, settings: Settings) -> None:
        self.currency = settings.currency
        self.meter_event_name = settings.stripe_meter_event
        self._http = _HTTPXClient()
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            settings.require("stripe_api_key"),
            base_addresses=base,  # type: ignore[arg-type]
            http_client=self._http,
            max_network_retries=2,  # the same idempotency key each time
        )

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def ensure_customer(self, kiln_customer_id: str, name: str) -> str:
        customer = await self._client.v1.customers.create_async(
            {"name": name, "metadata": {"kiln_customer": kiln_customer_id}},
            {"idempotency_key": f"customer:{kiln_customer_id}"},
        )
        return str(customer.id)

    async def checkout_session(
        self,
        payment_id: str,
        stripe_customer: str,
        amount_micros: int,
        success_url: str,
        cancel_url: str,
    ) -> tuple[str, str]:
        """A hosted Checkout page for a top-up: (session id, URL to send the customer to)."""
        session = await self._client.v1.checkout.sessions.create_async(
            {
                "mode": "payment",
                "customer": stripe_customer,
                "success_url": success_url,
                "cancel_url": cancel_url,
                "client_reference_id": payment_id,
                "metadata": {"kiln_payment": payment_id},
                "payment_intent_data": {
                    "metadata": {"kiln_payment": payment_id},
                    "setup_future_usage": "off_session",  # the card can refill later
                },
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": self.currency,
                            "unit_amount": micros_to_minor(amount_micros, self.currency),
                            "product_data": {"name": "Kiln credit"},
                        },
                    }
                ],
            },
            {"idempotency_key": f"checkout:{payment_id}"},
        )
        return str(session.id), str(session.url)

    async def payment_intent(
        self,
        payment_id: str,
        stripe_customer: str,
        amount_micros: int,
        *,
        payment_method: str | None = None,
    ) -> Charge:
        """A PaymentIntent for `payment_id`: confirmed off-session at once when a saved
        `payment_method` is given (an auto-refill), else for the customer to confirm (its
        client secret goes to their browser)."""
        params: dict[str, Any] = {
            "amount": micros_to_minor(amount_micros, self.currency),
            "currency": self.currency,
            "customer": stripe_customer,
            "metadata": {"kiln_payment": payment_id},
        }
        if payment_method is not None:
            params.update(payment_method=payment_method, off_session=True, confirm=True)
        else:
            params.update(setup_future_usage="off_session")
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": f"payment:{payment_id}"},
            )
        except stripe.CardError as exc:  # declined: the intent exists, in a failed state
            intent_id = getattr(exc.error, "payment_intent", None) if exc.error else None
            return Charge(
                id=str(getattr(intent_id, "id", intent_id) or ""),
                status="requires_payment_method",
                error=exc.user_message or str(exc),
            )
        return Charge(str(intent.id), str(intent.status), intent.client_secret)

    async def issue_invoice(
        self,
        invoice_id: str,
        stripe_customer: str,
        *,
        title: str,
        lines: list[tuple[str, int]],
    ) -> IssuedInvoice:
        """A finalised Stripe invoice for Kiln's `invoice_id`, one item per line (description,
        amount in minor units), collected by charging the customer. Every step carries a key
        derived from the invoice, so a retry after a failure anywhere makes the same invoice.
        Kiln asks for each payment itself (`pay_invoice`): Stripe does not advance it."""
        options = {"idempotency_key": f"invoice:{invoice_id}:create"}
        metadata = {"kiln_invoice": invoice_id}
        draft = await self._client.v1.invoices.create_async(
            {
                "customer": stripe_customer, "currency": self.currency,
                "collection_method": "charge_automatically", "auto_advance": False,
                "pending_invoice_items_behavior": "exclude", "description": title,
                "metadata": metadata,
            },
            options,  # type: ignore[arg-type]
        )  # fmt: skip
        assert draft.id is not None
        for position, (description, amount) in enumerate(lines, start=1):
            await self._client.v1.invoice_items.create_async(
                {
                    "customer": stripe_customer, "invoice": draft.id, "amount": amount,
                    "currency": self.currency, "description": description, "metadata": metadata,
                },
                {"idempotency_key": f"invoice:{invoice_id}:line:{position}"},
            )  # fmt: skip
        final = await self._client.v1.invoices.finalize_invoice_async(
            draft.id,
            {"auto_advance": False},
            {"idempotency_key": f"invoice:{invoice_id}:finalize"},
        )
        return IssuedInvoice(str(final.id), final.hosted_invoice_url)

    async def pay_invoice(
        self, stripe_invoice: str, attempt_key: str, *, payment_method: str | None = None
    ) -> str | None:
        """Try to collect a finalised invoice now; None when it was paid, else why not (a
        declined card, no way to pay). Other trouble raises, to be tried again as it is."""
        params: dict[str, Any] = {}
        if payment_method is not None:
            params["payment_method"] = payment_method
        try:
            paid = await self._client.v1.invoices.pay_async(
                stripe_invoice,
                params,  # type: ignore[arg-type]
                {"idempotency_key": attempt_key},
            )
        except stripe.CardError as exc:
            return exc.user_message or str(exc)
        except stripe.InvalidRequestError as exc:
            # Paid already (its webhook late or lost), or no way to pay it: Stripe's invoice says.
            current = await self._client.v1.invoices.retrieve_async(stripe_invoice)
            if current.status == "paid":
                return None
            return exc.user_message or str(exc)
        return None if paid.status == "paid" else f"the invoice is {paid.status}"

    async def mark_paid_outside(self, stripe_invoice: str, key: str) -> None:
        """The invoice was paid outside Stripe (a transfer Kiln recorded): Stripe marks it paid
        and collects nothing. One already paid stays as it is."""
        try:
            await self._client.v1.invoices.pay_async(
                stripe_invoice, {"paid_out_of_band": True}, {"idempotency_key": key}
            )
        except stripe.InvalidRequestError:
            current = await self._client.v1.invoices.retrieve_async(stripe_invoice)
            if current.status != "paid":
                raise

    async def meter_event(
        self, identifier: str, stripe_customer: str, value: int, timestamp: int
    ) -> None:
        """One usage record for the meter; Stripe drops a repeated `identifier`."""
        await self._client.v1.billing.meter_events.create_async(
            {
                "event_name": self.meter_event_name,
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": {"stripe_customer_id": stripe_customer, "value": str(value)},
            },
            {"idempotency_key": f"meter:{identifier}"},
        )


def construct_event(payload: bytes, signature: str | None, secret: str) -> stripe.Event:
    """The event a webhook delivered, if its signature is Stripe's for this exact body and
    recent; raises `stripe.SignatureVerificationError` (or ValueError for a body that is not
    an event) otherwise."""
    event: stripe.Event = stripe.Webhook.construct_event(payload, signature, secret)
    return event
