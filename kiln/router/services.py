"""What the router's handlers use, opened once per process by the application's lifespan
(kiln.router.startup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from kiln._health import Health
from kiln._nats import NatsLink
from kiln.router.auth import Authenticator
from kiln.router.billing_gate import BillingGate
from kiln.router.catalog import Catalog
from kiln.router.deploy import Deployer
from kiln.router.dispatch import Dispatcher
from kiln.router.metrics import RouterMetrics
from kiln.settings import Settings

if TYPE_CHECKING:
    from kiln.billing.stripe_gateway import StripeGateway
    from kiln.console.web import Console
    from kiln.observability.invocation_log import InvocationLog
    from kiln.router.abuse import AbuseSignals

__all__ = ["RouterServices", "services"]


@dataclass
class RouterServices:
    abuse: AbuseSignals
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    auth: Authenticator
    billing: BillingGate
    catalog: Catalog
    dispatcher: Dispatcher
    deployer: Deployer
    metrics: RouterMetrics
    invocations: InvocationLog
    health: Health
    link: NatsLink
    stripe: StripeGateway | None = None  # None: payments are not set up
    console: Console | None = None  # set once the rest is open (it uses the rest)


def services(conn: HTTPConnection) -> RouterServices:
    svc: RouterServices = conn.app.state.services
    return svc
