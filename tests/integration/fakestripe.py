"""A small local server that plays Stripe's HTTP API for the tests, reached by the real `stripe`
package through `KILN_STRIPE_API_BASE`: customers, PaymentIntents (saved cards that pay or are
declined), Checkout Sessions, Billing meter events, invoices (items, finalising, paying),
idempotency keys, injected failures, and
webhook events signed with Stripe's real scheme (`t=…,v1=HMAC-SHA256(secret, "t.body")`).
A Checkout Session's URL is a page of its own: a browser that presses its "Pay" button pays,
the fake delivers Stripe's events to `webhook_to` (a Kiln router) and goes to the success URL.

It records what it received so tests can compare it with Kiln's ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from eventually import eventually
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from kiln.devstack.ports import pick_port

DECLINED = "pm_card_declined"
WEBHOOK_SECRET = "whsec_fake_" + "k" * 32
API_KEY = "sk_test_fakestripe0000"


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    stamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


@dataclass
class FakeStripe:
    url: str = ""
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)  # by identifier
    meter_posts: int = 0  # every meter event request, repeats included
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with a 500
    _idempotent: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _instance: str = field(default_factory=lambda: secrets.token_hex(4))
    _events: itertools.count[int] = field(default_factory=itertools.count)
    webhook_to: str = ""  # the Kiln router a paid Checkout page tells

    def _id(self, prefix: str) -> str:
        # Unique across fakes: one database may see several in a test session.
        return f"{prefix}_fake{self._instance}{next(self._ids):06d}"

    async def handle(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        path = request.url.path
        if path.startswith("/pay/"):
            return await self._checkout_page(request, path.removeprefix("/pay/"))
        self.requests.append((path, form))
        if self.fail_next > 0:
            self.fail_next -= 1
            return JSONResponse({"error": {"type": "api_error", "message": "injected"}}, 500)
        key = request.headers.get("idempotency-key")
        if key is not None and key in self._idempotent:
            status, body = self._idempotent[key]
            return JSONResponse(body, status, headers={"idempotent-replayed": "true"})
        status, body = self._answer(path, form)
        if key is not None:
            self._idempotent[key] = (status, body)
        return JSONResponse(body, status)

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/customers":
            metadata = {"kiln_customer": form.get("metadata[kiln_customer]")}
            cid = self._id("cus")
            customer = {"id": cid, "object": "customer", "name": form.get("name"),
                        "metadata": metadata}  # fmt: skip
            self.customers[cid] = customer
            return 200, customer
        if path == "/v1/payment_intents":
            return self._payment_intent(form)
        if path == "/v1/checkout/sessions":
            sid = self._id("cs")
            session = {
                "id": sid, "object": "checkout.session", "url": f"{self.url}/pay/{sid}",
                "customer": form.get("customer"), "payment_status": "unpaid",
                "client_reference_id": form.get("client_reference_id"),
                "metadata": {"kiln_payment": form.get("metadata[kiln_payment]")},
                "amount_total": int(form.get("line_items[0][price_data][unit_amount]", "0")),
                "payment_intent": None, "success_url": form.get("success_url"),
            }  # fmt: skip
            self.sessions[sid] = session
            return 200, session
        if path.startswith("/v1/invoices") or path == "/v1/invoiceitems":
            return self._invoice(path, form)
        if path == "/v1/billing/meter_events":
            self.meter_posts += 1
            identifier = form["identifier"]
            event = {
                "object": "billing.meter_event", "identifier": identifier,
                "event_name": form["event_name"], "timestamp": int(form["timestamp"]),
                "payload": {"stripe_customer_id": form["payload[stripe_customer_id]"],
                            "value": form["payload[value]"]},
            }  # fmt: skip
            self.meter_events.setdefault(identifier, event)  # Stripe keeps the first
            return 200, event
        return 404, {"error": {"type": "invalid_request_error", "message": f"no route {path}"}}

    def _invoice(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Invoices: created as drafts, items added, finalised (open), paid with the card the
        payment names, or by the customer on the hosted page (`pay_hosted`)."""
        if path == "/v1/invoices":
            iid = self._id("in")
            self.invoices[iid] = {
                "id": iid, "object": "invoice", "customer": form.get("customer"),
                "status": "draft", "currency": form.get("currency"),
                "auto_advance": form.get("auto_advance"),
                "collection_method": form.get("collection_method"),
                "description": form.get("description"),
                "metadata": {"kiln_invoice": form.get("metadata[kiln_invoice]")},
                "lines": [], "amount_due": 0, "amount_paid": 0, "hosted_invoice_url": None,
            }  # fmt: skip
            return 200, self.invoices[iid]
        if path == "/v1/invoiceitems":
            invoice = self.invoices.get(form.get("invoice", ""))
            if invoice is None or invoice["status"] != "draft":
                return 400, {"error": {"type": "invalid_request_error",
                                       "message": "no draft invoice"}}  # fmt: skip
            item = {"id": self._id("ii"), "object": "invoiceitem", "amount": int(form["amount"]),
                    "description": form.get("description"), "invoice": invoice["id"]}  # fmt: skip
            invoice["lines"].append(item)
            return 200, item
        iid, _, action = path.removeprefix("/v1/invoices/").partition("/")
        invoice = self.invoices.get(iid)
        if invoice is None:
            return 404, {"error": {"type": "invalid_request_error", "message": "no such invoice"}}
        if action == "":
            return 200, invoice
        if action == "pay" and invoice["status"] == "paid":
            return 400, {"error": {"type": "invalid_request_error", "code": "invoice_already_paid",
                                   "message": "Invoice is already paid"}}  # fmt: skip
        if action == "finalize":
            invoice.update(status="open", amount_due=sum(i["amount"] for i in invoice["lines"]),
                           hosted_invoice_url=f"{self.url}/invoice/{iid}")  # fmt: skip
            return 200, invoice
        if action == "pay" and form.get("paid_out_of_band") == "true":
            invoice.update(status="paid", paid_out_of_band=True)
            return 200, invoice
        if action == "pay":
            method = form.get("payment_method")
            if method is None:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "invoice_no_payment_method",
                        "message": "The customer has no default payment method.",
                    }
                }
            if method == DECLINED:
                return 402, {"error": {"type": "card_error", "code": "card_declined",
                                       "message": "Your card was declined."}}  # fmt: skip
            invoice.update(status="paid", amount_paid=invoice["amount_due"])
            return 200, invoice
        return 404, {"error": {"type": "invalid_request_error", "message": f"no route {path}"}}

    def pay_hosted(self, invoice_id: str) -> dict[str, Any]:
        """The customer paid the invoice on its hosted page: the event Stripe sends."""
        invoice = self.invoices[invoice_id]
        invoice.update(status="paid", amount_paid=invoice["amount_due"])
        return self.event("invoice.paid", dict(invoice))

    async def _checkout_page(self, request: Request, session_id: str) -> Response:
        session = self.sessions.get(session_id)
        if session is None:
            return HTMLResponse("<h1>No such checkout</h1>", 404)
        if request.method == "GET":
            amount = session["amount_total"] / 100
            return HTMLResponse(
                f"<!doctype html><title>Fake Stripe Checkout</title><h1>Pay ${amount:.2f}</h1>"
                f'<form method="post"><button type="submit">Pay</button></form>'
            )
        for event in self.complete_checkout(session_id):
            delivered = await self.deliver(self.webhook_to, event)
            assert delivered.status_code == 200, delivered.text
        return RedirectResponse(session["success_url"], 303)

    def _payment_intent(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        pid = self._id("pi")
        intent: dict[str, Any] = {
            "id": pid, "object": "payment_intent", "amount": int(form["amount"]),
            "currency": form["currency"], "customer": form.get("customer"),
            "metadata": {"kiln_payment": form.get("metadata[kiln_payment]")},
            "payment_method": form.get("payment_method"),
            "setup_future_usage": form.get("setup_future_usage"),
            "client_secret": f"{pid}_secret_fake", "status": "requires_payment_method",
            "last_payment_error": None,
        }  # fmt: skip
        self.intents[pid] = intent
        if form.get("confirm") == "true":
            if form.get("payment_method") == DECLINED:
                intent["last_payment_error"] = {"message": "Your card was declined."}
                error = {"type": "card_error", "code": "card_declined",
                         "message": intent["last_payment_error"]["message"],
                         "payment_intent": intent}  # fmt: skip
                return 402, {"error": error}
            intent["status"] = "succeeded"
        return 200, intent

    # Webhooks ----------------------------------------------------------------------------------

    def event(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        event_id = f"evt_fake{self._instance}{next(self._events):06d}"
        return {"id": event_id, "object": "event", "type": kind,
                "created": int(time.time()), "api_version": "2025-01-01",
                "data": {"object": obj}}  # fmt: skip

    def complete_checkout(self, session_id: str) -> list[dict[str, Any]]:
        """The customer paid on the Checkout page: the events Stripe sends about it."""
        session = self.sessions[session_id]
        intent = self._payment_intent({
            "amount": str(session["amount_total"]), "currency": "usd",
            "customer": session["customer"] or "",
            "metadata[kiln_payment]": session["metadata"]["kiln_payment"],
            "payment_method": "pm_card_visa", "setup_future_usage": "off_session",
            "confirm": "true",
        })[1]  # fmt: skip
        session.update(payment_status="paid", payment_intent=intent["id"], status="complete")
        return [
            self.event("checkout.session.completed", dict(session)),
            self.event("payment_intent.succeeded", dict(intent)),
        ]

    async def deliver(
        self, kiln_url: str, event: dict[str, Any], *, signature: str | None = None
    ) -> httpx.Response:
        payload = json.dumps(event).encode()
        headers = {"content-type": "application/json"}
        headers["stripe-signature"] = signature if signature is not None else sign(payload)
        async with httpx.AsyncClient(base_url=kiln_url, timeout=10) as client:
            return await client.post("/v1/billing/stripe/webhook", content=payload,
                                     headers=headers)  # fmt: skip


@asynccontextmanager
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    port = pick_port([], set())
    app = Starlette(routes=[Route("/{path:path}", fake.handle, methods=["GET", "POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), within_s=30)
    if task.done():
        await task  # its error
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
