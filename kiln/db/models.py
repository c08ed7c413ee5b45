"""Every table, importable from one place. Importing this module registers them all on
`Base.metadata`, which Alembic compares against the database."""

from __future__ import annotations

from kiln.db.base import Base
from kiln.db.models_access import ApiKey, Customer
from kiln.db.models_apps import App, AppVersion, Function
from kiln.db.models_billing import (
    DailySpend,
    LedgerEntry,
    Payment,
    PeriodRequests,
    Plan,
    StripeEvent,
    StripeOutbox,
    UsageEvent,
)
from kiln.db.models_calls import Call, Invocation
from kiln.db.models_compute import Node, Replica
from kiln.db.models_console import ConsoleSession, MailToken, User
from kiln.db.models_invoices import Invoice, InvoiceCounter, InvoiceLine, PeriodClose
from kiln.db.models_pods import Pod, StorageCharge

__all__ = [
    "ApiKey",
    "App",
    "AppVersion",
    "Base",
    "Call",
    "ConsoleSession",
    "Customer",
    "DailySpend",
    "Function",
    "Invocation",
    "Invoice",
    "InvoiceCounter",
    "InvoiceLine",
    "LedgerEntry",
    "MailToken",
    "Node",
    "Payment",
    "PeriodClose",
    "PeriodRequests",
    "Plan",
    "Pod",
    "Replica",
    "StorageCharge",
    "StripeEvent",
    "StripeOutbox",
    "UsageEvent",
    "User",
]
