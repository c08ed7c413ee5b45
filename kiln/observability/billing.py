"""Billing metrics, recorded by the billing worker and the Stripe outbox worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BillingMetrics"]


class BillingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.usage_reports = Counter(
            "kiln_billing_usage_reports",
            "Usage reports consumed, by outcome (charged, duplicate, refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.ledger_lag = Gauge(
            "kiln_billing_ledger_lag_seconds",
            "Age of the newest usage interval end the ledger has charged, at its charge.",
            registry=self.registry,
        )
        self.outbox_sent = Counter(
            "kiln_billing_outbox_sent",
            "Stripe calls from the outbox that Stripe acknowledged, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.outbox_failures = Counter(
            "kiln_billing_outbox_failures",
            "Stripe calls from the outbox that failed and wait for a retry, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.outbox_oldest = Gauge(
            "kiln_billing_outbox_oldest_unsent_seconds",
            "Age of the oldest outbox entry Stripe has not acknowledged (0 when none); "
            "alert above 1800.",
            registry=self.registry,
        )
        self.blocked_customers = Gauge(
            "kiln_billing_blocked_customers",
            "Customers whose calls get 402, by reason (balance, spend_cap, invoice).",
            ["reason"],
            registry=self.registry,
        )
        # By tier and GPU type, never by customer: per customer, the ledger's tables answer.
        self.replica_seconds = Counter(
            "kiln_billing_replica_seconds",
            "Replica time charged, by the customer's tier and the replica's GPU type (none: a CPU "
            "slot; other: a type without a price).",
            ["tier", "gpu"],
            registry=self.registry,
        )
        self.charged = Counter(
            "kiln_billing_charged_micros",
            "Usage charged, in micro-units of KILN_CURRENCY, by the customer's tier and the "
            "replica's GPU type.",
            ["tier", "gpu"],
            registry=self.registry,
        )
        self.invoices = Counter(
            "kiln_billing_invoices",
            "Invoices issued by period closes, by how they are settled (collect: to be paid; "
            "balance: a prepaid customer's statement).",
            ["settlement"],
            registry=self.registry,
        )
        self.invoiced = Counter(
            "kiln_billing_invoiced_micros",
            "What issued invoices total, in micro-units of KILN_CURRENCY, by settlement.",
            ["settlement"],
            registry=self.registry,
        )
        self.invoices_overdue = Gauge(
            "kiln_billing_invoices_overdue",
            "Open invoices past KILN_INVOICE_GRACE_DAYS (their customers are blocked).",
            registry=self.registry,
        )
