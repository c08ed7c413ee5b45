"""The router application: routes, error handling, health, and the lifespan that opens what
the handlers use (kiln.router.services) on one exit stack and closes it in reverse.

uvicorn runs the first phases of shutdown (stop accepting connections, let requests in flight
finish within `KILN_SHUTDOWN_TIMEOUT`); the lifespan's exit stack then closes the rest, each
step bounded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln._health import Health
from kiln._service import open_health
from kiln.console.routes import console_mount
from kiln.errors import KilnError
from kiln.observability.nats import NatsMetrics
from kiln.router import (
    access,
    billing,
    billing_reports,
    control,
    deployments,
    invocations,
    invoices,
    jobs,
    nodes,
    plans,
    pod_ports,
    pods,
)
from kiln.router.abuse import SCOPE_CUSTOMER, AbuseSignals, list_abuse
from kiln.router.errors import handle_exception, handle_http_exception
from kiln.router.function_logs import function_logs
from kiln.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from kiln.router.openai import OPENAI_ROUTES
from kiln.router.openapi import openapi_document
from kiln.router.run import run
from kiln.router.services import services
from kiln.router.startup import open_services
from kiln.router.websocket import ws_session
from kiln.settings import Settings

__all__ = ["create_app"]


async def healthz(request: Request) -> Response:
    verdict = services(request).health.live()
    return JSONResponse(verdict.body("ok", "unhealthy"), status_code=200 if verdict.ok else 503)


async def readyz(request: Request) -> Response:
    verdict = services(request).health.ready()
    return JSONResponse(verdict.body("ready", "not ready"), status_code=200 if verdict.ok else 503)


async def metrics(request: Request) -> Response:
    svc = services(request)
    await svc.auth.authenticate(request)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


# A pod's forwarded port answers whatever the pod's server answers.
_ANY = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

ROUTES = [
    Route("/v1/run/{app}/{name}", run, methods=["POST"]),
    WebSocketRoute("/v1/ws/{app}/{name}", ws_session),
    Route("/v1/pods", pods.create_pod, methods=["POST"]),
    Route("/v1/pods", pods.list_pods, methods=["GET"]),
    Route("/v1/pods/{pod_id}", pods.get_pod, methods=["GET"]),
    Route("/v1/pods/{pod_id}", pods.delete_pod, methods=["DELETE"]),
    Route("/v1/pods/{pod_id}/stop", pods.stop_pod, methods=["POST"]),
    Route("/v1/pods/{pod_id}/start", pods.start_pod, methods=["POST"]),
    WebSocketRoute("/v1/pods/{pod_id}/terminal", pods.pod_terminal),
    WebSocketRoute("/v1/pods/{pod_id}/tunnel/{port}", pod_ports.tunnel),
    Route("/v1/pods/{pod_id}/ports/{port}/{path:path}", pod_ports.forward_http, methods=_ANY),
    WebSocketRoute("/v1/pods/{pod_id}/ports/{port}/{path:path}", pod_ports.forward_websocket),
    Route("/v1/spawn/{app}/{name}", jobs.spawn, methods=["POST"]),
    Route("/v1/customers", access.create_customer, methods=["POST"]),
    Route("/v1/customers", access.list_customers, methods=["GET"]),
    Route("/v1/customers/{customer_id}", access.get_customer, methods=["GET"]),
    Route("/v1/customers/{customer_id}", access.patch_customer, methods=["PATCH"]),
    Route("/v1/plans", plans.list_plans, methods=["GET"]),
    Route("/v1/plans", plans.create_plan, methods=["POST"]),
    Route("/v1/plans/{name}", plans.get_plan, methods=["GET"]),
    Route("/v1/plans/{name}", plans.patch_plan, methods=["PATCH"]),
    Route("/v1/keys", access.create_key, methods=["POST"]),
    Route("/v1/keys", access.list_keys, methods=["GET"]),
    Route("/v1/keys/{key_id}", access.revoke_key, methods=["DELETE"]),
    Route("/v1/keys/{key_id}/rotate", access.rotate_key, methods=["POST"]),
    Route("/v1/calls/{call_id}", jobs.get_call, methods=["GET"]),
    Route("/v1/calls/{call_id}/result", jobs.get_result, methods=["GET"]),
    Route("/v1/calls/{call_id}/cancel", jobs.cancel_call, methods=["POST"]),
    Route("/v1/apps", control.deploy_app, methods=["POST"]),
    Route("/v1/apps", control.list_apps, methods=["GET"]),
    Route("/v1/apps/{app}", control.delete_app, methods=["DELETE"]),
    Route("/v1/functions", control.list_functions, methods=["GET"]),
    Route("/v1/functions/{app}/{name}", control.get_function, methods=["GET"]),
    Route("/v1/functions/{app}/{name}", control.patch_function, methods=["PATCH"]),
    Route("/v1/functions/{app}/{name}/replicas", control.list_replicas, methods=["GET"]),
    Route("/v1/functions/{app}/{name}/calls", invocations.list_calls, methods=["GET"]),
    Route("/v1/functions/{app}/{name}/stats", invocations.function_stats, methods=["GET"]),
    Route("/v1/functions/{app}/{name}/logs", function_logs, methods=["GET"]),
    Route("/v1/abuse", list_abuse, methods=["GET"]),
    Route("/v1/nodes", nodes.list_nodes, methods=["GET"]),
    Route("/v1/queues", nodes.list_queues, methods=["GET"]),
    Route("/v1/billing/balance", billing.balance, methods=["GET"]),
    Route("/v1/billing/settings", billing.patch_settings, methods=["PATCH"]),
    Route("/v1/billing/credits", billing.credit, methods=["POST"]),
    Route("/v1/billing/transactions", billing.transactions, methods=["GET"]),
    Route("/v1/billing/usage", billing_reports.usage, methods=["GET"]),
    Route("/v1/billing/revenue", billing_reports.revenue, methods=["GET"]),
    Route("/v1/billing/revenue/plans", invoices.plan_revenue, methods=["GET"]),
    Route("/v1/billing/invoices", invoices.list_invoices, methods=["GET"]),
    Route("/v1/billing/invoices/{invoice_id}", invoices.get_invoice, methods=["GET"]),
    Route("/v1/billing/invoices/{invoice_id}/payments", invoices.pay_invoice, methods=["POST"]),
    Route("/v1/billing/close", invoices.close, methods=["POST"]),
    Route("/v1/billing/topups", billing.create_topup, methods=["POST"]),
    Route("/v1/billing/stripe/webhook", billing.stripe_webhook, methods=["POST"]),
    *OPENAI_ROUTES,
    Route("/v1/catalog", deployments.catalog, methods=["GET"]),
    Route("/v1/deployments", deployments.create_deployment, methods=["POST"]),
    Route("/v1/deployments", deployments.list_deployments, methods=["GET"]),
    Route("/v1/deployments/{deployment_id}", deployments.get_deployment, methods=["GET"]),
    Route("/v1/deployments/{deployment_id}", deployments.delete_deployment, methods=["DELETE"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    console_mount(),
]


_FAMILIES = frozenset(
    {"/v1/run", "/v1/apps", "/v1/functions", "/healthz", "/readyz", "/metrics", "/openapi.json"}
)


class CountRequests:
    """Counts responses by route family and status; a pure ASGI wrapper, so it costs almost
    nothing on the warm path."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics, abuse: list[AbuseSignals]) -> None:
        self.app = app
        self.metrics = metrics
        self.abuse = abuse  # filled by the lifespan (Redis is connected there)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts = scope["path"].split("/")
        family = "/".join(parts[:3]) if len(parts) > 2 else scope["path"]
        if family not in _FAMILIES:
            family = "other"  # arbitrary paths must not grow the label set

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.count_request(family, status)
                if status >= 400 and self.abuse:
                    customer = scope.get(SCOPE_CUSTOMER)
                    if customer is not None:
                        self.abuse[0].record(customer[0], customer[1], status)
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(
    settings: Settings,
    metrics_also: Sequence[CollectorRegistry] = (),
    nats_metrics: NatsMetrics | None = None,
    *,
    health: Health | None = None,
) -> Starlette:
    """`nats_metrics`: the NATS connection metrics of the process, when the router shares it
    with other parts (`kiln dev`); rendered at /metrics either way. `health`: the process's,
    when the router is one part of it; else the router keeps its own."""
    nats_metrics = nats_metrics or NatsMetrics()
    router_metrics = RouterMetrics(also=[*metrics_also, nats_metrics.registry])
    abuse: list[AbuseSignals] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as exits:
            try:
                own = health or await open_health(exits, settings)
                app.state.services = await open_services(
                    exits, settings, metrics=router_metrics, nats_metrics=nats_metrics, health=own
                )
            except BaseException as exc:
                app.state.startup_error = exc  # for whoever started the server (kiln.router.server)
                raise
            abuse.append(app.state.services.abuse)
            yield

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        # KilnError is an answer, handled inside the app; only other exceptions (bugs) reach
        # Starlette's outermost handler, which also logs them.
        exception_handlers={
            HTTPException: handle_http_exception,
            KilnError: handle_exception,
            Exception: handle_exception,
        },
    )
    app.add_middleware(CountRequests, metrics=router_metrics, abuse=abuse)
    return app
