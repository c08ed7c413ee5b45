"""The closed sets stored in the database, as the lowercase strings the rows hold.

This module imports nothing heavy, so code that only needs the values (wire messages, the CLI's
output) can use them without SQLAlchemy.
"""

from __future__ import annotations

import enum

__all__ = [
    "ACTIVE_POD_STATES",
    "LIVE_REPLICA_STATES",
    "ApiKeyKind",
    "AppState",
    "CallStatus",
    "CustomerStatus",
    "CustomerTier",
    "FunctionKind",
    "InvocationKind",
    "InvocationStatus",
    "LedgerKind",
    "MailPurpose",
    "NodeState",
    "PodKind",
    "PodState",
    "ReplicaState",
    "ScalingSetting",
    "UserRole",
    "WebhookState",
]


class CustomerTier(enum.StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class CustomerStatus(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class ApiKeyKind(enum.StrEnum):
    OPERATOR = "operator"  # the whole platform; belongs to no customer
    ACCOUNT = "account"  # everything one customer owns
    FUNCTION = "function"  # calls to one function only


class AppState(enum.StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"


class FunctionKind(enum.StrEnum):
    """How a function is called, which decides the routes that serve it."""

    FUNCTION = "function"  # one reply per call
    GENERATOR = "generator"  # a stream of chunks per call
    WEBSOCKET = "websocket"  # a bidirectional session
    CLASS = "class"  # a class whose methods are the entry points (kiln.functions.spec)


class ScalingSetting(enum.StrEnum):
    """The function settings an operator may change live (see `Function.overridden`)."""

    MIN_REPLICAS = "min_replicas"
    MAX_REPLICAS = "max_replicas"
    BUFFER_REPLICAS = "buffer_replicas"
    IDLE_TIMEOUT_S = "idle_timeout_s"
    CONCURRENCY = "concurrency"
    TARGET_CONCURRENCY = "target_concurrency"
    TIMEOUT_S = "timeout_s"
    STARTUP_TIMEOUT_S = "startup_timeout_s"
    RETRIES = "retries"
    MEMORY_MB = "memory_mb"


class NodeState(enum.StrEnum):
    READY = "ready"
    DRAINING = "draining"
    LOST = "lost"


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    RESTORING = "restoring"  # putting its snapshot back (kiln.invoker.coldstart)
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"


class PodKind(enum.StrEnum):
    SHELL = "shell"  # `kiln shell`: a fresh replica of a function, gone when its terminal ends
    POD = "pod"  # a reserved slot that runs until stopped


class PodState(enum.StrEnum):
    STARTING = "starting"  # wants its slot: the scheduler starts (or restarts) its replica
    RUNNING = "running"  # its replica is ready
    STOPPED = "stopped"  # its slot was given back; it may start again
    ENDED = "ended"  # a shell whose terminal ended (or whose replica did): never again


# A pod in one of these states wants a replica.
ACTIVE_POD_STATES = (PodState.STARTING, PodState.RUNNING)


# A replica in one of these states holds its slot (and is billed); the others have ended.
LIVE_REPLICA_STATES = (
    ReplicaState.STARTING,
    ReplicaState.RESTORING,
    ReplicaState.READY,
    ReplicaState.DRAINING,
)


class CallStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class WebhookState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class InvocationKind(enum.StrEnum):
    SYNC = "sync"
    STREAM = "stream"
    WEBSOCKET = "websocket"
    JOB = "job"


class InvocationStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # `error_code` says why, in the API's error codes (timeout, worker_lost…)
    CANCELLED = "cancelled"


class LedgerKind(enum.StrEnum):
    USAGE = "usage"
    TOPUP = "topup"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"
    REFILL = "refill"
    FEE = "fee"  # a plan's monthly fee, charged at the start of each period
    PRORATION = "proration"  # a plan change within a period: the old fee's unused part back,
    # the new one's for the rest of the period
    PAYMENT = "payment"  # an invoice paid (through Stripe, or recorded by an operator)
    STORAGE = "storage"  # a pod's volume, per GB-hour


class PaymentKind(enum.StrEnum):
    TOPUP = "topup"  # the customer pays, through Checkout or a PaymentIntent
    REFILL = "refill"  # charged off-session when the balance fell below the threshold


class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"  # final: credited once
    FAILED = "failed"


class OutboxKind(enum.StrEnum):
    METER_EVENT = "meter_event"  # usage, for Stripe Billing meters
    REFILL = "refill"  # an off-session PaymentIntent for an auto-refill
    INVOICE = "invoice"  # a finalised invoice, issued as a Stripe invoice
    INVOICE_PAYMENT = "invoice_payment"  # an attempt to collect an open invoice


class UserRole(enum.StrEnum):
    """What a console user is: the owner or a member of one customer, or an operator of the
    whole platform (who belongs to no customer)."""

    OWNER = "owner"  # everything the customer has, its members and its money included
    MEMBER = "member"  # the customer's deployments, keys and logs; not its members or money
    OPERATOR = "operator"


class MailPurpose(enum.StrEnum):
    """What a link sent by mail does when followed (each link works once)."""

    VERIFY = "verify"  # confirms a new user's address
    RESET = "reset"  # sets a new password
    INVITE = "invite"  # joins a customer as a member


class InvoiceStatus(enum.StrEnum):
    DRAFT = "draft"  # only inside the transaction that closes the period: never seen outside
    OPEN = "open"  # finalised, waiting for its payment
    PAID = "paid"


class Settlement(enum.StrEnum):
    """How an invoice is paid: collected (a postpaid plan: Stripe or a transfer) or already paid
    from the prepaid balance the charges were debited from (the invoice is a statement)."""

    COLLECT = "collect"
    BALANCE = "balance"


class InvoiceLineKind(enum.StrEnum):
    FEE = "fee"  # the plan's monthly fee
    PRORATION = "proration"  # a plan change within the period
    GPU = "gpu"  # replica time of one GPU type (or CPU slots)
    MINIMUM = "minimum"  # replica time charged up to the minimum charge
    REQUESTS = "requests"  # requests past the plan's included ones
    ADJUSTMENT = "adjustment"  # an operator's credit or debit
    REFUND = "refund"
    ROUNDING = "rounding"  # the total down to a whole cent
    STORAGE = "storage"  # pods' volumes, per GB-hour
