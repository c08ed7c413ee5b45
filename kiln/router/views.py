"""The response bodies of the customer and control API, declared once: the handlers build these
and `/openapi.json` shows their schemas. Times are ISO 8601 strings as the handlers write them
(`datetime.isoformat()`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from kiln.db.enums import (
    ApiKeyKind,
    AppState,
    CallStatus,
    CustomerStatus,
    CustomerTier,
    FunctionKind,
    InvocationKind,
    InvocationStatus,
    LedgerKind,
    NodeState,
    ReplicaState,
)
from kiln.router.validation import View

__all__ = [
    "AbuseReport",
    "Account",
    "AppList",
    "AppView",
    "CallView",
    "CustomerList",
    "CustomerView",
    "Deployed",
    "FunctionList",
    "FunctionView",
    "InvocationView",
    "Invocations",
    "Key",
    "KeyList",
    "NewKey",
    "ReplicaList",
    "Report",
    "RotatedKey",
    "Spawned",
    "Topup",
    "Transactions",
    "WebhookReceived",
]

Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def dump(view: View, *, exclude_none: bool = False, exclude_unset: bool = False) -> dict[str, Any]:
    """`view` as the JSON an answer carries."""
    return view.model_dump(mode="json", exclude_none=exclude_none, exclude_unset=exclude_unset)


# Customers and keys --------------------------------------------------------------------------


class Limits(View):
    per_minute: int
    per_day: int | None
    per_month: int | None
    concurrent: int
    max_replicas: int
    burst: int = Field(description="Requests at once (a minute's worth unless set).")
    prepaid: bool
    max_pods: int = Field(description="Pods and shells starting or running at once.")
    max_pod_gpus: int = Field(description="GPUs those pods hold together.")


class PlanView(View):
    name: str
    title: str
    tier: CustomerTier = Field(description="Whose limits the plan's customers get.")
    monthly_fee_micros: int
    request_price_micros: int
    included_requests: int = Field(description="Requests each month without the request price.")
    gpu_prices: dict[str, int] = Field(
        description="Micro-units per hour where the plan's differ from the platform's."
    )
    limits: Limits = Field(description="The tier's limits (each customer may have overrides).")
    customers: int


class PlanList(View):
    plans: list[PlanView]


class CustomerView(View):
    id: str
    name: str
    plan: str
    tier: CustomerTier
    status: CustomerStatus
    created_at: Time
    limits: Limits = Field(description="The tier's limits with this customer's overrides.")
    limit_overrides: dict[str, Any]
    active_keys: int


class CustomerList(View):
    customers: list[CustomerView]


class Key(View):
    id: str
    kind: ApiKeyKind
    customer_id: str | None
    function: str | None = Field(description="APP/NAME, for a function-scoped key.")
    name: str
    prefix: str
    created_at: Time
    expires_at: Time | None
    revoked_at: Time | None


class NewKey(Key):
    key: str = Field(description="The key itself, shown in this answer only.")


class RotatedKey(NewKey):
    replaces: str = Field(description="The id of the key revoked.")


class KeyList(View):
    keys: list[Key]


# Apps and functions --------------------------------------------------------------------------


class Endpoint(View):
    name: str
    url: str


class Deployed(View):
    app: str
    version: int
    unchanged: bool
    endpoints: list[Endpoint]
    kept_settings: dict[str, dict[str, int | None]] = Field(
        description="Per function, the live settings the deploy kept over the code's values."
    )


class AppView(View):
    name: str
    state: AppState
    version: int | None
    digest: str | None
    updated_at: Time


class AppList(View):
    apps: list[AppView]


class FunctionView(View):
    app: str
    name: str
    kind: FunctionKind
    gpu: str
    min_replicas: int
    max_replicas: int
    buffer_replicas: int
    idle_timeout: int
    concurrency: int
    target_concurrency: int
    timeout: int
    startup_timeout: int
    overridden: list[str]
    replicas: int
    last_error: str | None = Field(description="Why the newest replica failed, if it did.")


class FunctionList(View):
    functions: list[FunctionView]


class ReplicaView(View):
    id: str
    state: ReplicaState
    node: str
    gpu: str | None
    gpu_indices: list[int]
    in_flight: int
    origin: str | None
    started_at: Time
    ready_at: Time | None
    uptime_s: float
    idle_s: float | None


class ReplicaList(View):
    replicas: list[ReplicaView]


class InvocationView(View):
    id: int
    call_id: str | None
    request_id: str | None
    kind: InvocationKind
    method: str | None
    status: InvocationStatus
    error_code: str | None
    customer_id: str | None
    version_id: str | None
    replica_id: str | None
    started_at: Time
    queue_wait_ms: int | None
    execution_ms: int | None
    duration_ms: int | None
    bytes_in: int
    bytes_out: int
    cold_start: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    voice_turns: list[dict[str, Any]] | None = None


class Invocations(View):
    calls: list[InvocationView]
    next_before: int | None


class CallStats(View):
    """Calls over a span of time: how many, how many failed or started a replica, and how long
    they took (ms from the router taking the call to its answer)."""

    requests: int
    errors: int
    cold_starts: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class HourStats(CallStats):
    hour: Time  # the hour's start


class FunctionStats(View):
    hours: int
    total: CallStats
    by_hour: list[HourStats] = Field(description="Hours with calls, oldest first.")


# Jobs ----------------------------------------------------------------------------------------


class Spawned(View):
    call_id: str
    status: CallStatus


class CallError(View):
    code: str
    message: str | None


class CallView(View):
    """A job (`kiln.jobs.records.call_view`); `result_url` and `result` once it succeeded."""

    call_id: str
    function: str
    status: CallStatus
    attempts: int
    max_attempts: int
    created_at: Time | None
    started_at: Time | None
    finished_at: Time | None
    expires_at: Time | None
    error: CallError | None
    result_url: str | None = None
    result: Any = Field(default=None, description="A JSON result of up to 1 MiB.")


# Abuse and billing ---------------------------------------------------------------------------


class NodeReplica(View):
    id: str
    function: str  # APP/NAME
    customer_id: str
    state: ReplicaState
    gpu_indices: list[int]
    in_flight: int


class NodeView(View):
    id: str
    hostname: str
    state: NodeState
    gpu_type: str | None = Field(description="null for a CPU-only host")
    gpu_count: int
    gpus_used: int
    cpu_slots: int
    last_heartbeat_at: Time | None
    replicas: list[NodeReplica]


class NodeList(View):
    nodes: list[NodeView]


class QueueView(View):
    function: str  # APP/NAME
    customer_id: str
    queued: int = Field(description="Calls waiting or running that no replica has finished.")
    replicas: int


class QueueList(View):
    queues: list[QueueView]


class AbuseCount(View):
    customer_id: str
    total: int
    refused: int
    rate_limited: int
    errors: int


class AbuseReport(View):
    window_s: int
    customers: list[AbuseCount]


class Account(View):
    customer_id: str
    currency: str
    balance_micros: int
    spent_today_micros: int
    spend_cap_micros: int | None
    refill_threshold_micros: int | None
    refill_amount_micros: int | None
    refill_failures: int
    payment_method: bool
    blocked: str | None = Field(description='null, "balance", "spend_cap" or "invoice".')
    plan: str = Field(description="The plan the customer is on (GET /v1/plans/NAME).")


class Transaction(View):
    id: int
    kind: LedgerKind
    amount_micros: int
    balance_after_micros: int | None
    description: str
    created_at: Time


class Transactions(View):
    transactions: list[Transaction]


class Topup(View):
    payment_id: str
    amount_micros: int
    checkout_url: str | None = Field(default=None, description="Checkout: the page to pay on.")
    client_secret: str | None = Field(default=None, description="A PaymentIntent's, for Stripe.js.")


class Report(View):
    """Usage (`period`, `function`, `gpu_type` as grouped, `replica_seconds`, `calls`,
    `cost_micros`) or revenue (`period`, `tier`, `customers`, `replica_seconds`,
    `usage_revenue_micros`, `payments_micros`) rows; `format=csv` gives them as CSV."""

    rows: list[dict[str, Any]]


class WebhookReceived(View):
    received: bool
    duplicate: bool
