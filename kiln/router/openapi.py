"""The OpenAPI document served at `/openapi.json`."""

from __future__ import annotations

from functools import cache
from typing import Any

from kiln._version import __version__

__all__ = ["openapi_document"]

_ERROR = {
    "description": "An error in Kiln's one shape.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "request_id": {"type": "string"},
                        },
                        "required": ["code", "message", "request_id"],
                    }
                },
            }
        }
    },
}
_APP = {"name": "app", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_CALL = {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
_CUSTOMER = {"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(
    summary: str, *, params: tuple[dict[str, Any], ...] = (), ok: str = "200"
) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": list(params),
        "responses": {ok: {"description": "Success."}, "default": _ERROR},
    }


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": __version__},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/run/{app}/{name}": {
                "post": _op(
                    "Call a function (NAME) or a class method (Class.method). A JSON object body "
                    "maps to keyword arguments; another body is passed as bytes.",
                    params=(_APP, _NAME),
                )
            },
            "/v1/spawn/{app}/{name}": {
                "post": _op("Start an async job; Idempotency-Key makes it safe to repeat.",
                            params=(_APP, _NAME), ok="202"),
            },
            "/v1/calls/{call_id}": {"get": _op("A job's status and result.", params=(_CALL,))},
            "/v1/calls/{call_id}/result": {"get": _op("A job's raw result.", params=(_CALL,))},
            "/v1/calls/{call_id}/cancel": {"post": _op("Cancel a job.", params=(_CALL,))},
            "/v1/customers": {
                "get": _op("List customers (operator keys)."),
                "post": _op("Create a customer (operator keys).", ok="201"),
            },
            "/v1/customers/{customer_id}": {
                "get": _op("One customer (operator keys).", params=(_CUSTOMER,)),
                "patch": _op("Change a customer's tier, limits, name or status.",
                             params=(_CUSTOMER,)),
            },
            "/v1/keys": {
                "get": _op("List API keys."),
                "post": _op("Create an API key; its secret is in this answer only.", ok="201"),
            },
            "/v1/keys/{key_id}": {"delete": _op("Revoke a key.", params=(_KEY,), ok="204")},
            "/v1/keys/{key_id}/rotate": {
                "post": _op("Replace a key with a new one.", params=(_KEY,), ok="201")
            },
            "/v1/abuse": {"get": _op("Customers refused most often (operator keys).")},
            "/v1/billing/balance": {"get": _op("Balance, spend, cap, auto-refill and block.")},
            "/v1/billing/settings": {"patch": _op("Spend cap and auto-refill.")},
            "/v1/billing/credits": {"post": _op("Adjust a balance (operator keys).", ok="201")},
            "/v1/billing/transactions": {"get": _op("Ledger entries, newest first.")},
            "/v1/billing/topups": {
                "post": _op("Start a top-up: a Stripe Checkout page or PaymentIntent.", ok="201")
            },
            "/v1/billing/usage": {
                "get": _op("Replica-seconds, calls and cost by period, function and GPU type.")
            },
            "/v1/billing/revenue": {"get": _op("Revenue by tier (operator keys).")},
            "/v1/billing/stripe/webhook": {"post": {
                "summary": "Stripe's webhook, authenticated by its Stripe-Signature.",
                "security": [], "responses": {"200": {"description": "Applied."},
                                              "default": _ERROR}}},
            "/v1/apps": {
                "get": _op("List apps."),
                "post": _op("Deploy an app version (what `kiln deploy` sends).", ok="201"),
            },
            "/v1/apps/{app}": {"delete": _op("Stop and remove an app.", params=(_APP,), ok="204")},
            "/v1/functions": {"get": _op("List functions with their scaling settings.")},
            "/v1/functions/{app}/{name}": {
                "get": _op("One function's settings.", params=(_APP, _NAME)),
                "patch": _op(
                    "Change scaling settings live; they persist across redeploys.",
                    params=(_APP, _NAME),
                ),
            },
            "/v1/functions/{app}/{name}/replicas": {
                "get": _op("A function's replicas.", params=(_APP, _NAME))
            },
            "/v1/functions/{app}/{name}/calls": {
                "get": _op(
                    "A function's recent calls from the invocation log, newest first (limit, "
                    "before, since, until, status, kind).",
                    params=(_APP, _NAME),
                )
            },
            "/v1/functions/{app}/{name}/logs": {
                "get": _op(
                    "What a function's replicas printed and logged, as NDJSON (since, follow).",
                    params=(_APP, _NAME),
                )
            },
            "/healthz": {"get": {"summary": "Liveness (no key needed).", "security": [],
                                 "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"summary": "Readiness (no key needed).", "security": [],
                                "responses": {"200": {"description": "Ready."}}}},
            "/metrics": {"get": _op("Prometheus metrics.")},
            "/openapi.json": {"get": {"summary": "This document.", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3.1."}}}},
        },
    }  # fmt: skip
