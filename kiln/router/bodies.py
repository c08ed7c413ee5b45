"""The request bodies and query strings of the customer and control API, declared once: these
models validate what comes in (`kiln.router.validation`) and are the JSON Schemas of
`/openapi.json` (`kiln.router.openapi`). The bodies of `/v1/run` and `/v1/spawn` are the user
function's own arguments and Stripe's webhook is Stripe's: neither is declared here.

Every field says what it allows in an `Expect`, the words of its refusal. Bounds that only
storage sets (PostgreSQL's 32-bit integers, a column's length) are declared too, so a value
past them is a 400 rather than a database error.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Annotated, Any, ClassVar, Literal

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from kiln.billing.reports import Granularity
from kiln.db.enums import ApiKeyKind, CustomerStatus, CustomerTier, InvocationKind, InvocationStatus
from kiln.errors import InvalidRequest, InvalidSpec, NotFound
from kiln.router.moments import Moment, MomentOrSpan
from kiln.router.validation import Body, Expect, Patch, Query
from kiln.tiers import ZERO_ALLOWED, TierLimits

__all__ = [
    "AbuseQuery",
    "AccountQuery",
    "CallsQuery",
    "CreditBody",
    "CustomerBody",
    "CustomerPatch",
    "DeployBody",
    "DeploymentBody",
    "FunctionPatch",
    "KeyBody",
    "KeysQuery",
    "LogsQuery",
    "OperatorSettingsPatch",
    "PodBody",
    "PodEnvironment",
    "RevenueQuery",
    "SettingsPatch",
    "SpawnQuery",
    "TopupBody",
    "TransactionsQuery",
    "UsageQuery",
]

INT4 = 2**31 - 1  # PostgreSQL's `integer`
MICROS = 2**62  # a balance's bound: far beyond any money, well inside a `bigint`
MIN_TOPUP_MICROS = 1_000_000  # one unit of the currency
MAX_TOPUP_MICROS = 100_000 * 1_000_000
MAX_POD_PORTS = 10
MAX_POD_VOLUME_GB = 10_000
MAX_AUTO_STOP_HOURS = 24 * 365
MAX_POD_REQUIREMENTS = 100
MAX_POD_GPUS = 16
_TEN_YEARS_S = 10 * 365 * 86400
ABUSE_BUCKET_S = 60  # abuse counters' resolution, and the shortest window asked of them
ABUSE_KEEP_S = 2 * 3600  # how long they are kept: the longest window


CustomerId = Annotated[
    uuid.UUID | None,
    # null is taken as absent, and not offered
    WithJsonSchema(
        {
            "type": "string",
            "format": "uuid",
            "description": "The customer (operator keys; an account key's own by default).",
        }
    ),
    Expect(message="customer {value!r} not found", error=NotFound),
]  # a malformed id names no customer: 404, as an unknown one


def _micros(low: int, high: int, *, nullable: bool) -> Expect:
    return Expect(f"whole micro-units from {low} to {high}" + (" or null" if nullable else ""))


# Customers and keys --------------------------------------------------------------------------

CustomerName = Annotated[
    StrictStr,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    Field(pattern=r"\S", description="Leading and trailing spaces are dropped."),
    Expect("1 to 200 characters"),
]
Tier = Annotated[CustomerTier, Expect(f"one of {', '.join(t.value for t in CustomerTier)}")]


PlanName = Annotated[
    StrictStr,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$"),
    Expect("1 to 64 lowercase letters, digits, '-' or '_', such as 'pro' or 'startup-2027'"),
]
Micros = Annotated[
    StrictInt, Field(ge=0, le=10**15), Expect("whole micro-units from 0 (1 USD = 1,000,000)")
]


class CustomerBody(Body):
    """`POST /v1/customers`."""

    name: CustomerName
    plan: PlanName = "free"  # or a tier, which names its default plan
    tier: Tier = CustomerTier.FREE


def _limits_schema(schema: dict[str, Any]) -> None:
    """The overrides a customer's `limits` take: TierLimits' fields, each optional."""
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(TierLimits):
        if field.name == "prepaid":
            properties[field.name] = {"type": "boolean"}
        elif "None" in str(field.type):
            properties[field.name] = {"type": ["integer", "null"], "minimum": 1}
        else:
            least = 0 if field.name in ZERO_ALLOWED else 1
            properties[field.name] = {"type": "integer", "minimum": least}
    schema.clear()
    schema.update(
        {
            "type": ["object", "null"],
            "properties": properties,
            "additionalProperties": False,
            "description": "Changes to the tier's limits for this customer (null: none).",
        }
    )


class CustomerPatch(Patch):
    """`PATCH /v1/customers/ID`: any of these; `limits` are checked against the tier."""

    not_object: ClassVar[str] = "send a JSON object"
    empty: ClassVar[str] = "cannot change nothing; changeable: plan, tier, status, name, limits"
    unknown: ClassVar[str] = "cannot change {unknown}; changeable: {known}"

    plan: PlanName = "free"
    tier: Tier = CustomerTier.FREE
    status: Annotated[CustomerStatus, Expect("active or disabled")] = CustomerStatus.ACTIVE
    name: CustomerName = "-"
    limits: Annotated[
        dict[str, Any] | None,
        Field(json_schema_extra=_limits_schema),
        Expect(
            message="limits are not valid: limits take "
            + ", ".join(f.name for f in dataclasses.fields(TierLimits))
            + ", got {value!r}"
        ),
    ] = None


PlanTitle = Annotated[
    StrictStr, StringConstraints(max_length=200), Expect("at most 200 characters")
]
Requests = Annotated[StrictInt, Field(ge=0), Expect("a whole number from 0")]
GpuPrices = Annotated[
    dict[str, Micros],
    Expect("an object of GPU types (or 'none') to micro-units per hour, each from 0"),
]


class PlanBody(Body):
    """`POST /v1/plans`: a plan; what it leaves out is free (no fee, no per-request price,
    the platform's GPU prices). Its customers get the limits of `tier`."""

    name: PlanName
    title: PlanTitle = ""
    tier: Tier = CustomerTier.FREE
    monthly_fee_micros: Micros = 0
    request_price_micros: Micros = 0
    included_requests: Requests = 0
    gpu_prices: GpuPrices = Field(default_factory=dict)


class PlanPatch(Patch):
    """`PATCH /v1/plans/NAME`: any of these; customers on the plan pay the new prices from now
    on (fees already charged stay as they were)."""

    not_object: ClassVar[str] = "send a JSON object"
    empty: ClassVar[str] = (
        "cannot change nothing; changeable: title, tier, monthly_fee_micros, "
        "request_price_micros, included_requests, gpu_prices"
    )
    unknown: ClassVar[str] = "cannot change {unknown}; changeable: {known}"

    title: PlanTitle = ""
    tier: Tier = CustomerTier.FREE
    monthly_fee_micros: Micros = 0
    request_price_micros: Micros = 0
    included_requests: Requests = 0
    gpu_prices: GpuPrices = Field(default_factory=dict)


class KeyBody(Body):
    """`POST /v1/keys`. Operator keys name the customer of an account or function key."""

    kind: Annotated[ApiKeyKind, Expect("account, function or operator")] = ApiKeyKind.ACCOUNT
    customer_id: CustomerId = None
    function: Annotated[
        StrictStr | None,
        Field(description="APP/NAME (a class: APP/Class): the function a function key calls."),
        Expect(
            message="function={value!r} is not valid: a function-scoped key needs the APP/NAME "
            "it may call (a class: APP/Class)"
        ),
    ] = None
    name: Annotated[StrictStr, Field(max_length=100), Expect("at most 100 characters")] = ""
    expires_in_s: Annotated[
        StrictInt | None,
        Field(ge=60, le=_TEN_YEARS_S),
        Expect("whole seconds from 60 to ten years"),
    ] = None


class KeysQuery(Query):
    """`GET /v1/keys`: operators may list one customer's."""

    customer_id: CustomerId = None


# Apps and functions --------------------------------------------------------------------------


def _spec_schema(schema: dict[str, Any]) -> None:
    """A function specification as the SDK writes it (`FunctionSpec.to_dict`)."""
    schema.clear()
    schema.update(
        {
            "type": "object",
            "required": ["version", "name", "kind", "entries", "resources"],
            "properties": {
                "version": {"const": 1},
                "name": {"type": "string"},
                "kind": {"enum": ["function", "class"]},
                "entries": {"type": "object", "additionalProperties": {"type": "object"}},
                "resources": {"type": "object"},
            },
        }
    )


class DeployBody(Body):
    """`POST /v1/apps`: what `kiln deploy` sends. The server checks each specification again
    (`kiln.router.deploy`), as `@app.function` does."""

    missing: ClassVar[str] = "the deploy body lacks {missing}"
    not_object: ClassVar[str] = "a deploy body is a JSON object; use `kiln deploy FILE`"

    app: Annotated[
        StrictStr,
        Field(pattern=r"^[a-z][a-z0-9-]{0,62}$"),
        Expect(
            message="app name {value!r} is not valid: use 1 to 63 lowercase letters, digits and "
            "hyphens, starting with a letter",
            error=InvalidSpec,
        ),
    ]
    digest: Annotated[
        StrictStr,
        Field(pattern=r"^[0-9a-f]{64}$", description="The archive's sha256, lowercase hex."),
        Expect(message="digest must be the sha256 of the archive in lowercase hex"),
    ]
    entrypoint: Annotated[
        StrictStr,
        Field(description="The app file's path inside the archive, such as app.py."),
        Expect(
            message="entrypoint {value!r} is not valid: expected the app file's relative path "
            "inside the archive, such as app.py"
        ),
    ]
    functions: Annotated[
        list[Annotated[dict[str, Any], Field(json_schema_extra=_spec_schema)]],
        Field(json_schema_extra={"minItems": 1}),
        Expect(
            message="a function specification is not valid: expected a list of JSON objects, "
            "got {value!r}",
            error=InvalidSpec,
        ),
    ]
    archive: Annotated[
        StrictStr,
        Field(description="The app's source as a base64 gzipped tar."),
        Expect(message="archive is not valid base64"),
    ]
    reset_scaling: Annotated[StrictBool, Expect("true or false")] = False


_Setting = Annotated[
    StrictInt,
    Field(ge=0, le=INT4),
    Expect("an integer >= 0", beyond=(("less_than_equal", f"an integer from 0 to {INT4}"),)),
]


class FunctionPatch(Patch):
    """`PATCH /v1/functions/APP/NAME`: scaling settings, live."""

    not_object: ClassVar[str] = (
        "send a JSON object with any of: min_replicas, max_replicas, buffer_replicas, "
        "idle_timeout, concurrency, target_concurrency, timeout, startup_timeout"
    )
    empty: ClassVar[str] = not_object
    unknown: ClassVar[str] = "cannot change {unknown}; changeable: {known}"

    min_replicas: _Setting = 0
    max_replicas: _Setting = 0
    buffer_replicas: _Setting = 0
    idle_timeout: _Setting = 0
    concurrency: _Setting = 0
    target_concurrency: _Setting = 0
    timeout: _Setting = 0
    startup_timeout: _Setting = 0


_MaybeSetting = Annotated[
    Annotated[StrictInt, Field(ge=0, le=INT4)] | None,
    Expect("an integer >= 0", beyond=(("less_than_equal", f"an integer from 0 to {INT4}"),)),
]


class DeploymentBody(Body):
    """`POST /v1/deployments`: a catalog entry deployed as an app. Absent fields take the
    entry's defaults (model, GPU) or the platform's (scaling)."""

    missing: ClassVar[str] = "a deployment needs {missing}; see GET /v1/catalog for the entries"
    unknown: ClassVar[str] = "unknown field {first!r}; fields are {known}"
    model_config = ConfigDict(extra="forbid", frozen=True)

    catalog: Annotated[
        StrictStr,
        Field(description="The catalog entry's slug, such as chat."),
        Expect("the slug of a catalog entry (GET /v1/catalog), such as 'chat'"),
    ]
    name: Annotated[
        StrictStr,
        Field(pattern=r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$", description="The app's name."),
        Expect(
            "1 to 63 lowercase letters, digits and hyphens, starting with a letter and not "
            "ending with a hyphen, such as 'my-chat'"
        ),
    ]
    model: Annotated[
        StrictStr | None,
        Field(min_length=1, max_length=512, description="A Hugging Face id or a model folder."),
        Expect("a Hugging Face model id or the path of a model folder on the nodes"),
    ] = None
    gpu: Annotated[
        StrictStr | None,
        Field(min_length=1, max_length=32, description="A GPU type, or none for CPU."),
        Expect("a GPU type such as 'L4' or 'H100', or 'none'"),
    ] = None
    min_replicas: _MaybeSetting = None
    max_replicas: _MaybeSetting = None
    idle_timeout: _MaybeSetting = None


class CallsQuery(Query):
    """`GET /v1/functions/APP/NAME/calls`."""

    limit: Annotated[int, Field(ge=1, le=1000), Expect("a whole number 1 to 1000")] = 50
    before: Annotated[
        int | None,
        Field(ge=1, le=2**63 - 1, description="The `next_before` of the page before."),
        Expect(f"a whole number 1 to {2**63 - 1}"),
    ] = None
    since: MomentOrSpan = None
    until: Moment = None
    status: Annotated[
        InvocationStatus | None,
        Expect(f"one of {', '.join(s.value for s in InvocationStatus)}"),
    ] = None
    kind: Annotated[
        InvocationKind | None, Expect(f"one of {', '.join(k.value for k in InvocationKind)}")
    ] = None


class StatsQuery(Query):
    """`GET /v1/functions/APP/NAME/stats`."""

    hours: Annotated[int, Field(ge=1, le=24 * 31), Expect("a whole number of hours, 1 to 744")] = 24


def _flag(value: Any) -> Any:
    return False if value == "" else value


class LogsQuery(Query):
    """`GET /v1/functions/APP/NAME/logs`."""

    since: MomentOrSpan = None
    follow: Annotated[bool, Expect("true or false")] = False
    request_id: Annotated[
        str | None, Field(max_length=128), Expect("a request id of at most 128 characters")
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _empty_flag_is_false(cls, data: Any) -> Any:
        if isinstance(data, dict) and "follow" in data:
            return {**data, "follow": _flag(data["follow"])}
        return data


# Jobs ----------------------------------------------------------------------------------------


class SpawnQuery(Query):
    """`POST /v1/spawn/APP/NAME` (the body is the function's arguments)."""

    webhook: Annotated[
        str | None,
        Field(
            max_length=2048,
            pattern=r"^https?://[^/?#\s]",
            description="Where to POST the job's view when it finishes.",
        ),
        Expect("an http:// or https:// URL of at most 2048 characters"),
    ] = None


# Abuse ---------------------------------------------------------------------------------------


class AbuseQuery(Query):
    """`GET /v1/abuse`."""

    window: Annotated[
        int,
        Field(ge=ABUSE_BUCKET_S, le=ABUSE_KEEP_S, description="Seconds back from now."),
        Expect(
            message="window={value!r} is not valid: expected seconds from "
            f"{ABUSE_BUCKET_S} to {ABUSE_KEEP_S}"
        ),
    ] = 3600


# Billing -------------------------------------------------------------------------------------


class AccountQuery(Query):
    """A billing route's query: operator keys name the customer."""

    customer_id: CustomerId = None


class SettingsPatch(Patch):
    """`PATCH /v1/billing/settings` with an account key."""

    unknown: ClassVar[str] = "unknown setting {first!r}; settings are {known}"
    unlisted: ClassVar[frozenset[str]] = frozenset({"customer_id"})

    customer_id: CustomerId = None
    spend_cap_micros: Annotated[
        StrictInt | None, Field(ge=0, le=MICROS), _micros(0, MICROS, nullable=True)
    ] = None
    refill_threshold_micros: Annotated[
        StrictInt | None, Field(ge=0, le=MICROS), _micros(0, MICROS, nullable=True)
    ] = None
    refill_amount_micros: Annotated[
        StrictInt | None,
        Field(ge=MIN_TOPUP_MICROS, le=MAX_TOPUP_MICROS),
        _micros(MIN_TOPUP_MICROS, MAX_TOPUP_MICROS, nullable=True),
    ] = None
    reset_refill_failures: Annotated[StrictBool, Expect("true or false")] = False

    @classmethod
    def known(cls) -> list[str]:
        return sorted(super().known())

    @model_validator(mode="after")
    def _refill_pair(self) -> SettingsPatch:
        pair = ("refill_threshold_micros", "refill_amount_micros")
        if self.model_fields_set & set(pair) and (
            (self.refill_threshold_micros is None) != (self.refill_amount_micros is None)
        ):
            raise InvalidRequest(
                "refill_threshold_micros and refill_amount_micros go together: give both "
                "(auto-refill on) or both null (off)"
            )
        return self


class OperatorSettingsPatch(SettingsPatch):
    """`PATCH /v1/billing/settings` with an operator key, which may also set the customer's
    Stripe payment method."""

    payment_method_id: Annotated[
        StrictStr | None,
        Field(pattern=r"^pm_", max_length=255),
        Expect(
            message="payment_method_id={value!r} is not valid: expected pm_...",
            beyond=(("string_too_long", "pm_... of at most 255 characters"),),
        ),
    ] = None


class CreditBody(Body):
    """`POST /v1/billing/credits` (operators): credit, or with a negative amount debit."""

    customer_id: CustomerId = None
    amount_micros: Annotated[
        StrictInt,
        Field(ge=-MICROS, le=MICROS, json_schema_extra={"not": {"const": 0}}),
        _micros(-MICROS, MICROS, nullable=False),
    ]
    description: Annotated[
        StrictStr | None,
        Field(description="The ledger entry's; the first 500 characters are kept."),
        Expect("a string"),
    ] = None

    @model_validator(mode="after")
    def _not_zero(self) -> CreditBody:
        if self.amount_micros == 0:
            raise InvalidRequest("amount_micros=0 is not valid: expected a non-zero amount")
        return self


_CheckoutUrl = Annotated[
    StrictStr | None,
    Field(pattern=r"^https?://", max_length=2048, description="Checkout only."),
    Expect(message="{name}={value!r} is not valid: Checkout needs an http(s) URL"),
]


class TopupBody(Body):
    """`POST /v1/billing/topups`: a Stripe Checkout page (with its two URLs) or a
    PaymentIntent's client secret."""

    customer_id: CustomerId = None
    amount_micros: Annotated[
        StrictInt,
        Field(ge=MIN_TOPUP_MICROS, le=MAX_TOPUP_MICROS),
        _micros(MIN_TOPUP_MICROS, MAX_TOPUP_MICROS, nullable=False),
    ]
    method: Annotated[
        Literal["checkout", "payment_intent"], Expect("checkout or payment_intent")
    ] = "checkout"
    success_url: _CheckoutUrl = None
    cancel_url: _CheckoutUrl = None

    @model_validator(mode="after")
    def _checkout_urls(self) -> TopupBody:
        if self.method == "checkout":
            for name in ("success_url", "cancel_url"):
                if getattr(self, name) is None:
                    raise InvalidRequest(f"{name}=None is not valid: Checkout needs an http(s) URL")
        return self


class TransactionsQuery(Query):
    """`GET /v1/billing/transactions`: newest first; `before` (an entry id) pages back."""

    customer_id: CustomerId = None
    limit: Annotated[
        int,
        Field(description="At most this many (1 to 500; beyond is clamped)."),
        Expect(message="limit and before must be integers"),
    ] = 100
    before: Annotated[
        int | None,
        Field(ge=-(2**63), le=2**63 - 1),
        Expect(
            message="limit and before must be integers",
            beyond=(
                ("less_than_equal", f"an entry id up to {2**63 - 1}"),
                ("greater_than_equal", f"an entry id from {-(2**63)}"),
            ),
        ),
    ] = None


_GROUPS = ("function", "gpu_type")


class _Window(Query):
    until: Moment = None
    since: Moment = None
    granularity: Annotated[Granularity, Expect("hour or day")] = Granularity.DAY
    format: Annotated[Literal["json", "csv"], Expect("json or csv")] = "json"


class UsageQuery(_Window):
    """`GET /v1/billing/usage`."""

    customer_id: CustomerId = None
    group_by: Annotated[
        str,
        Field(
            pattern=r"^\s*(none|function|gpu_type)?\s*(,\s*(none|function|gpu_type)?\s*)*$",
            description="function, gpu_type, both comma-separated, or none.",
        ),
        Expect("function, gpu_type, both or none"),
    ] = ",".join(_GROUPS)

    def groups(self) -> list[str]:
        return [g.strip() for g in self.group_by.split(",") if g.strip() not in ("", "none")]


class RevenueQuery(_Window):
    """`GET /v1/billing/revenue` (operators)."""


class PodEnvironment(Body):
    """What a pod runs: a deployed app's code, environment and secrets, and Python requirements
    its node installs for it (without an app, Kiln's own environment: `kiln.pods.base_app`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unknown: ClassVar[str] = "unknown environment field {first!r}; fields are {known}"

    app: Annotated[
        StrictStr | None,
        Field(min_length=1, max_length=63, description="A deployed app of the caller's."),
        Expect("the name of one of your deployed apps (GET /v1/apps)"),
    ] = None
    requirements: Annotated[
        tuple[Annotated[StrictStr, Field(min_length=1, max_length=200)], ...],
        Field(
            max_length=MAX_POD_REQUIREMENTS,
            description="Python requirements (PEP 508, such as 'jupyterlab>=4'), installed from "
            "wheels by the pod's node.",
        ),
        Expect(
            f"a list of at most {MAX_POD_REQUIREMENTS} Python requirements of up to 200 "
            'characters, such as ["jupyterlab>=4", "numpy"]'
        ),
    ] = ()

    @model_validator(mode="after")
    def _requirements(self) -> PodEnvironment:
        if self.app is None and not self.requirements:
            raise InvalidRequest(
                'environment={} is not valid: expected {"app": APP}, {"requirements": [...]} '
                "or both",
                param="environment",
            )
        for text in self.requirements:
            if "$" in text or not text.isprintable():
                raise InvalidRequest(
                    f"requirements: {text!r} has a '$' or a character that does not print; "
                    "expected a name with optional extras, versions and markers, such as "
                    "'numpy>=2'",
                    param="requirements",
                )
            try:
                parsed = Requirement(text)
            except InvalidRequirement as exc:
                raise InvalidRequest(
                    f"requirements: {text!r} is not a Python requirement ({exc}); expected a "
                    "name with optional extras, versions and markers, such as 'numpy>=2'",
                    param="requirements",
                ) from None
            if parsed.url is not None:
                raise InvalidRequest(
                    f"requirements: {text!r} names a URL; pods install packages by name from "
                    "the platform's package index only",
                    param="requirements",
                )
        return self


class PodBody(Body):
    """`POST /v1/pods`: a shell (`{"shell": "APP/FN"}`, a fresh replica of the function with a
    terminal, gone when the terminal ends) or a pod (`{"environment": {"app": APP}, "gpu",
    "ports", "volume_gb", "name"}`, a slot held until it is stopped)."""

    unknown: ClassVar[str] = "unknown field {first!r}; fields are {known}"
    model_config = ConfigDict(extra="forbid", frozen=True)

    shell: Annotated[
        StrictStr | None,
        Field(
            pattern=r"^[^/\s]{1,63}/[^/\s]{1,200}$",
            description="A shell in a fresh replica of this function (APP/NAME).",
        ),
        Expect("a deployed function as APP/NAME, such as 'hello/shout'"),
    ] = None
    environment: Annotated[
        PodEnvironment | None,
        Field(description="What the pod runs: an app's code and environment, requirements."),
        Expect('{"app": APP} (one of your deployed apps), {"requirements": [...]} or both'),
    ] = None
    image: Annotated[
        StrictStr | None,
        Field(
            pattern=r"^[a-z0-9][a-z0-9._/:@+-]{0,254}$",
            description="A container image to run (on nodes with Docker), such as "
            "'pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime'.",
        ),
        Expect(
            "a container image reference such as 'ubuntu:24.04' or "
            "'ghcr.io/org/image@sha256:...' (lowercase, up to 255 characters)"
        ),
    ] = None
    name: Annotated[
        StrictStr | None,
        Field(pattern=r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$", description="The pod's name."),
        Expect(
            "1 to 63 lowercase letters, digits and hyphens, starting with a letter and not "
            "ending with a hyphen, such as 'my-pod'"
        ),
    ] = None
    gpu: Annotated[
        StrictStr | None,
        Field(min_length=1, max_length=32, description="GPUs such as 'H100:2', or 'none'."),
        Expect("'none', 'any' or a GPU type, optionally with a count, such as 'H100:2'"),
    ] = None
    gpu_count: Annotated[
        StrictInt | None,
        Field(ge=1, le=MAX_POD_GPUS, description="How many of `gpu` (else 1, or its ':N')."),
        Expect(f"a whole number of GPUs from 1 to {MAX_POD_GPUS}"),
    ] = None
    ports: Annotated[
        tuple[Annotated[StrictInt, Field(ge=1024, le=65535)], ...],
        Field(max_length=MAX_POD_PORTS, description="Ports forwarded at /v1/pods/ID/ports/PORT/."),
        Expect(
            f"at most {MAX_POD_PORTS} port numbers from 1024 to 65535 (ports below 1024 are "
            "reserved: a pod's programs run unprivileged)"
        ),
    ] = ()
    volume_gb: Annotated[
        StrictInt,
        Field(ge=0, le=MAX_POD_VOLUME_GB, description="A volume kept across stop and start."),
        Expect(f"a whole number of GB from 0 to {MAX_POD_VOLUME_GB}"),
    ] = 0
    auto_stop_hours: Annotated[
        StrictFloat | None,
        Field(
            gt=0,
            le=MAX_AUTO_STOP_HOURS,
            description="Stop the pod after this many hours without terminal or port traffic.",
        ),
        Expect(f"a number of hours above 0 and at most {MAX_AUTO_STOP_HOURS}, such as 2 or 0.5"),
    ] = None

    @model_validator(mode="after")
    def _one_kind(self) -> PodBody:
        if sum(x is not None for x in (self.shell, self.environment, self.image)) != 1:
            raise InvalidRequest(
                "a pod needs exactly one of shell (APP/NAME), environment "
                '({"app": APP}, {"requirements": [...]} or both) or image (a container image)'
            )
        if len(set(self.ports)) != len(self.ports):
            raise InvalidRequest(f"ports={self.ports} is not valid: a port is named twice")
        if self.gpu_count is not None and (self.gpu is None or ":" in self.gpu):
            raise InvalidRequest(
                f"gpu_count={self.gpu_count} needs a gpu type without a count of its own, such "
                f'as {{"gpu": "H100", "gpu_count": {self.gpu_count}}}',
                param="gpu_count",
            )
        if self.shell is not None and self.auto_stop_hours is not None:
            raise InvalidRequest(
                "auto_stop_hours is for pods: a shell ends with its terminal",
                param="auto_stop_hours",
            )
        return self

    @property
    def gpus(self) -> str | None:
        """`gpu` with `gpu_count` folded in, as GPU requests are written ('H100:2')."""
        if self.gpu is None or self.gpu_count is None:
            return self.gpu
        return f"{self.gpu}:{self.gpu_count}"

    @property
    def auto_stop_s(self) -> int | None:
        """`auto_stop_hours` in whole seconds (at least one), as the row keeps it."""
        if self.auto_stop_hours is None:
            return None
        return max(1, math.ceil(self.auto_stop_hours * 3600))
