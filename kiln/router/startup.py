"""Opening what the router's handlers use (`RouterServices`), on the exit stack of the
application's lifespan, so that it all closes in reverse order when the router stops."""

from __future__ import annotations

import contextlib
from typing import Any

from kiln._health import Health
from kiln._service import open_database, open_nats, open_redis, push_bounded
from kiln.billing.stripe_gateway import StripeGateway
from kiln.codestore import code_store
from kiln.console.accounts import Accounts
from kiln.console.mail import Mailer
from kiln.console.sessions import SessionStore
from kiln.console.throttle import Throttle
from kiln.console.web import Console
from kiln.db.session import session_factory
from kiln.observability.invocation_log import InvocationLog, InvocationLogMetrics
from kiln.observability.nats import NatsMetrics, NatsProcess
from kiln.router.abuse import AbuseSignals
from kiln.router.access import CustomerMaker
from kiln.router.auth import Authenticator
from kiln.router.billing_gate import BillingGate
from kiln.router.catalog import Catalog
from kiln.router.deploy import Deployer
from kiln.router.dispatch import Dispatcher
from kiln.router.limits import Limiter
from kiln.router.metrics import RouterMetrics
from kiln.router.services import RouterServices
from kiln.seal import Seals
from kiln.settings import Environment, Settings, Switch
from kiln.streams import CALLS, LOGS, USAGE, ensure_job_streams, ensure_stream
from kiln.wire import Subjects

__all__ = ["open_services"]


async def open_services(
    exits: contextlib.AsyncExitStack,
    settings: Settings,
    *,
    metrics: RouterMetrics,
    nats_metrics: NatsMetrics,
    health: Health,
) -> RouterServices:
    """Open what the router needs, each registered on `exits` as it opens. They close in
    reverse: the routers' announcements and the call dispatcher first (calls still waiting are
    answered "retry"), then the invocation log writes its last rows, then Redis, NATS and the
    database pool."""
    subjects = Subjects(settings.namespace)
    seals = Seals(settings.snapshot_signing_key)
    engine = open_database(exits, settings, application_name="kiln-router")
    sessions = session_factory(engine)
    link = await open_nats(
        exits, settings, NatsProcess.ROUTER, nats_metrics, health=health, name="kiln-router"
    )
    nc = link.client
    redis = open_redis(exits, settings)
    js = nc.jetstream()
    replicas = settings.stream_replicas
    ns = settings.namespace
    await ensure_stream(js, CALLS, ns, replicas=replicas)
    await ensure_job_streams(js, ns, replicas=replicas)
    await ensure_stream(js, USAGE, ns, replicas=replicas)
    await ensure_stream(
        js,
        LOGS,
        ns,
        replicas=replicas,
        max_bytes=settings.function_logs_max_bytes,
        max_age_s=settings.function_logs_max_age_s,
    )

    call_log = InvocationLog(
        engine,
        InvocationLogMetrics(metrics.registry),
        retention_s=settings.invocation_retention_s,
        enabled=settings.invocation_log is Switch.ON,
    )
    call_log.start()
    # After the last calls were answered: their rows are written before it stops.
    push_bounded(exits, call_log.close, "the invocation log", within_s=6)
    dispatcher = Dispatcher(nc, subjects, seals=seals, stream_replicas=replicas)
    await dispatcher.start()
    push_bounded(exits, dispatcher.close, "the call dispatcher")
    limiter = Limiter(
        redis,
        settings.redis_prefix,
        settings.tier_limits,
        on_fallback=metrics.set_rate_limit_fallback,
        on_limited=metrics.count_rate_limited,
    )
    await limiter.start(nc, subjects.routers, seals=seals)
    push_bounded(exits, limiter.close, "the rate limiter")
    auth = Authenticator(
        sessions,
        settings.require("api_key_pepper"),
        redis=redis,
        redis_prefix=settings.redis_prefix,
        on_reject=metrics.count_auth_rejection,
        limiter=limiter,
    )
    await auth.start(nc, subjects.access_revoked, seals=seals)
    link.on_reconnected(auth.on_reconnected)
    gate = BillingGate(sessions)
    await gate.start(nc, subjects.billing_blocks, seals=seals)
    push_bounded(exits, gate.close, "the billing gate")
    stripe = None
    if settings.stripe_enabled:
        stripe = StripeGateway(settings)
        push_bounded(exits, stripe.close, "the Stripe client")
    svc = RouterServices(
        abuse=AbuseSignals(redis, settings.redis_prefix, metrics.count_customer_rejection),
        settings=settings,
        sessions=sessions,
        auth=auth,
        billing=gate,
        catalog=Catalog(sessions),
        dispatcher=dispatcher,
        deployer=Deployer(
            sessions,
            js,
            subjects,
            code_store(settings, js),
            max_replicas=settings.max_replicas,
        ),
        metrics=metrics,
        invocations=call_log,
        health=health,
        link=link,
        stripe=stripe,
    )
    svc.console = open_console(svc, redis)
    return svc


def open_console(svc: RouterServices, redis: Any) -> Console:
    """The web console's parts. Its cookies are Secure wherever the platform is served over
    HTTPS, that is everywhere but `kiln dev` and the tests (plain HTTP on loopback)."""
    settings = svc.settings
    return Console(
        accounts=Accounts(svc.sessions, Mailer(settings), CustomerMaker(svc)),
        sessions=SessionStore(svc.sessions),
        throttle=Throttle(redis, settings.redis_prefix),
        secure_cookies=settings.env is Environment.PRODUCTION,
    )
