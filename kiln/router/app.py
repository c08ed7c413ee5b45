"""The router application: routes, error handling and the lifespan that connects it to NATS
and PostgreSQL.

`create_app(settings)` builds everything in its lifespan; the phases of shutdown (stop taking
requests, let calls in flight finish, close NATS and the database) follow uvicorn's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import nats
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln._nats import connect_options
from kiln.billing.stripe_gateway import StripeGateway
from kiln.billing.worker import ensure_usage_stream
from kiln.codestore import CodeStore
from kiln.db.session import create_engine, session_factory
from kiln.errors import KilnError
from kiln.jobs.streams import ensure_job_streams
from kiln.observability.invocation_log import InvocationLog, InvocationLogMetrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.router import access, billing, billing_reports, control, invocations, jobs
from kiln.router.abuse import SCOPE_CUSTOMER, AbuseSignals, list_abuse
from kiln.router.auth import Authenticator
from kiln.router.billing_gate import BillingGate
from kiln.router.catalog import Catalog
from kiln.router.deploy import Deployer
from kiln.router.dispatch import Dispatcher, ensure_calls_stream
from kiln.router.errors import handle_exception, handle_http_exception
from kiln.router.function_logs import ensure_logs_stream, function_logs
from kiln.router.limits import Limiter
from kiln.router.metrics import CONTENT_TYPE_LATEST, RouterMetrics
from kiln.router.openapi import openapi_document
from kiln.router.run import run
from kiln.router.services import RouterServices, services
from kiln.router.websocket import ws_session
from kiln.seal import Seals
from kiln.settings import Settings, Switch
from kiln.wire import Subjects

__all__ = ["create_app"]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    ready = svc.dispatcher.nc.is_connected
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "nats": ready},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Response:
    svc = services(request)
    await svc.auth.authenticate(request)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


ROUTES = [
    Route("/v1/run/{app}/{name}", run, methods=["POST"]),
    WebSocketRoute("/v1/ws/{app}/{name}", ws_session),
    Route("/v1/spawn/{app}/{name}", jobs.spawn, methods=["POST"]),
    Route("/v1/customers", access.create_customer, methods=["POST"]),
    Route("/v1/customers", access.list_customers, methods=["GET"]),
    Route("/v1/customers/{customer_id}", access.get_customer, methods=["GET"]),
    Route("/v1/customers/{customer_id}", access.patch_customer, methods=["PATCH"]),
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
    Route("/v1/functions/{app}/{name}/logs", function_logs, methods=["GET"]),
    Route("/v1/abuse", list_abuse, methods=["GET"]),
    Route("/v1/billing/balance", billing.balance, methods=["GET"]),
    Route("/v1/billing/settings", billing.patch_settings, methods=["PATCH"]),
    Route("/v1/billing/credits", billing.credit, methods=["POST"]),
    Route("/v1/billing/transactions", billing.transactions, methods=["GET"]),
    Route("/v1/billing/usage", billing_reports.usage, methods=["GET"]),
    Route("/v1/billing/revenue", billing_reports.revenue, methods=["GET"]),
    Route("/v1/billing/topups", billing.create_topup, methods=["POST"]),
    Route("/v1/billing/stripe/webhook", billing.stripe_webhook, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
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
) -> Starlette:
    """`nats_metrics`: the NATS connection metrics of the process, when the router shares it
    with other parts (`kiln dev`); rendered at /metrics either way."""
    nats_metrics = nats_metrics or NatsMetrics()
    router_metrics = RouterMetrics(also=[*metrics_also, nats_metrics.registry])
    abuse: list[AbuseSignals] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        subjects = Subjects(settings.namespace)
        engine = create_engine(settings, application_name="kiln-router")
        reconnected: list[Callable[[], None]] = []

        async def on_reconnected() -> None:
            for callback in reconnected:
                callback()

        nc = await nats.connect(
            **connect_options(settings, name="kiln-router"),
            **nats_metrics.callbacks(NatsProcess.ROUTER, reconnected=on_reconnected),
        )
        redis = (
            aioredis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            if settings.redis_url
            else None
        )
        js = nc.jetstream()
        await ensure_calls_stream(js, subjects)
        await ensure_job_streams(js, subjects)
        await ensure_usage_stream(js, subjects)
        await ensure_logs_stream(js, subjects, settings)
        sessions = session_factory(engine)
        seals = Seals(settings.snapshot_signing_key)
        dispatcher = Dispatcher(nc, subjects, seals=seals)
        await dispatcher.start()
        limiter = Limiter(
            redis,
            settings.redis_prefix,
            settings.tier_limits,
            on_fallback=router_metrics.set_rate_limit_fallback,
            on_limited=router_metrics.count_rate_limited,
        )
        await limiter.start(nc, subjects.routers, seals=seals)
        auth = Authenticator(
            sessions,
            settings.require("api_key_pepper"),
            redis=redis,
            redis_prefix=settings.redis_prefix,
            on_reject=router_metrics.count_auth_rejection,
            limiter=limiter,
        )
        await auth.start(nc, subjects.access_revoked, seals=seals)
        gate = BillingGate(sessions)
        await gate.start(nc, subjects.billing_blocks, seals=seals)
        reconnected.append(auth.on_reconnected)
        abuse.append(
            AbuseSignals(redis, settings.redis_prefix, router_metrics.count_customer_rejection)
        )
        call_log = InvocationLog(
            engine,
            InvocationLogMetrics(router_metrics.registry),
            retention_s=settings.invocation_retention_s,
            enabled=settings.invocation_log is Switch.ON,
        )
        call_log.start()
        app.state.services = RouterServices(
            abuse=abuse[0],
            settings=settings,
            sessions=sessions,
            auth=auth,
            billing=gate,
            catalog=Catalog(sessions),
            dispatcher=dispatcher,
            deployer=Deployer(
                sessions, js, subjects, CodeStore(js, subjects), max_replicas=settings.max_replicas
            ),
            metrics=router_metrics,
            invocations=call_log,
            stripe=StripeGateway(settings) if settings.stripe_enabled else None,
        )
        try:
            yield
        finally:
            if app.state.services.stripe is not None:
                await app.state.services.stripe.close()
            await dispatcher.close()
            await call_log.close()  # after the last calls were answered and recorded
            await gate.close()
            await limiter.close()
            await nc.drain()
            if redis is not None:
                await redis.aclose()
            await engine.dispose()

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
