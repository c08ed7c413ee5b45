"""The OpenAPI document served at `/openapi.json`.

Request bodies, query parameters and answers are the JSON Schemas of the models the handlers
validate and build (`kiln.router.bodies`, `kiln.router.views`), so the document cannot drift
from what the server accepts. The bodies of `/v1/run` and `/v1/spawn` are the user function's
arguments, and Stripe's webhook is Stripe's: those stay open.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from kiln._version import __version__
from kiln.router import bodies as b
from kiln.router import invoice_bodies as ib
from kiln.router import views as v
from kiln.router.validation import Body, Query, View

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_ERROR = {
    "description": "An error in Kiln's one shape.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_ERROR_SCHEMA = {
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
    "required": ["error"],
}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_APP, _NAME, _CALL = _path("app"), _path("name"), _path("call_id")
_CUSTOMER, _KEY, _INVOICE = _path("customer_id"), _path("key_id"), _path("invoice_id")
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same key and request give the same job.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_OPENAI_BODY = {
    "description": "OpenAI's request body for this route, as OpenAI's API reference describes "
    "it; what Kiln does not support is refused by name (docs/api.md).",
    "required": True,
    "content": _OBJECT,
}
_UPLOAD_BODY = {
    "description": "OpenAI's form for this route: the recording as `file` and the other fields "
    "as text (docs/api.md).",
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "model"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "model": {"type": "string"},
                    "language": {"type": "string"},
                    "prompt": {"type": "string"},
                    "response_format": {
                        "type": "string",
                        "enum": ["json", "text", "srt", "verbose_json", "vtt"],
                    },
                    "temperature": {"type": "number"},
                },
            }
        }
    },
}
_AUDIO = {
    media: {"schema": {"type": "string", "format": "binary"}}
    for media in ("audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm")
}
_OPENAI_ERROR = {
    "description": "An error in OpenAI's shape.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
}
_OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_SSE_OR_JSON = {**_OBJECT, "text/event-stream": {"schema": {"type": "string"}}}
_DEPLOYMENT = _path("deployment_id")
_ARGUMENTS = {
    "description": "The function's own arguments: a JSON object (keyword arguments) or array "
    "(positional ones), or raw bytes for a one-parameter function.",
    "required": False,
    "content": {"application/json": {"schema": {}}, "application/octet-stream": {"schema": {}}},
}


@dataclass(frozen=True, kw_only=True)
class _Op:
    summary: str
    params: tuple[dict[str, Any], ...] = ()
    ok: str = "200"
    also: tuple[str, ...] = ()  # other success statuses, with the same answer
    body: type[Body] | None = None
    query: type[Query] | None = None
    answer: type[View] | None = None
    # The answer's content when no `answer` model says it, or its other forms beside JSON.
    media: dict[str, Any] | None = None
    public: bool = False
    arguments: bool = False  # the body is the user function's arguments (`_ARGUMENTS`)
    openai: bool = False  # an OpenAI-compatible route: OpenAI's error shape
    openai_body: bool = False  # ... with OpenAI's request body (`_OPENAI_BODY`)
    upload: bool = False  # ... as a multipart form with a file (`_UPLOAD_BODY`)


_OPS: dict[str, dict[str, _Op]] = {
    "/v1/run/{app}/{name}": {"post": _Op(
        summary="Call a function (NAME) or a class method (Class.method). A JSON object body "
        "maps to keyword arguments; another body is passed as bytes.", params=(_APP, _NAME),
        media={"application/json": {"schema": {}}, "application/octet-stream": {"schema": {}},
               "application/x-ndjson": {"schema": {"type": "string"}},
               "text/event-stream": {"schema": {"type": "string"}}}, arguments=True)},
    "/v1/spawn/{app}/{name}": {"post": _Op(
        summary="Start an async job; Idempotency-Key makes it safe to repeat.",
        params=(_APP, _NAME, _IDEMPOTENCY), ok="202", query=b.SpawnQuery, answer=v.Spawned,
        arguments=True)},
    "/v1/calls/{call_id}": {"get": _Op(
        summary="A job's status and result.", params=(_CALL,), answer=v.CallView)},
    "/v1/calls/{call_id}/result": {"get": _Op(
        summary="A job's raw result, with its content type.", params=(_CALL,),
        media={"application/json": {"schema": {}}, "application/octet-stream": {"schema": {}}})},
    "/v1/calls/{call_id}/cancel": {"post": _Op(
        summary="Cancel a job.", params=(_CALL,), answer=v.CallView)},
    "/v1/customers": {
        "get": _Op(summary="List customers (operator keys).", answer=v.CustomerList),
        "post": _Op(summary="Create a customer (operator keys).", ok="201", body=b.CustomerBody,
                    answer=v.CustomerView),
    },
    "/v1/customers/{customer_id}": {
        "get": _Op(summary="One customer (operator keys).", params=(_CUSTOMER,),
                   answer=v.CustomerView),
        "patch": _Op(summary="Change a customer's plan (fees prorated from now), tier, limits, "
                     "name or status.",
                     params=(_CUSTOMER,), body=b.CustomerPatch, answer=v.CustomerView),
    },
    "/v1/plans": {
        "get": _Op(summary="The plans: fees, prices, included requests and limits.",
                   answer=v.PlanList),
        "post": _Op(summary="Create a plan (operator keys).", ok="201", body=b.PlanBody,
                    answer=v.PlanView),
    },
    "/v1/plans/{name}": {
        "get": _Op(summary="One plan.", params=(_path("name"),), answer=v.PlanView),
        "patch": _Op(summary="Change a plan's prices or tier (operator keys); fees already "
                     "charged stay.", params=(_path("name"),), body=b.PlanPatch,
                     answer=v.PlanView),
    },
    "/v1/keys": {
        "get": _Op(summary="List API keys.", query=b.KeysQuery, answer=v.KeyList),
        "post": _Op(summary="Create an API key; its secret is in this answer only.", ok="201",
                    body=b.KeyBody, answer=v.NewKey),
    },
    "/v1/keys/{key_id}": {"delete": _Op(summary="Revoke a key.", params=(_KEY,), ok="204")},
    "/v1/keys/{key_id}/rotate": {"post": _Op(
        summary="Replace a key with a new one.", params=(_KEY,), ok="201", answer=v.RotatedKey)},
    "/v1/abuse": {"get": _Op(summary="Customers refused most often (operator keys).",
                             query=b.AbuseQuery, answer=v.AbuseReport)},
    "/v1/nodes": {"get": _Op(summary="Nodes, their GPUs and replicas (operator keys).",
                             answer=v.NodeList)},
    "/v1/queues": {"get": _Op(summary="Each active function's queued calls (operator keys).",
                              answer=v.QueueList)},
    "/v1/billing/balance": {"get": _Op(summary="Balance, spend, cap, auto-refill and block.",
                                       query=b.AccountQuery, answer=v.Account)},
    "/v1/billing/settings": {"patch": _Op(
        summary="Spend cap and auto-refill; operators name the customer and may set its "
        "payment_method_id.", body=b.OperatorSettingsPatch, answer=v.Account)},
    "/v1/billing/credits": {"post": _Op(summary="Adjust a balance (operator keys).", ok="201",
                                        body=b.CreditBody, answer=v.Account)},
    "/v1/billing/transactions": {"get": _Op(summary="Ledger entries, newest first.",
                                            query=b.TransactionsQuery, answer=v.Transactions)},
    "/v1/billing/topups": {"post": _Op(
        summary="Start a top-up: a Stripe Checkout page or PaymentIntent.", ok="201",
        body=b.TopupBody, answer=v.Topup)},
    "/v1/billing/usage": {"get": _Op(
        summary="Replica-seconds, calls and cost by period, function and GPU type.",
        query=b.UsageQuery, answer=v.Report)},
    "/v1/billing/revenue": {"get": _Op(summary="Revenue by tier (operator keys).",
                                       query=b.RevenueQuery, answer=v.Report)},
    "/v1/billing/revenue/plans": {"get": _Op(
        summary="Invoiced revenue by plan and month, and monthly recurring revenue (operator "
        "keys).", query=ib.PlanRevenueQuery, answer=ib.PlanRevenue)},
    "/v1/billing/invoices": {"get": _Op(
        summary="Invoices, newest first: an account's own; operators see any.",
        query=ib.InvoicesQuery, answer=ib.InvoiceList)},
    "/v1/billing/invoices/{invoice_id}": {"get": _Op(
        summary="One invoice with its lines; format=pdf or csv for the document.",
        params=(_INVOICE,), query=ib.InvoiceQuery, answer=ib.InvoiceView,
        media={"application/pdf": {"schema": {"type": "string", "format": "binary"}},
               "text/csv": {"schema": {"type": "string"}}})},
    "/v1/billing/invoices/{invoice_id}/payments": {"post": _Op(
        summary="Record a payment of an open invoice received outside Stripe (operator keys).",
        params=(_INVOICE,), body=ib.PaymentBody, answer=ib.InvoiceView)},
    "/v1/billing/close": {"post": _Op(
        summary="Close a billing period into invoices, for every customer or one (operator "
        "keys); closing again changes nothing.", body=ib.CloseBody, answer=ib.Closed)},
    "/v1/billing/stripe/webhook": {"post": _Op(
        summary="Stripe's webhook, authenticated by its Stripe-Signature.", public=True,
        answer=v.WebhookReceived)},
    "/v1/apps": {
        "get": _Op(summary="List apps.", answer=v.AppList),
        "post": _Op(summary="Deploy an app version (what `kiln deploy` sends); 200 when "
                    "unchanged.", ok="201", also=("200",), body=b.DeployBody,
                    answer=v.Deployed),
    },
    "/v1/apps/{app}": {"delete": _Op(summary="Stop and remove an app.", params=(_APP,),
                                     ok="204")},
    "/v1/functions": {"get": _Op(summary="List functions with their scaling settings.",
                                 answer=v.FunctionList)},
    "/v1/functions/{app}/{name}": {
        "get": _Op(summary="One function's settings.", params=(_APP, _NAME),
                   answer=v.FunctionView),
        "patch": _Op(summary="Change scaling settings live; they persist across redeploys.",
                     params=(_APP, _NAME), body=b.FunctionPatch, answer=v.FunctionView),
    },
    "/v1/functions/{app}/{name}/replicas": {"get": _Op(
        summary="A function's replicas.", params=(_APP, _NAME), answer=v.ReplicaList)},
    "/v1/functions/{app}/{name}/calls": {"get": _Op(
        summary="A function's recent calls from the invocation log, newest first.",
        params=(_APP, _NAME), query=b.CallsQuery, answer=v.Invocations)},
    "/v1/functions/{app}/{name}/stats": {"get": _Op(
        summary="A function's calls in the last hours: counts and latency percentiles by hour.",
        params=(_APP, _NAME), query=b.StatsQuery, answer=v.FunctionStats)},
    "/v1/functions/{app}/{name}/logs": {"get": _Op(
        summary="What a function's replicas printed and logged, as NDJSON.",
        params=(_APP, _NAME), query=b.LogsQuery,
        media={"application/x-ndjson": {"schema": {"type": "string"}}})},
    "/v1/chat/completions": {"post": _Op(
        summary="OpenAI's chat completions, by a deployment's chat method; SSE when stream.",
        media=_SSE_OR_JSON, openai=True, openai_body=True)},
    "/v1/completions": {"post": _Op(
        summary="OpenAI's (legacy) completions; SSE when stream.", media=_SSE_OR_JSON,
        openai=True, openai_body=True)},
    "/v1/embeddings": {"post": _Op(summary="OpenAI's embeddings.", media=_OBJECT, openai=True,
                                   openai_body=True)},
    "/v1/images/generations": {"post": _Op(
        summary="OpenAI's image generation (b64_json).", media=_OBJECT, openai=True,
        openai_body=True)},
    "/v1/audio/transcriptions": {"post": _Op(
        summary="OpenAI's transcriptions: JSON, text, SRT, WebVTT or verbose JSON with segments.",
        media={**_OBJECT, "text/plain": {"schema": {"type": "string"}},
               "text/vtt": {"schema": {"type": "string"}}}, openai=True, upload=True)},
    "/v1/audio/speech": {"post": _Op(
        summary="OpenAI's speech, streamed as it is synthesised; SSE with stream_format sse.",
        media={**_AUDIO, "text/event-stream": {"schema": {"type": "string"}}}, openai=True,
        openai_body=True)},
    "/v1/models": {"get": _Op(summary="The deployments the key may call, with their task.",
                              media=_OBJECT, openai=True)},
    "/v1/models/{model}": {"get": _Op(summary="One of them, by name or alias.",
                                      params=(_path("model"),), media=_OBJECT, openai=True)},
    "/v1/catalog": {"get": _Op(summary="The model catalog's entries, with GPUs and prices.",
                               media=_OBJECT)},
    "/v1/deployments": {
        "get": _Op(summary="The caller's catalog deployments.", media=_OBJECT),
        "post": _Op(summary="Deploy a catalog entry as an app; 200 when unchanged.", ok="201",
                    also=("200",), body=b.DeploymentBody, media=_OBJECT),
    },
    "/v1/deployments/{deployment_id}": {
        "get": _Op(summary="One catalog deployment, by id or name.", params=(_DEPLOYMENT,),
                   media=_OBJECT),
        "delete": _Op(summary="Remove a catalog deployment (its app).", params=(_DEPLOYMENT,),
                      ok="204"),
    },
    "/v1/pods": {
        "get": _Op(summary="The caller's pods and shells that have not ended.", media=_OBJECT),
        "post": _Op(summary="Start a shell (a fresh replica of a function with a terminal) or "
                    "a pod (a slot held until stopped).", ok="201", body=b.PodBody,
                    media=_OBJECT),
    },
    "/v1/pods/{pod_id}": {
        "get": _Op(summary="One pod.", params=(_path("pod_id"),), media=_OBJECT),
        "delete": _Op(summary="End a pod: its replica stops, its terminals are hung up.",
                      params=(_path("pod_id"),), ok="204"),
    },
    "/v1/pods/{pod_id}/stop": {"post": _Op(
        summary="Stop a pod: its GPUs are given back, the pod and its volume stay.",
        params=(_path("pod_id"),), media=_OBJECT)},
    "/v1/pods/{pod_id}/start": {"post": _Op(
        summary="Start a stopped pod again.", params=(_path("pod_id"),), media=_OBJECT)},
    "/v1/pods/{pod_id}/ports/{port}/{path}": {
        method: _Op(summary="A request to the server on a forwarded port of the pod (its whole "
                    "path kept); its answer is the server's.",
                    params=(_path("pod_id"), _path("port"), _path("path")),
                    media={"*/*": {"schema": {}}})
        for method in ("get", "post", "put", "patch", "delete", "options")
    },
    "/healthz": {"get": _Op(summary="Liveness (no key needed).", public=True)},
    "/readyz": {"get": _Op(summary="Readiness (no key needed).", public=True)},
    "/metrics": {"get": _Op(summary="Prometheus metrics.",
                            media={"text/plain": {"schema": {"type": "string"}}})},
    "/openapi.json": {"get": _Op(summary="This document (OpenAPI 3.1).", public=True,
                                 media={"application/json": {"schema": {"type": "object"}}})},
}  # fmt: skip


def _models() -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {}
    for ops in _OPS.values():
        for op in ops.values():
            for model in (op.body, op.query, op.answer):
                if model is not None:
                    found[model] = None
    return list(found)


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = {k: value for k, value in prop.items() if k != "title"}
        # A query parameter is absent or a string, never null.
        branches = [x for x in prop.pop("anyOf", []) if x != {"type": "null"}]
        if len(branches) == 1:
            prop.update(branches[0])
        elif branches:
            prop["anyOf"] = branches
        if prop.get("default", 0) is None:
            del prop["default"]
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        if "description" in prop:
            param["description"] = prop.pop("description")
        param["schema"] = prop
        params.append(param)
    return params


def _operation(op: _Op, refs: dict[type[BaseModel], Any], defs: dict[str, Any]) -> dict[str, Any]:
    params = list(op.params)
    if op.query is not None:
        params += _query_parameters(defs[refs[op.query]["$ref"].rsplit("/", 1)[1]])
    if op.ok == "204":
        ok: dict[str, Any] = {"description": "Done; no body."}
    elif op.answer is not None:  # `media` adds other forms of the same answer
        ok = {
            "description": "Success.",
            "content": {"application/json": {"schema": refs[op.answer]}, **(op.media or {})},
        }
    elif op.media is not None:
        ok = {"description": "Success.", "content": op.media}
    else:
        ok = {"description": "Success."}
    operation: dict[str, Any] = {
        "summary": op.summary,
        "parameters": params,
        "responses": {
            op.ok: ok,
            **{status: ok for status in op.also},
            "default": _OPENAI_ERROR if op.openai else _ERROR,
        },
    }
    if op.openai_body:
        operation["requestBody"] = _OPENAI_BODY
    if op.upload:
        operation["requestBody"] = _UPLOAD_BODY
    if op.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.body]}},
        }
    elif op.arguments:
        operation["requestBody"] = _ARGUMENTS
    if op.public:
        operation["security"] = []
    return operation


@cache
def openapi_document() -> dict[str, Any]:
    models = _models()
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "serialization" if issubclass(m, View) else "validation") for m in models
    ]
    keyed, top = models_json_schema(modes, ref_template=_REF)
    refs = {model: keyed[(model, mode)] for model, mode in modes}
    defs: dict[str, Any] = dict(top.get("$defs", {}))
    paths: dict[str, Any] = {}
    for path, ops in _OPS.items():
        paths[path] = {method: _operation(op, refs, defs) for method, op in ops.items()}
    for model in models:  # a query's schema lives on in its parameters
        if issubclass(model, Query):
            defs.pop(refs[model]["$ref"].rsplit("/", 1)[1], None)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": __version__},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {**defs, "Error": _ERROR_SCHEMA, "OpenAIError": _OPENAI_ERROR_SCHEMA},
        },
        "security": [{"apiKey": []}],
        "paths": paths,
    }
